"""The pretraining phase's encoder as a checkpoint folder, and fine-tuning from one (no grid needed)."""

import pytest
import torch
from flwr.app import ArrayRecord

from amlp_core.engine.artefacts import load_pretrained_encoder
from amlp_core.engine.pipeline import finetune, pretrain
from amlp_core.errors import CheckpointError
from amlp_core.methods import build_method
from server.federation import ENCODER_DIR, Federation
from tests.conftest import tiny_config


def _cfg(tmp_path, **overrides):
    base = {"federation.run_dir": str(tmp_path / "run"), "data.synthetic_cases": 6}
    return tiny_config(2, **{**base, **overrides})


def _trained_encoder(cfg) -> ArrayRecord:
    """What a pretraining phase hands over: the method's shared weights, changed from their start."""
    torch.manual_seed(1)
    return ArrayRecord(
        {k: v + 0.01 * torch.randn_like(v) for k, v in build_method(cfg.model, cfg.method).shared_state_dict().items()}
    )


@pytest.mark.parametrize("method", ["amlp", "ahm"])
def test_saved_encoder_is_a_pretraining_checkpoint(tmp_path, method):
    cfg = _cfg(tmp_path, **{"method.name": method})
    arrays = _trained_encoder(cfg)
    folder = Federation(None, cfg).save_encoder(arrays)
    assert folder == tmp_path / "run" / ENCODER_DIR and (folder / "config.yaml").exists()
    encoder, meta = load_pretrained_encoder(folder, cfg.model)
    assert meta["kind"] == "pretrain" and meta["method"] == method and meta["federated"] is True
    sent = arrays.to_torch_state_dict()
    assert set(encoder) == {k.removeprefix("encoder.") for k in sent if k.startswith("encoder.")}
    assert all(torch.equal(encoder[k], sent[f"encoder.{k}"]) for k in encoder)
    # `fedamlp finetune --init RUN_DIR/encoder` takes it too (strict load).
    result = finetune(cfg.replace(train={"epochs": 1}), tmp_path / "seg", init=folder)
    assert 0.0 <= result["dice_mean"] <= 1.0


def test_fine_tuning_starts_from_init_encoder(tmp_path):
    first = _cfg(tmp_path)
    arrays = _trained_encoder(first)
    folder = Federation(None, first).save_encoder(arrays)
    cfg = _cfg(
        tmp_path,
        **{
            "federation.run_dir": str(tmp_path / "second"),
            "federation.pretrain_rounds": 0,
            "federation.init_encoder": str(folder),
        },
    )
    server = Federation(None, cfg)
    model = server.initial_segmentation(server.pretrained_encoder()).to_torch_state_dict()
    sent = arrays.to_torch_state_dict()
    encoder_keys = [k for k in model if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(model[k], sent[k]) for k in encoder_keys)
    # The decoder is the same seeded fresh one a run with a pretraining phase would start from.
    reference = Federation(None, first).initial_segmentation(arrays).to_torch_state_dict()
    assert all(torch.equal(model[k], reference[k]) for k in model)


def test_single_site_pretraining_run_is_accepted(tmp_path):
    cfg = _cfg(tmp_path)
    pretrain(cfg, tmp_path / "pre")
    server = Federation(None, cfg.replace(federation={"pretrain_rounds": 0, "init_encoder": str(tmp_path / "pre")}))
    encoder, _ = load_pretrained_encoder(tmp_path / "pre", cfg.model)
    got = server.pretrained_encoder().to_torch_state_dict()
    assert all(torch.equal(got[f"encoder.{k}"], v) for k, v in encoder.items())


def test_encoder_for_another_model_is_refused_naming_the_file(tmp_path):
    other = _cfg(tmp_path, **{"model.depth": 1})
    folder = Federation(None, other).save_encoder(_trained_encoder(other))
    cfg = _cfg(tmp_path, **{"federation.pretrain_rounds": 0, "federation.init_encoder": str(folder)})
    with pytest.raises(CheckpointError, match=str(folder / "checkpoint.pt")):
        Federation(None, cfg).pretrained_encoder()
    missing = cfg.replace(federation={"init_encoder": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointError, match="nowhere"):
        Federation(None, missing).pretrained_encoder()


@pytest.mark.parametrize(
    "overrides, label",
    [
        ({}, "amlp"),
        ({"federation.pretrain_rounds": 0}, "none (encoder from scratch)"),
        ({"federation.pretrain_rounds": 0, "federation.init_encoder": "enc"}, "initial encoder given"),
        ({"federation.pretrain_rounds": 0, "model.seg_arch": "unet"}, "none (plain U-Net, no encoder)"),
    ],
)
def test_summary_names_what_made_the_encoder(tmp_path, overrides, label):
    """The run's summary says which pretraining the model had, not just the config's method name."""
    server = Federation(None, _cfg(tmp_path, **{"method.name": "amlp", **overrides}))
    assert server.pretraining_label().startswith(label)


def test_with_sparks_decoder_the_federation_shares_it_and_fine_tuning_can_start_from_it(tmp_path):
    """``model.pretrain_decoder=unet``: the U-Net pretraining decoder travels with the encoder (the transformer
    decoder does not), it is saved in RUN_DIR/encoder, and with ``train.init_decoder`` the first global
    segmentation network takes it (all levels but the output), from this run's pretraining or from
    ``federation.init_encoder``; a checkpoint without it (a federation that shared the encoder only) is refused,
    naming the file."""
    from amlp_core.models import PRETRAIN_UNET_PREFIX, pretrained_decoder_state

    plain = build_method(_cfg(tmp_path).model, _cfg(tmp_path).method).shared_state_dict()
    assert not any(k.startswith("decoder.") for k in plain)
    cfg = _cfg(tmp_path, **{"model.pretrain_decoder": "unet", "train.init_decoder": True})
    arrays = _trained_encoder(cfg)
    sent = arrays.to_torch_state_dict()
    assert any(k.startswith(PRETRAIN_UNET_PREFIX) for k in sent)
    expected = pretrained_decoder_state(sent)
    folder = Federation(None, cfg).save_encoder(arrays)
    given = cfg.replace(federation={"pretrain_rounds": 0, "init_encoder": str(folder), "run_dir": str(tmp_path / "b")})
    for start in (Federation(None, cfg).initial_segmentation(arrays), _from(given)):
        model = start.to_torch_state_dict()
        assert all(torch.equal(model[f"decoder.{k}"], v) for k, v in expected.items())
    # Without init_decoder the decoder starts fresh; a checkpoint with no U-Net decoder is refused.
    fresh = Federation(None, cfg.replace(train={"init_decoder": False})).initial_segmentation(arrays)
    assert not all(torch.equal(fresh.to_torch_state_dict()[f"decoder.{k}"], v) for k, v in expected.items())
    old = cfg.replace(federation={"run_dir": str(tmp_path / "old")})  # a federation that shared the encoder only
    no_unet = Federation(None, old).save_encoder(
        ArrayRecord({k: v for k, v in sent.items() if k.startswith("encoder.")})
    )
    with pytest.raises(CheckpointError, match="old/encoder/checkpoint.pt holds no U-Net pretraining decoder"):
        _from(given.replace(federation={"init_encoder": str(no_unet)}))


def _from(cfg) -> ArrayRecord:
    server = Federation(None, cfg)
    return server.initial_segmentation(server.pretrained_encoder())
