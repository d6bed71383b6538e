"""The pretraining-gain benchmark on a tiny real run: rows, pairing by seed, resumption."""

import json

import pytest

from simulations.benchmarks import pretrain_gain
from simulations.benchmarks.pretrain_gain import paired, summary

TINY = [
    "model.spatial_dims=2",
    "model.img_size=32,32",
    "data.synthetic_size=32,32",
    "model.patch_size=4",
    "model.embed_dim=48",
    "model.depth=1",
    "model.num_heads=4",
    "model.decoder_dim=24",
    "model.decoder_depth=1",
    "model.decoder_heads=4",
    "model.conv_channels=8,16",
    "data.synthetic_cases=16",
    "train.batch_size=4",
    "train.device=cpu",
]


def _args(tmp_path, *extra):
    sets = [a for s in TINY for a in ("--set", s)]
    return [
        "--data",
        "synthetic",
        "--out",
        str(tmp_path / "gain.json"),
        "--runs",
        str(tmp_path / "runs"),
        "--methods",
        "scratch,unet,mae",
        "--fractions",
        "0.5",
        "--seeds",
        "0,1",
        "--pretrain-epochs",
        "1",
        "--finetune-steps",
        "4",
        "--curve-every",
        "2",
        *sets,
        *extra,
    ]


@pytest.mark.slow
def test_benchmark_runs_pairs_and_resumes(tmp_path, monkeypatch):
    payload = pretrain_gain.main(_args(tmp_path))
    rows = payload["rows"]
    assert [(r["init"], r["seed"]) for r in rows] == [(i, s) for s in (0, 1) for i in ("scratch", "unet", "mae 1 ep")]
    assert all(r["steps"] == 4 and 0 <= r["dice_mean"] <= 1 for r in rows)
    assert any("test_dice_mean" in point for point in rows[0]["curve"])  # the curve before the end
    cell = next(c for c in payload["summary"] if c["init"] == "mae 1 ep")
    by_seed = {r["seed"]: r["dice_mean"] for r in rows if r["init"] == "mae 1 ep"}
    scratch = {r["seed"]: r["dice_mean"] for r in rows if r["init"] == "scratch"}
    assert cell["minus_scratch"]["per_seed"] == pytest.approx([by_seed[s] - scratch[s] for s in (0, 1)])
    assert "### 50 % labels" in (tmp_path / "gain.md").read_text()
    # Run again: nothing is trained (every row is there, the pretraining is reused).
    monkeypatch.setattr(pretrain_gain, "finetune", lambda *a, **k: pytest.fail("a finished row was re-run"))
    monkeypatch.setattr(pretrain_gain, "pretrain", lambda *a, **k: pytest.fail("a finished pretraining was re-run"))
    again = pretrain_gain.main(_args(tmp_path))
    assert again["rows"] == json.loads((tmp_path / "gain.json").read_text())["rows"] == rows
    # A variant (another fine-tuning recipe) adds its own rows beside, reusing the pretraining.
    monkeypatch.undo()
    monkeypatch.setattr(pretrain_gain, "pretrain", lambda *a, **k: pytest.fail("a finished pretraining was re-run"))
    third = pretrain_gain.main(
        _args(tmp_path, "--methods", "mae", "--seeds", "0", "--variant", "lr1", "--set", "train.encoder_lr_scale=1.0")
    )
    assert [r["init"] for r in third["rows"]][-1] == "mae 1 ep [lr1]" and len(third["rows"]) == 7
    assert third["rows"][-1]["overrides"][-1] == "train.encoder_lr_scale=1.0"


def test_paired_differences_use_common_seeds_only():
    rows = [
        {"label_fraction": 0.1, "init": i, "seed": s, "dice_mean": d}
        for i, s, d in [
            ("scratch", 0, 0.70),
            ("scratch", 1, 0.80),
            ("scratch", 2, 0.75),
            ("amlp 50 ep", 0, 0.74),
            ("amlp 50 ep", 1, 0.81),
            ("mae 50 ep", 0, 0.72),
            ("mae 50 ep", 1, 0.82),
        ]
    ]
    d = paired(rows, 0.1, "amlp 50 ep", "scratch")
    assert d["seeds"] == [0, 1] and d["per_seed"] == pytest.approx([0.04, 0.01])
    stats, md = summary(rows, [0.1])
    amlp = next(c for c in stats if c["init"] == "amlp 50 ep")
    assert amlp["minus_mae"]["per_seed"] == pytest.approx([0.02, -0.01])
    assert "+0.0250" in md and "+0.0050" in md  # amlp - scratch mean; amlp - mae mean


def test_the_semi_supervised_axis_pairs_each_row_with_its_supervised_twin():
    inits = pretrain_gain._inits(["scratch", "unet", "amlp"], [50], "", ["none", "fixmatch"])
    assert [i[0] for i in inits] == ["scratch", "scratch + fixmatch", "unet", "amlp 50 ep", "amlp 50 ep + fixmatch"]
    assert [i[3] for i in inits] == ["none", "fixmatch", "none", "none", "fixmatch"]  # the U-Net: supervised only
    rows = [
        {"label_fraction": 0.1, "init": i, "seed": s, "dice_mean": d}
        for i, s, d in [
            ("scratch", 0, 0.50),
            ("scratch", 1, 0.60),
            ("scratch + fixmatch", 0, 0.58),
            ("scratch + fixmatch", 1, 0.62),
            ("amlp 50 ep", 0, 0.52),
            ("amlp 50 ep", 1, 0.60),
            ("amlp 50 ep + fixmatch", 0, 0.60),
            ("amlp 50 ep + fixmatch", 1, 0.65),
        ]
    ]
    stats, md = summary(rows, [0.1])
    semi = next(c for c in stats if c["init"] == "scratch + fixmatch")
    assert semi["minus_supervised"]["per_seed"] == pytest.approx([0.08, 0.02])
    both = next(c for c in stats if c["init"] == "amlp 50 ep + fixmatch")
    assert both["minus_supervised"]["per_seed"] == pytest.approx([0.08, 0.05])
    assert both["minus_scratch_semi"]["per_seed"] == pytest.approx([0.02, 0.03])
    assert "semi minus supervised (paired)" in md and "+0.0500" in md
