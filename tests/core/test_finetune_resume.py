"""A fine-tuning that is stopped says so: evaluate and predict refuse its model, and `--resume` goes on from
its last checkpoint to where the uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch

from amlp_core.data import write_phantom_dataset
from amlp_core.engine import pipeline
from amlp_core.engine.artefacts import CHECKPOINT, METRICS, RESUME, load_segmentation
from amlp_core.engine.checkpoint import load_checkpoint, save_checkpoint
from amlp_core.errors import CheckpointError
from fedamlp.cli import main
from tests.conftest import tiny_config

SETTINGS = ["model.img_size=16,16", "model.patch_size=4", "model.embed_dim=48", "model.depth=1", "model.num_heads=4"]
SETTINGS += ["model.decoder_dim=24", "model.decoder_depth=1", "model.decoder_heads=4", "model.conv_channels=8,16"]
SETTINGS += ["model.spatial_dims=2", "model.num_classes=2", "train.batch_size=4", "train.finetune_steps=24"]
SETS = [a for s in SETTINGS for a in ("--set", s)]


class Stop(Exception):
    """What a SIGTERM does to a run: it ends at some step, with no clean-up of its own."""


def _stop_after(monkeypatch, step: int) -> None:
    real = pipeline._PassRecorder.__call__

    def stopping(self, metrics):
        out = real(self, metrics)
        if self.first_step + metrics["step"] >= step:
            raise Stop
        return out

    monkeypatch.setattr(pipeline._PassRecorder, "__call__", stopping)


@pytest.fixture
def data(tmp_path):
    return write_phantom_dataset(tmp_path / "data", 12, (16, 16), seed=0)


def _weights(run):
    state, meta = load_checkpoint(run / CHECKPOINT)
    return state["model"], meta


@pytest.mark.slow
def test_a_stopped_finetuning_is_refused_until_it_is_resumed(tmp_path, data, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(["finetune", "--data", str(data), "--out", str(whole), *SETS]) == 0
    assert not (whole / RESUME).exists() and _weights(whole)[1]["finished"] is True

    run = tmp_path / "run"
    _stop_after(monkeypatch, 12)
    with pytest.raises(Stop):
        main(["finetune", "--data", str(data), "--out", str(run), *SETS])
    monkeypatch.undo()
    _, meta = _weights(run)
    assert meta["finished"] is False and 0 < meta["step"] < 24 and (run / RESUME).is_file()
    capsys.readouterr()
    # The half-trained model looks like a model: evaluate and predict refuse it, naming the folder.
    assert main(["evaluate", "--model", str(run), "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert f"model {run} is unfinished: its fine-tuning stopped at step {meta['step']} of 24" in err
    scan = next((data / "imagesTr").iterdir())
    assert main(["predict", "--model", str(run), "--input", str(scan), "--output", str(tmp_path / "s.nii.gz")]) == 2
    assert "--allow-unfinished" in capsys.readouterr().err
    args = ["evaluate", "--model", str(run), "--json", str(tmp_path / "e.json"), "--allow-unfinished"]
    assert main(args) == 0  # asked for explicitly
    # Without --resume the folder is refused; with it, the run goes on to its last step.
    assert main(["finetune", "--data", str(data), "--out", str(run), *SETS]) == 2
    assert main(["finetune", "--data", str(data), "--out", str(run), "--resume", *SETS]) == 0
    resumed, meta = _weights(run)
    assert meta["finished"] is True and meta["step"] == 24 and not (run / RESUME).exists()
    steps = [json.loads(line)["step"] for line in (run / METRICS).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one line per pass, none twice
    reference, _ = _weights(whole)
    for key in reference:  # the same shuffles, augmentations, rates and optimiser state: the same model
        assert torch.allclose(resumed[key].float(), reference[key].float(), atol=1e-5), key
    load_segmentation(run)


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path):
    cfg = tiny_config(2, **{"train.finetune_steps": 2})
    pipeline.finetune(cfg, tmp_path / "run")
    state, meta = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    save_checkpoint(tmp_path / "run" / CHECKPOINT, state, meta)
    with pytest.raises(CheckpointError, match=f"holds weights that are not finite \\({key}\\)"):
        load_segmentation(tmp_path / "run")
