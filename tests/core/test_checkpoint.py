import pytest
import torch

from amlp_core.engine.checkpoint import load_checkpoint, require_meta, save_checkpoint
from amlp_core.errors import CheckpointError


def test_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}}
    path = save_checkpoint(tmp_path / "c.pt", state, {"kind": "pretrain", "epoch": 3, "dims": [1, 2]})
    loaded, meta = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and meta["epoch"] == 3
    require_meta(meta, path, kind="pretrain")
    with pytest.raises(CheckpointError, match="kind='pretrain', expected 'segmentation'"):
        require_meta(meta, path, kind="segmentation")


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"m": {"w": torch.ones(2)}}, {"epoch": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"m": {"w": torch.zeros(2)}}, {"epoch": 2})
    monkeypatch.undo()
    state, meta = load_checkpoint(path)
    assert meta["epoch"] == 1 and torch.equal(state["m"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_corrupt_missing_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a fedamlp checkpoint"):
        load_checkpoint(foreign)


def test_federation_records_are_typed_versioned_and_checked(tmp_path):
    import torch

    from amlp_core.engine.artefacts import ServerCheckpoint, load_site_state, save_site_state

    saved = ServerCheckpoint("finetune", 3, "abc", {"w": torch.ones(2)}, {"m": 1}, [{"round": 1}], {"0": "bg"}, None)
    path = saved.save(tmp_path / "server_checkpoint.pt")
    loaded = ServerCheckpoint.load(path)
    assert (loaded.phase, loaded.round, loaded.digest, loaded.rows) == ("finetune", 3, "abc", [{"round": 1}])
    assert torch.equal(loaded.arrays["w"], torch.ones(2)) and loaded.strategy == {"m": 1}
    newer = tmp_path / "newer.pt"
    save_checkpoint(newer, {"arrays": {}}, {"kind": "server", "version": 2, "phase": "x", "round": 1, "digest": ""})
    with pytest.raises(CheckpointError, match=r"server record .*newer.pt is version 2, this fedamlp reads version 1"):
        ServerCheckpoint.load(newer)
    incomplete = tmp_path / "incomplete.pt"
    save_checkpoint(incomplete, {"arrays": {}}, {"kind": "server", "version": 1})
    with pytest.raises(CheckpointError, match="incomplete"):
        ServerCheckpoint.load(incomplete)
    with pytest.raises(CheckpointError, match="kind='site-state', expected 'server'"):
        ServerCheckpoint.load(save_site_state(tmp_path / "pretrain_r0001.pt", "pretrain", 1, {"opt": {}}))
    assert load_site_state(tmp_path / "pretrain_r0001.pt", "pretrain") == {"opt": {}}
    with pytest.raises(CheckpointError, match="of phase 'pretrain', not 'finetune'"):
        load_site_state(tmp_path / "pretrain_r0001.pt", "finetune")
    with pytest.raises(CheckpointError, match="kind='server'"):
        load_site_state(path, "finetune")


def test_a_model_checkpoint_of_a_newer_layout_version_is_refused(tmp_path):
    from amlp_core.config import ModelConfig
    from amlp_core.engine.artefacts import load_pretrained_encoder, load_segmentation

    seg = save_checkpoint(tmp_path / "seg.pt", {"model": {}}, {"kind": "segmentation", "version": 3, "architecture": 2})
    with pytest.raises(CheckpointError, match=r"segmentation record .*seg.pt is version 3.*a newer fedamlp made it"):
        load_segmentation(seg)
    pre = save_checkpoint(tmp_path / "pre.pt", {"method": {}}, {"kind": "pretrain", "version": 2, "architecture": 2})
    with pytest.raises(CheckpointError, match="pretrain record .*pre.pt is version 2"):
        load_pretrained_encoder(pre, ModelConfig())
