"""The method comparison benchmark: its table, plot and resumption, and one tiny end-to-end run."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from amlp_core import plots as plot
from simulations.benchmarks import compare
from simulations.benchmarks.comparison import plan, report, stats

#: A tiny model on 16^3 phantoms (as tests.conftest.tiny_config(3)), CPU, short waits.
TINY = [
    "model.img_size=16,16,16",
    "model.patch_size=4",
    "model.embed_dim=48",
    "model.depth=2",
    "model.num_heads=4",
    "model.decoder_dim=24",
    "model.decoder_depth=1",
    "model.decoder_heads=4",
    "model.conv_channels=8,16",
    "data.synthetic_size=16,16,16",
    "data.synthetic_cases=8",
    "train.batch_size=4",
    "train.device=cpu",
    "federation.connect_timeout=60",
    "federation.round_timeout=300",
]


def _args(tmp_path, *extra):
    sets = [item for kv in TINY for item in ("--set", kv)]
    return [
        "--data",
        "synthetic",
        "--sites",
        "2",
        "--pretrain-rounds",
        "1",
        "--finetune-rounds",
        "1",
        "--local-epochs",
        "1",
        "--seeds",
        "1",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "compare.json"),
        *sets,
        *extra,
    ]


def _fake_rows():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        for method, base in (("scratch", 0.5), ("amlp", 0.6)):
            for fraction in (0.1, 1.0):
                d1, d2 = base + fraction * 0.2 + shift, base + fraction * 0.1 + shift
                rows.append(
                    {
                        "seed": seed,
                        "method": method,
                        "label_fraction": fraction,
                        "dice_1": d1,
                        "dice_2": d2,
                        "dice_mean": (d1 + d2) / 2,
                        "seconds": 10.0 + seed,
                    }
                )
    return rows


def test_table_markdown_and_plot_from_rows(tmp_path):
    rows = _fake_rows()
    cells = stats.aggregate(rows, ["scratch", "amlp"], [0.1, 1.0])
    assert [(c["method"], c["label_fraction"]) for c in cells] == [
        ("scratch", 0.1),
        ("scratch", 1.0),
        ("amlp", 0.1),
        ("amlp", 1.0),
    ]
    first = cells[0]
    assert first["seeds"] == [0, 1, 2] and first["dice_1_mean"] == pytest.approx(0.54)
    assert first["dice_1_std"] == pytest.approx(0.02) and first["seconds_mean"] == 11.0
    payload = {
        "budget": {
            "data": "hippocampus",
            "sites": 4,
            "split": {},
            "pretrain_rounds": 2,
            "finetune_rounds": 3,
            "local_epochs": 1,
            "set": {},
        },
        "machine": {"processor": "x86_64"},
        "seeds": [0, 1, 2],
        "reduced_budget": "reduced budget on CPU",
        "class_names": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "rows": rows,
        "table": cells,
    }
    md = report.markdown(payload)
    assert "| init | labels | seeds | Dice anterior | Dice posterior | mean Dice | seconds per run |" in md
    assert "| scratch | 10 % | 3 | 0.5400 ± 0.0200 |" in md and "**reduced budget on CPU**" in md
    assert "| init | 10 % | 100 % |" in md
    # amlp is scratch + 0.1 at every seed: paired by seed the difference has no spread, while each
    # method's own spread over the seeds is 0.02.
    amlp = cells[2]
    assert amlp["vs_scratch_mean"] == pytest.approx(0.1) and amlp["vs_scratch_std"] == pytest.approx(0.0)
    assert amlp["vs_scratch_seeds"] == 3 and "vs_scratch_mean" not in cells[0]
    assert "| amlp | +0.1000 ± 0.0000 | +0.1000 ± 0.0000 |" in md
    # A seed without its scratch run is left out of the pairing.
    partial = stats.aggregate(
        [r for r in rows if not (r["method"] == "scratch" and r["seed"] == 2)], ["scratch", "amlp"], [0.1, 1.0]
    )
    assert partial[2]["vs_scratch_seeds"] == 2
    fig = plot.bar_plot(cells, "title & <more>", "sub")
    ax = fig.axes[0]
    assert len(ax.patches) == 4  # 2 methods x 2 fractions
    assert len([c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]) == 2  # one per method
    assert [round(t, 1) for t in ax.get_yticks()] == [0.0, 0.2, 0.4, 0.6, 0.8]  # highest bar + error bar: 0.79
    assert ax.get_ylim() == (0.0, 0.8) and ax.get_title(loc="left") == "title & <more>\nsub"
    # Low Dice values get a shorter axis (still from 0), so their differences stay visible.
    low = [{**c, "dice_mean_mean": c["dice_mean_mean"] / 3} for c in cells]
    assert [round(t, 1) for t in plot.bar_plot(low, "t").axes[0].get_yticks()] == [0.0, 0.1, 0.2, 0.3]
    # Written as SVG, a file an XML parser reads.
    svg = plot.save_plot(cells, tmp_path / "plot.svg", "t")
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_run_configurations_of_the_three_kinds(tmp_path):
    args = plan.parse_args(_args(tmp_path))
    base = plan.base_config(args)
    pre = plan.run_config(base, tmp_path / "a", "ace", 1.0, 2, 3)
    assert (pre.method.name, pre.train.seed, pre.federation.pretrain_rounds) == ("ace", 2, 3)
    assert pre.federation.sites == pre.federation.min_sites == 2 and pre.model.embed_dim == 48
    init = plan.run_config(base, tmp_path / "b", "ace", 0.5, 2, 0, str(tmp_path / "a" / "encoder"))
    assert init.federation.init_encoder.endswith("encoder") and init.train.label_fraction == 0.5
    scratch = plan.run_config(base, tmp_path / "c", "scratch", 0.5, 0, 0)
    assert scratch.federation.pretrain_rounds == 0 and not scratch.federation.init_encoder
    assert pre.data.split_seed == init.data.split_seed == scratch.data.split_seed  # seeds never move the split
    unet = plan.run_config(base, tmp_path / "d", "unet", 0.5, 0, 0)  # scratch with a plain U-Net
    assert unet.model.seg_arch == "unet" and unet.federation.pretrain_rounds == 0 and not unet.federation.init_encoder
    assert (pre.model.seg_arch, init.model.seg_arch, scratch.model.seg_arch) == ("vit",) * 3
    assert plan.ALL_METHODS[:3] == ("scratch", "unet", "mae")
    assert plan.parse_args(_args(tmp_path, "--methods", "scratch,unet", "--pretrain-rounds", "0")).methods == [
        "scratch",
        "unet",
    ]  # neither needs pretraining rounds
    with pytest.raises(SystemExit):
        plan.parse_args(_args(tmp_path, "--methods", "mae,bogus"))
    skewed = plan.parse_args(_args(tmp_path, "--partition", "category"))  # sites skewed by class (issue 26)
    assert plan.budget_of(skewed)["partition"] == "category" and plan.budget_of(args)["partition"] == "iid"
    assert plan.run_config(plan.base_config(skewed), tmp_path / "e", "scratch", 1.0, 0, 0).federation.partition == (
        "category"
    )
    with pytest.raises(SystemExit):
        plan.parse_args(_args(tmp_path, "--partition", "by_hospital"))


def test_resume_refuses_rows_of_another_budget(tmp_path):
    out = tmp_path / "compare.json"
    out.write_text(json.dumps({"budget": {"pretrain_rounds": 99}, "rows": []}))
    with pytest.raises(SystemExit, match="another budget"):
        compare.main(_args(tmp_path, "--resume-rows"))


def _fake_runs(monkeypatch):
    """Replace the simulation by a stand-in that records each run's plan and writes the encoder folder."""
    calls = []

    def run_once(cfg, args, label):
        f = cfg.federation
        init = cfg.method.name if f.pretrain_rounds or f.init_encoder else "-"  # "-": from scratch
        calls.append(
            (
                init if cfg.model.seg_arch == "vit" else cfg.model.seg_arch,
                cfg.train.label_fraction,
                cfg.train.seed,
                f.pretrain_rounds,
                f.init_encoder,
                f.local_epochs,
            )
        )
        if f.pretrain_rounds:
            (Path(f.run_dir) / "encoder").mkdir(parents=True)
            (Path(f.run_dir) / "encoder" / "checkpoint.pt").write_text("x")
        dice = 0.5 + 0.1 * cfg.train.label_fraction + 0.01 * cfg.train.seed
        return {"dice_1": dice, "dice_mean": dice, "seconds": 1.0}, {"0": "background", "1": "lesion"}

    monkeypatch.setattr(compare, "run_once", run_once)
    monkeypatch.setattr(compare, "encoder_change", lambda run_dir: 0.25)  # its stand-in encoder is no checkpoint
    return calls


def test_plan_of_runs_and_resumption(tmp_path, monkeypatch):
    calls = _fake_runs(monkeypatch)
    argv = _args(
        tmp_path,
        "--methods",
        "scratch,unet,mae,ace",
        "--fractions",
        "0.5,1.0",
        "--seeds",
        "2",
        "--pretrain-rounds",
        "3",
    )
    payload = compare.main(argv)
    enc = {
        m: {s: str(tmp_path / "runs" / f"seed{s}" / f"{m}_100pct" / "encoder") for s in (0, 1)} for m in ("mae", "ace")
    }
    # Half the labels: the same local epochs, which count steps over all the labelled cases (the same steps).
    assert calls == [
        c
        for s in (0, 1)
        for c in [
            ("-", 1.0, s, 0, "", 1),
            ("-", 0.5, s, 0, "", 1),  # scratch
            ("unet", 1.0, s, 0, "", 1),
            ("unet", 0.5, s, 0, "", 1),  # scratch with a plain U-Net, the same steps
            ("mae", 1.0, s, 3, "", 1),
            ("mae", 0.5, s, 0, enc["mae"][s], 1),  # pretraining run, then its encoder
            ("ace", 1.0, s, 3, "", 1),
            ("ace", 0.5, s, 0, enc["ace"][s], 1),
        ]
    ]
    assert len(payload["table"]) == 8 and all(c["seeds"] == [0, 1] for c in payload["table"])
    cell = next(c for c in payload["table"] if c["method"] == "mae" and c["label_fraction"] == 0.5)
    assert cell["dice_mean_mean"] == pytest.approx(0.555) and cell["dice_mean_std"] == pytest.approx(0.00707, abs=1e-4)
    md = (tmp_path / "compare.md").read_text()
    assert (
        next(c for c in payload["table"] if c["method"] == "mae" and c["label_fraction"] == 1.0)["encoder_change_mean"]
        == 0.25
        and "mae 0.250, ace 0.250." in md
    )  # pretraining runs only
    assert "unet 0.250" not in md
    assert all(f"| {m} | {p} | 2 |" in md for m in ("scratch", "unet", "mae", "ace") for p in ("50 %", "100 %"))
    svg = ET.parse(tmp_path / "compare.svg").getroot()  # the plot, with every method in its legend
    texts = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {"scratch", "unet", "mae", "ace", "50 % labels", "100 % labels"} <= texts

    # Continue after an interruption: only the missing runs are made; a missing encoder is made again first.
    out = tmp_path / "compare.json"
    saved = json.loads(out.read_text())
    saved["rows"] = [
        r
        for r in saved["rows"]
        if not (r["seed"] == 1 and r["label_fraction"] == 0.5 and r["method"] in ("mae", "ace"))
    ]
    out.write_text(json.dumps(saved))
    shutil.rmtree(tmp_path / "runs" / "seed1" / "ace_100pct")
    calls.clear()
    again = compare.main([*argv, "--resume-rows"])
    assert calls == [
        ("mae", 0.5, 1, 0, enc["mae"][1], 1),
        ("ace", 1.0, 1, 3, "", 1),
        ("ace", 0.5, 1, 0, enc["ace"][1], 1),
    ]
    assert len(again["rows"]) == 16 and again["table"] == payload["table"]


@pytest.mark.slow
def test_tiny_comparison_end_to_end(tmp_path, capsys):
    """Real simulations: ACE pretrained federatedly at 100 % labels, its encoder reused at 50 %, 1 seed,
    2 sites; every cell in the JSON, .md, .svg. (Scratch runs are the same simulation without the
    pretraining phase: tests/integration/test_simulation.py runs them; the plan test above plans them.)"""
    argv = _args(tmp_path, "--methods", "ace", "--fractions", "0.5,1.0")
    payload = compare.main(argv)
    cells = {(c["method"], c["label_fraction"]) for c in payload["table"]}
    assert cells == {("ace", f) for f in (0.5, 1.0)}
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["rows"]) == 2 and saved["reduced_budget"] and saved["machine"]
    by = {(r["method"], r["label_fraction"]): r for r in saved["rows"]}
    assert by["ace", 1.0]["init"] == "federated pretraining" and by["ace", 1.0]["pretrain_seconds"] > 0
    assert by["ace", 0.5]["init"] == "pretrained encoder" and by["ace", 0.5]["pretrain_seconds"] == 0
    # Pretraining moved the encoder away from the initial one the server sent, by a measured amount.
    assert 0.0 < by["ace", 1.0]["encoder_change"] < 1.0
    assert by["ace", 0.5]["encoder_change"] is None
    assert by["ace", 0.5]["labelled_cases"] < by["ace", 1.0]["labelled_cases"]
    assert all(0.0 <= r["dice_mean"] <= 1.0 and r["seconds"] > 0 for r in saved["rows"])
    assert (tmp_path / "runs" / "seed0" / "ace_100pct" / "encoder" / "checkpoint.pt").exists()
    md = (tmp_path / "compare.md").read_text()
    assert all(f"| ace | {p} | 1 |" in md for p in ("50 %", "100 %"))
    assert "Dice lesion" in md and md in capsys.readouterr().out
    assert f"ace {by['ace', 1.0]['encoder_change']:.3f}" in md
    svg = ET.parse(tmp_path / "compare.svg").getroot()  # matplotlib's plot, its text kept as text
    assert {"ace", "50 % labels", "100 % labels"} <= {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}


def test_lesion_rows_are_paired_and_reported_by_lesion_dice():
    """On lesion data (test sets with lesion-free images) the comparison pairs the lesion Dice, not the
    class mean, and reports the share of lesion-free images predicted empty."""
    rows = []
    for seed in (0, 1):
        for method, lesion, mean in (("scratch", 0.60, 0.5), ("amlp", 0.65, 0.4)):
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "label_fraction": 0.1,
                    "dice_1": mean,
                    "dice_mean": mean,
                    "lesion_dice": lesion + 0.01 * seed,
                    "empty_cases": 20,
                    "empty_share": 0.9,
                    "seconds": 5.0,
                }
            )
    cells = stats.aggregate(rows, ["scratch", "amlp"], [0.1])
    assert cells[1]["metric"] == "lesion_dice" and cells[1]["vs_scratch_mean"] == pytest.approx(0.05)
    payload = {
        "budget": {"data": "busi", "sites": 4, "split": {}, "pretrain_rounds": 1, "finetune_rounds": 1,
                   "local_epochs": 1, "set": {}},
        "machine": {}, "seeds": [0, 1], "class_names": {"1": "lesion"}, "rows": rows, "table": cells,
    }  # fmt: skip
    md = report.markdown(payload)
    assert "lesion Dice | lesion-free predicted empty |" in md and "lesion Dice by label fraction:" in md
    assert "| amlp | +0.0500 ± 0.0000 |" in md
    assert plot.bar_plot(cells, "t").axes[0].get_ylabel() == "lesion Dice"


def test_every_tie_and_gain_has_a_paired_test_behind_it():
    from simulations.benchmarks.common import paired_test

    assert paired_test([0.03, 0.05, 0.04])["verdict"] == "gain" and paired_test([0.03, 0.05, 0.04])["p"] < 0.05
    assert paired_test([-0.02, -0.03, -0.025])["verdict"] == "loss"
    spread = paired_test([0.045, 0.021, -0.01])
    assert spread["verdict"] == "tie" and spread["p"] > 0.05 and spread["n"] == 3
    assert paired_test([0.05])["verdict"] == "one seed" and paired_test([0.05])["p"] is None


def test_semi_supervised_axis_pairs_each_row_with_its_start(tmp_path, monkeypatch):
    """``--semi none,mean_teacher``: every method gets a '<method> + mean_teacher' row that sets
    train.semi_supervised, fine-tunes from the same start as its supervised row (a pretrained method's
    encoder at every fraction), and is paired with that row and with scratch + the same loss."""
    calls = []

    def run_once(cfg, args, label):
        f, semi = cfg.federation, cfg.train.semi_supervised
        calls.append((cfg.method.name if f.pretrain_rounds or f.init_encoder else "-", semi, cfg.train.label_fraction,
                      f.pretrain_rounds, Path(f.init_encoder).parent.name if f.init_encoder else ""))  # fmt: skip
        if f.pretrain_rounds:
            (Path(f.run_dir) / "encoder").mkdir(parents=True)
            (Path(f.run_dir) / "encoder" / "checkpoint.pt").write_text("x")
        start = 0.6 if f.pretrain_rounds or f.init_encoder else 0.5
        dice = start + (0.04 if semi != "none" else 0.0) + 0.01 * cfg.train.seed
        return {"dice_1": dice, "dice_mean": dice, "seconds": 1.0}, {"0": "background", "1": "lesion"}

    monkeypatch.setattr(compare, "run_once", run_once)
    monkeypatch.setattr(compare, "encoder_change", lambda run_dir: 0.25)
    argv = ["--methods", "scratch,amlp", "--semi", "none,mean_teacher", "--fractions", "0.5,1.0", "--seeds", "2"]
    payload = compare.main(_args(tmp_path, *argv, "--pretrain-rounds", "2"))
    assert calls[:6] == [
        ("-", "none", 1.0, 0, ""),
        ("-", "none", 0.5, 0, ""),
        ("-", "mean_teacher", 1.0, 0, ""),
        ("-", "mean_teacher", 0.5, 0, ""),
        ("amlp", "none", 1.0, 2, ""),  # pretrains: the encoder every amlp row fine-tunes from
        ("amlp", "none", 0.5, 0, "amlp_100pct"),
    ]
    assert calls[6:8] == [("amlp", "mean_teacher", f, 0, "amlp_100pct") for f in (1.0, 0.5)]
    assert len(calls) == 16
    assert any(r["run_dir"].endswith("seed1/amlp+mean_teacher_50pct") for r in payload["rows"])  # no space
    cell = next(c for c in payload["table"] if c["method"] == "amlp + mean_teacher" and c["label_fraction"] == 0.5)
    assert cell["vs_supervised_mean"] == pytest.approx(0.04) and cell["vs_scratch_semi_mean"] == pytest.approx(0.1)
    assert cell["vs_scratch_mean"] == pytest.approx(0.14) and cell["vs_supervised_seeds"] == 2
    plain = next(c for c in payload["table"] if c["method"] == "scratch + mean_teacher" and c["label_fraction"] == 1.0)
    assert plain["vs_supervised_mean"] == pytest.approx(0.04) and "vs_scratch_semi_mean" not in plain
    assert {r["semi_supervised"] for r in payload["rows"]} == {"none", "mean_teacher"}
    md = (tmp_path / "compare.md").read_text()
    assert "minus its start's on labels only" in md and "| scratch + mean_teacher | +0.0400 ± 0.0000 |" in md
    assert "| amlp + mean_teacher | +0.1000 ± 0.0000 |" in md  # against scratch + mean_teacher
    with pytest.raises(SystemExit):
        plan.parse_args(_args(tmp_path, "--semi", "none,bogus"))
