"""A federated run's pretrained encoder, saved as a checkpoint folder, starts another run's fine-tuning.

A real fine-tuning-only simulation (20-40 s on two cores) from the shared two-phase run's encoder.
"""

from __future__ import annotations

import json

import pytest
import torch

from amlp_core import protocol as P
from amlp_core.engine.artefacts import load_pretrained_encoder, load_segmentation
from simulations.simulate import simulate
from tests.integration.helpers import assert_no_process_left, round_rows, sim_config

pytestmark = pytest.mark.slow


def test_saved_encoder_starts_a_fine_tuning_only_run(two_phase_run, tmp_path):
    first, cfg = two_phase_run
    encoder, meta = load_pretrained_encoder(first / "encoder", cfg.model)
    assert meta["kind"] == "pretrain" and meta["method"] == cfg.method.name
    assert meta["pretrain_rounds"] == cfg.federation.pretrain_rounds == 2
    assert encoder and (first / "encoder" / "config.yaml").exists()

    second = tmp_path / "second"
    simulate(
        sim_config(second, **{"federation.pretrain_rounds": 0, "federation.init_encoder": str(first / "encoder")}),
        timeout=600,
    )
    assert_no_process_left(second)
    assert not (second / "encoder").exists()  # no pretraining phase, nothing new to save
    assert {r["phase"] for r in round_rows(second)} == {"finetune"}
    info = json.loads((second / "results" / "rounds.json").read_text())["info"]
    assert info["initial encoder"] == str(first / "encoder")
    assert info["pretraining"].startswith("initial encoder given")  # not the config's method name
    # The same fine-tuning (seeds, rounds, sites) from the same encoder ends with the same model: the
    # second run's fine-tuning started from exactly the first run's aggregated encoder.
    a, meta_a = load_segmentation(first / "model")
    b, meta_b = load_segmentation(second / "model")
    assert (meta_b["init_method"], meta_b["init_from"]) == (cfg.method.name, str(first / "encoder"))
    assert (meta_a["init_method"], meta_a["init_from"]) == (cfg.method.name, "federated pretraining")
    # The federated model says what the local one says: its geometry and the labelled cases over all sites.
    labelled = sum(
        r[P.NUM_EXAMPLES]
        for r in round_rows(first)
        if r["phase"] == "finetune"
        and r["kind"] == "train"
        and r["round"] == cfg.federation.finetune_rounds
        and r["site"] != P.ALL_SITES
    )
    assert meta_a["labelled_cases"] == labelled > 0
    assert (meta_a["spatial_dims"], meta_a["patch_size"]) == (cfg.model.spatial_dims, cfg.model.patch_size)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
