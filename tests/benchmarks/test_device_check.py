"""The device check on the CPU: every method and decoder runs a real step, and the checks can fail."""

import json
import math

import pytest
import torch

from simulations.benchmarks import device_check

SMALL = ["model.img_size=16,16,16", "model.embed_dim=48", "model.depth=1", "model.num_heads=4"]
SMALL += ["model.decoder_dim=24", "model.decoder_depth=1", "model.decoder_heads=4", "model.conv_channels=8,16,16"]


def test_every_method_and_decoder_steps_on_cpu(tmp_path):
    sets = [a for s in SMALL for a in ("--set", s)]
    out = tmp_path / "device.json"
    args = ["--device", "cpu", "--batch", "2", "--warmup", "0", "--repeats", "1", "--out", str(out), *sets]
    assert device_check.main(args) == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    nets = {(r["net"], r["decoder"]) for r in rows}
    assert nets == {(m, d) for m in ("mae", "mps_ams", "amlp", "ahm", "ace") for d in ("transformer", "unet")} | {
        ("segmentation (vit)", "-")
    }
    assert payload["device"] == "cpu" and not payload["bf16_supported"]
    for r in rows:
        assert r["finite"] and r["ok"] and r["step_s"] > 0
        assert r["autocast"] == "float32"  # no autocast on the CPU: the linear layers ran in float32
    assert all(math.isclose(r["vs_mae"], 1.0) for r in rows if r["net"] == "mae")


def test_check_flags_a_non_finite_step_and_a_missed_bf16():
    rows = [
        {"net": "mae", "decoder": "unet", "step_s": 1.0, "finite": True, "autocast": "float32"},
        {"net": "amlp", "decoder": "unet", "step_s": 1.5, "finite": False, "autocast": "float32"},
    ]
    device_check.check(rows, torch.device("cpu"), amp=True)
    assert rows[0]["ok"] and not rows[1]["ok"] and rows[1]["vs_mae"] == pytest.approx(1.5)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():  # float32 under autocast on a bf16 GPU fails
        device_check.check(rows, torch.device("cuda"), amp=True)
        assert not rows[0]["ok"]


def test_bad_values_are_one_line_errors(tmp_path, capfd):
    out = tmp_path / "device.json"
    assert device_check.main(["--device", "cpu", "--methods", "mae,sparkle", "--out", str(out)]) == 2
    assert "sparkle" in capfd.readouterr().err
    assert device_check.main(["--device", "cpu", "--set", "model.img_size=16,x", "--out", str(out)]) == 2
    assert "model.img_size" in capfd.readouterr().err
    assert not out.exists()
