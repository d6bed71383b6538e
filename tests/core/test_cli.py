"""End to end through the command line, on real files: pretrain -> fine-tune -> evaluate -> predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from PIL import Image

from amlp_core.data import make_phantom, write_phantom_dataset
from fedamlp.cli import main
from tests.conftest import tiny_config


def _yaml(tmp_path: Path, dims: int) -> str:
    path = tmp_path / f"tiny{dims}d.yaml"
    cfg = tiny_config(dims).to_dict()
    cfg["data"].update(test_fraction=0.3)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedamlp.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_pretrain_finetune_evaluate_predict_3d(tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "data", n=10, shape=(16, 16, 16), seed=0)
    config = _yaml(tmp_path, 3)
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(data),
                "--config",
                config,
                "--method",
                "amlp",
                "--epochs",
                "2",
                "--out",
                str(pre),
            ]
        )
        == 0
    )
    assert (pre / "checkpoint.pt").is_file()
    lines = (pre / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (
        main(
            [
                "finetune",
                "--data",
                str(data),
                "--config",
                config,
                "--init",
                str(pre),
                "--label-fraction",
                "0.5",
                "--epochs",
                "2",
                "--out",
                str(fine),
            ]
        )
        == 0
    )
    assert "mean" in capsys.readouterr().out

    assert main(["evaluate", "--model", str(fine), "--data", str(data)]) == 0
    result = json.loads((fine / "evaluation.json").read_text())
    assert 0.0 <= result["dice_1"] <= 1.0 and result["num_examples"] == 3

    # Predict on a scan of another size with a non-trivial affine: same shape and affine out.
    image, _ = make_phantom((20, 18, 16), np.random.default_rng(5))
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.5]
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), scan)
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", str(fine), "--input", str(scan), "--output", str(out)]) == 0
    seg = nib.load(out)
    assert seg.shape == (20, 18, 16) and np.allclose(seg.affine, affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


@pytest.mark.slow
def test_png_2d_pipeline_and_scratch_finetune(tmp_path):
    folder = tmp_path / "busi"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        image, mask = make_phantom((32, 32), rng)
        Image.fromarray((255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)).save(folder / f"c{i}.png")
        Image.fromarray(mask * 255).save(folder / f"c{i}_mask.png")
    config = _yaml(tmp_path, 2)
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(folder),
                "--config",
                config,
                "--method",
                "mps_ams",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "pre"),
            ]
        )
        == 0
    )
    assert (
        main(["finetune", "--data", str(folder), "--config", config, "--epochs", "1", "--out", str(tmp_path / "fine")])
        == 0
    )  # from scratch: no --init
    out = tmp_path / "seg.nii.gz"
    assert (
        main(["predict", "--model", str(tmp_path / "fine"), "--input", str(folder / "c0.png"), "--output", str(out)])
        == 0
    )
    assert nib.load(out).shape == (32, 32)


def test_lesion_images_as_they_arrive_finetune_evaluate_predict_png(tmp_path, capsys):
    """A BUSI-like folder (class sub-folders, normal images with empty masks, 60x80 images): the 2D plan
    resizes them, evaluation reports the lesion metrics, predict writes a mask and an overlay PNG at the
    image's own size, and never over its input."""
    from tests.data.test_lesion_data import write_busi

    root = write_busi(tmp_path / "Dataset_BUSI_with_GT")
    config = _yaml(tmp_path, 2)
    fine = tmp_path / "fine"
    assert main(["finetune", "--data", str(root), "--config", config, "--epochs", "1", "--out", str(fine)]) == 0
    out = capsys.readouterr().out
    assert "lesion-free test images predicted empty" in out and "lesion Dice" in out
    saved = yaml.safe_load((fine / "config.yaml").read_text())
    assert saved["plan"]["image_fit"] == "resize" and saved["plan"]["input_size"] == [32, 32]
    raw = tmp_path / "raw.json"
    args = ["evaluate", "--model", str(fine), "--keep-largest", "false", "--min-share", "0", "--json", str(raw)]
    assert main(args) == 0
    result = json.loads(raw.read_text())
    assert result["post_keep_largest"] is False and result["post_min_share"] == 0.0 and "empty_share" in result
    image = root / "malignant" / "malignant (1).png"
    mask = tmp_path / "malignant 1 mask.png"
    assert main(["predict", "--model", str(fine), "--input", str(image), "--output", str(mask)]) == 0
    pixels = np.asarray(Image.open(mask))
    overlay = Image.open(tmp_path / "malignant 1 mask_overlay.png")
    assert pixels.shape == (60, 80) and set(np.unique(pixels)) <= {0, 255}
    assert overlay.mode == "RGB" and overlay.size == (80, 60)
    before = image.read_bytes()
    assert main(["predict", "--model", str(fine), "--input", str(image), "--output", str(image)]) == 2
    assert image.read_bytes() == before and "is the input" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_private_finetune_reports_epsilon_and_refuses_to_overspend(tmp_path, capsys):
    config = _yaml(tmp_path, 2)
    dp = ["--set", "privacy.site_dp=true", "--set", "privacy.budget=5"]
    assert (
        main(
            [
                "finetune",
                "--data",
                "synthetic",
                "--config",
                config,
                "--epochs",
                "2",
                "--out",
                str(tmp_path / "fine"),
                *dp,
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "fine" / "evaluation.json").read_text())
    assert 0 < result["epsilon"] <= 5.0 and result["delta"] == 1e-5
    assert result["dp_covers"].startswith("fine-tuning") and "one patient" in result["dp_covers"]
    # The same output folder holds the same cases' ledger: another run would overspend, and is refused;
    # --overwrite replaces the run, never the ledger.
    again = ["finetune", "--data", "synthetic", "--config", config, "--epochs", "2", "--out", str(tmp_path / "fine")]
    assert main([*again, *dp]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*again, *dp, "--overwrite"]) == 2
    assert "budget" in capsys.readouterr().err


@pytest.mark.slow  # over 10 s: not in the fast tier
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_private_pretraining_trains_with_dp_or_says_it_does_not(tmp_path, capsys):
    """``fedamlp pretrain`` with site DP over both phases trains with DP-SGD: every epoch's steps are on
    the run's ledger (epsilon grows, within the budget) and the command reports epsilon. With DP for
    fine-tuning only (the default phases) pretraining is not private, and the run says so."""
    from amlp_core.privacy import LEDGER_FILE

    config = _yaml(tmp_path, 2)
    dp = ["--set", "privacy.site_dp=true", "--set", "privacy.budget=5"]
    pre = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--data",
                "synthetic",
                "--config",
                config,
                "--epochs",
                "2",
                "--out",
                str(pre),
                *dp,
                "--set",
                "privacy.phases=both",
            ]
        )
        == 0
    )
    epsilons = [json.loads(line)["epsilon"] for line in (pre / "metrics.jsonl").read_text().splitlines()]
    assert 0 < epsilons[0] < epsilons[1] <= 5.0
    assert len(json.loads((pre / LEDGER_FILE).read_text())["history"]) == 2
    assert f"DP epsilon {epsilons[1]:.3f}" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert main(["pretrain", "--data", "synthetic", "--config", config, "--epochs", "1", "--out", str(plain), *dp]) == 0
    assert "epsilon" not in (plain / "metrics.jsonl").read_text() and not (plain / LEDGER_FILE).exists()
    assert "pretraining is not private (privacy.phases=finetune)" in capsys.readouterr().err


@pytest.mark.slow  # over 10 s: not in the fast tier
def test_data_check_exit_codes_and_report(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", n=3, shape=(12, 12, 12), seed=0)
    ok = _run_cli("data", "check", str(data))
    assert ok.returncode == 0, ok.stderr
    assert "3 cases, 3 labelled" in ok.stdout and "0 errors" in ok.stdout
    victim = sorted((data / "imagesTr").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    bad = _run_cli("data", "check", str(data))
    assert bad.returncode == 2
    assert str(victim) in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


@pytest.mark.slow  # each case a real process: 2-5 s (tests/corpus runs the same refusals in-process)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["pretrain", "--data", "/nonexistent/scans", "--out", "x"], "/nonexistent/scans"),
        (["pretrain", "--data", "synthetic", "--out", "x", "--set", "train.epochz=3"], "train.epochz"),
        (["simulate", "--set", "federation.sitez=3"], "federation.sitez"),
        (["finetune", "--data", "synthetic", "--init", "/nonexistent/run", "--out", "x"], "/nonexistent/run"),
        (
            ["predict", "--model", "/nonexistent/model", "--input", "a.nii.gz", "--output", "b.nii.gz"],
            "/nonexistent/model",
        ),
        (["data", "check", "/nonexistent/folder"], "/nonexistent/folder"),
        (["simulate", "--inject", "site1:explode"], "federation.inject entry 'site1:explode'"),
        (["simulate", "--out", "x", "--resume", "--overwrite"], "contradict"),
        (["data", "check", "synthetic", "--json", "/nonexistent/dir/r.json"], "folder /nonexistent/dir does not exist"),
        (["pretrain", "--data", "synthetic", "--out", "x", "--seed", "1e23"], "argument --seed: invalid int value"),
        (["simulate", "--timeout", "-1"], "-1 is not a positive number of seconds"),
        (["data", "check", "/nonexistent/a\nb"], "/nonexistent/a\\nb: no such file"),  # a newline, shown escaped
        (["pretrain", "--data", "synthetic", "--out", "d" * 300, "--epochs", "1"], "File name too long"),
    ],
)
def test_bad_arguments_give_one_line_without_traceback(args, needle, tmp_path):
    result = _run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fedamlp: error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("usage:", "  "))]  # nothing more


@pytest.mark.slow
def test_predict_and_evaluate_check_their_outputs_before_any_work(tmp_path, capsys):
    """In-process (``main`` returns the exit code and prints the one line); the subprocess tests above and
    tests/corpus check that a real process exits the same way."""
    import nibabel as nib

    data = write_phantom_dataset(tmp_path / "data", n=6, shape=(32, 32), seed=0)
    fine = tmp_path / "fine"
    assert main(["finetune", "--data", str(data), "--out", str(fine), "--set", "train.finetune_steps=2"]) == 0
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), scan)
    before = scan.read_bytes()
    cases = [
        (scan, "is the input"),
        (tmp_path / "seg.png", "must end in .nii or .nii.gz"),
        (tmp_path / "missing" / "seg.nii.gz", "does not exist"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "seg.nii.gz", "is not writable"))
    capsys.readouterr()
    for output, needle in cases:
        code = main(["predict", "--model", str(fine), "--input", str(scan), "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert scan.read_bytes() == before
    code = main(["evaluate", "--model", str(fine), "--json", str(tmp_path / "missing" / "e.json")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    # A run without test cases trains to the end and says it skipped the final evaluation.
    bare = tmp_path / "bare"
    args = ["finetune", "--data", str(data), "--out", str(bare), "--set", "train.finetune_steps=2"]
    assert main([*args, "--set", "data.test_fraction=0"]) == 0
    assert "the final evaluation was skipped" in capsys.readouterr().out
    assert json.loads((bare / "evaluation.json").read_text())["evaluation"] == "skipped: no test cases"


@pytest.mark.slow  # over 5 s (real processes or a long run)
def test_simulate_refuses_a_folder_holding_a_run_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text("kept: true\n")
    result = _run_cli("simulate", "--out", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run folder {run.resolve()} already holds a run: pass --resume" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "results"]
    assert (run / "config.yaml").read_text() == "kept: true\n"


@pytest.mark.slow  # over 10 s: not in the fast tier
def test_predict_refuses_an_image_of_the_wrong_dimension(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", n=6, shape=(16, 16, 16), seed=0)
    config = _yaml(tmp_path, 3)
    fine = _run_cli(
        "finetune", "--data", str(data), "--config", config, "--epochs", "1", "--out", str(tmp_path / "fine")
    )
    assert fine.returncode == 0, fine.stderr
    # Our INFO progress reaches the terminal (importing Opacus configures the root logger at WARNING).
    assert "INFO amlp_core.engine.pipeline: fine-tuning on" in fine.stderr, fine.stderr
    flat = tmp_path / "flat.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(flat)
    result = _run_cli(
        "predict", "--model", str(tmp_path / "fine"), "--input", str(flat), "--output", str(tmp_path / "o.nii.gz")
    )
    assert result.returncode == 2 and str(flat) in result.stderr and "2D image" in result.stderr


@pytest.mark.slow
def test_3d_volumes_as_2d_slices(tmp_path):
    """A 2D model trained on the slices of 3D volumes; evaluation and prediction go slice by slice."""
    data = write_phantom_dataset(tmp_path / "data", n=6, shape=(24, 24, 12), seed=0)
    path = tmp_path / "slices.yaml"
    cfg = tiny_config(2).to_dict()
    cfg["data"].update(as_slices=True, slice_axis=-1, test_fraction=0.34)
    path.write_text(yaml.safe_dump(cfg))
    assert (
        main(["pretrain", "--data", str(data), "--config", str(path), "--epochs", "1", "--out", str(tmp_path / "pre")])
        == 0
    )
    assert (
        main(
            [
                "finetune",
                "--data",
                str(data),
                "--config",
                str(path),
                "--init",
                str(tmp_path / "pre"),
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "fine"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "fine" / "evaluation.json").read_text())
    assert result["num_examples"] == 2  # whole test volumes, not slices
    scan = sorted((data / "imagesTr").iterdir())[0]
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", str(tmp_path / "fine"), "--input", str(scan), "--output", str(out)]) == 0
    assert nib.load(out).shape == (24, 24, 12)


def test_plain_unet_finetune_predict_and_refusals(tmp_path, capsys):
    """``model.seg_arch=unet``: trained from scratch, saved, rebuilt from its checkpoint's config by
    evaluate and predict; a pretraining run to start from is refused, and so is pretraining it."""
    from monai.networks.nets import UNet

    from amlp_core.config import build_config
    from amlp_core.engine.artefacts import load_segmentation, save_pretrained
    from amlp_core.methods import build_method

    data = write_phantom_dataset(tmp_path / "data", n=6, shape=(16, 16, 16), seed=0)
    config = _yaml(tmp_path, 3)
    unet = ["--set", "model.seg_arch=unet"]  # one site: the federation's pretraining rounds do not matter
    fine = tmp_path / "fine"
    assert main(["finetune", "--data", str(data), "--config", config, "--epochs", "1", "--out", str(fine), *unet]) == 0
    model, meta = load_segmentation(fine)
    assert isinstance(model, UNet) and meta["init_method"] == "scratch"
    assert meta["config"]["model"]["seg_arch"] == "unet"
    assert main(["evaluate", "--model", str(fine), "--data", str(data)]) == 0
    image, _ = make_phantom((20, 18, 16), np.random.default_rng(5))
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", str(fine), "--input", str(tmp_path / "scan.nii.gz"), "--output", str(out)]) == 0
    assert nib.load(out).shape == (20, 18, 16)

    capsys.readouterr()
    pre_cfg = build_config(yaml.safe_load(Path(config).read_text()))  # a (ViT) pretraining checkpoint
    save_pretrained(tmp_path / "pre" / "checkpoint.pt", build_method(pre_cfg.model, pre_cfg.method), pre_cfg, 1)
    unet_yaml = tmp_path / "unet.yaml"  # the architecture from the config file, not the pretraining run's
    unet_yaml.write_text(
        yaml.safe_dump(pre_cfg.replace(model={"seg_arch": "unet"}, federation={"pretrain_rounds": 0}).to_dict())
    )
    assert (
        main(
            [
                "finetune",
                "--data",
                str(data),
                "--config",
                str(unet_yaml),
                "--init",
                str(tmp_path / "pre"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model.seg_arch=unet" in err and "no encoder to load" in err and str(tmp_path / "pre") in err
    assert main(["pretrain", "--data", str(data), "--config", config, "--out", str(tmp_path / "y"), *unet]) == 2
    assert "no encoder to pretrain" in capsys.readouterr().err


def test_single_site_runs_own_their_folder_and_a_refused_start_changes_nothing(tmp_path, capsys):
    config = _yaml(tmp_path, 2)
    pre = tmp_path / "pre"
    args = ["pretrain", "--data", "synthetic", "--config", config, "--epochs", "2", "--out", str(pre)]
    # Stopped after its first epoch (time limit), then resumed with --resume to the end.
    assert main([*args, "--set", "train.max_minutes=0.00001"]) == 0
    assert (pre / "resume.pt").is_file()
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0 and not (pre / "resume.pt").exists()
    kept = {p.name: p.read_bytes() for p in pre.iterdir() if p.is_file()}
    # A finished run: refused again, --resume finds nothing to resume, and --overwrite with bad data
    # (or an overspending budget) is refused before the old run is touched.
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 2 and "no stopped pretraining" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text("{training: [")
    refused = ["pretrain", "--data", str(bad), "--config", config, "--out", str(pre), "--overwrite"]
    assert main(refused) == 2 and str(bad / "dataset.json") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in pre.iterdir() if p.is_file()} == kept
    # --overwrite with good data replaces the run.
    assert main([*args, "--epochs", "1", "--overwrite"]) == 0
    lines = (pre / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    capsys.readouterr()
    assert (
        main(["pretrain", "--data", "synthetic", "--config", config, "--out", str(pre), "--resume", "--overwrite"]) == 2
    )
    assert "contradict" in capsys.readouterr().err


def test_an_unlabelled_folder_takes_the_class_count_from_set(tmp_path, capsys):
    """A plain folder of NIfTI images names no classes: the user's --set model.num_classes serves, as the
    error message says (it used to be asked for and then ignored)."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(4):
        image = make_phantom((16, 16, 16), np.random.default_rng(i))[0].astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"scan_{i}.nii.gz"))
    tiny = ["model.img_size=16,16,16", "model.embed_dim=48", "model.depth=1", "model.num_heads=2"]
    tiny += ["model.decoder_dim=24", "model.decoder_depth=1", "model.decoder_heads=2", "train.batch_size=2"]
    base = ["pretrain", "--data", str(folder), "--epochs", "1", *[a for t in tiny for a in ("--set", t)]]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    assert "pass --set model.num_classes=K" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--set", "model.num_classes=3"]) == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["model"]["num_classes"] == 3


def test_simulate_refuses_more_sites_than_cases_before_flower_starts(tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "data", 6, (16, 16, 16), seed=0)
    started = time.monotonic()
    assert main(["simulate", "--data", str(data), "--sites", "50", "--out", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedamlp: error:")]
    assert len(err) == 1 and err[0].startswith("fedamlp: error: invalid federation.sites=50 for "), err
    assert "cannot cut 5 cases into 50 sites" in err[0]  # 6 cases, 1 held out for testing
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()  # said before any process started


@pytest.mark.parametrize(
    "line, shown",
    [
        ("01:02:03 INFO server.progress: finetune round 2/12: 3/3 sites ok, loss 0.4, Dice 0.81, 9 s", "n"),
        ("01:02:03 INFO server.federation: finetune round 2 train, site0: loss=0.4", ""),
        ("01:02:03 WARNING server.validation: NO DEFENCE: 2 replies", "nqv"),
        ("(ClientAppActor pid=28953) 01:02:03 WARNING client.site: site1 has no unlabelled case", "nqv"),
        ("(ClientAppActor pid=28953) \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor", ""),
        ("\x1b[92mINFO \x1b[0m:      Starting Flower Simulation", ""),
        ("\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception", "nq"),
        ("Traceback (most recent call last):", "nq"),
        ("01:02:03 INFO simulations.simulate: simulation finished in 40 s", "n"),
    ],
)
def test_the_console_shows_rounds_warnings_and_errors_and_verbose_shows_all(line, shown):
    from simulations.simulate import console_line

    assert console_line(line, "normal") == ("n" in shown)
    assert console_line(line, "quiet") == ("q" in shown)
    assert console_line(line, "verbose")


@pytest.mark.parametrize(
    "argv, level",
    [
        (["-q", "report", "x"], "quiet"),
        (["report", "x", "--verbose"], "verbose"),
        (["report", "x"], "normal"),
        (["data", "check", "p", "-q"], "quiet"),
        (["-v", "simulate"], "verbose"),
    ],
)
def test_every_command_takes_quiet_and_verbose_before_or_after_it(argv, level):
    from fedamlp.cli import _console, build_parser

    assert _console(build_parser().parse_args(argv)) == level


@pytest.mark.slow  # over 5 s (real processes or a long run)
def test_a_quiet_command_says_only_its_result(tmp_path):
    data = write_phantom_dataset(tmp_path / "ds", n=4, shape=(16, 16, 16), seed=0)
    quiet, normal = _run_cli("-q", "data", "check", str(data)), _run_cli("data", "check", str(data))
    assert quiet.returncode == normal.returncode == 0
    assert " INFO " in normal.stderr and " INFO " not in quiet.stderr and quiet.stdout == normal.stdout


def test_a_site_sees_its_fingerprint_and_the_plan_a_server_would_decide(tmp_path, capsys):
    """`fedamlp data fingerprint` shows exactly what leaves a site at a run's first query (aggregates, no
    case's name), `fedamlp plan` what the server decides of several, and which site it refuses."""
    from amlp_core.data.plan import Fingerprint

    fps = []
    for k, shape in enumerate([(16, 16, 16), (16, 16, 16), (32, 32)]):
        data = write_phantom_dataset(tmp_path / f"site{k}", n=4, shape=shape, seed=k, site=k)
        out = tmp_path / f"fp{k}.json"
        assert main(["-q", "data", "fingerprint", str(data), "--out", str(out)]) == 0
        shown = capsys.readouterr().out
        record = json.loads(out.read_text())
        assert json.loads(shown) == record and set(record) == set(Fingerprint.__dataclass_fields__)
        assert "phantom" not in shown and record["cases"] == 4  # counts, never a case's name
        fps.append(str(out))
    assert main(["-q", "plan", *fps]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan: MR, 1 x 1 x 1 mm") and json.loads(lines[-1])["target_spacing"] == [1, 1, 1]
    assert f"  {fps[0]}: fits (4 cases, 4 labelled)" in lines and f"  {fps[1]}: fits (4 cases, 4 labelled)" in lines
    assert f"  {fps[2]}: refused: its scans are 2D, the plan is for 3D (4 cases, 4 labelled)" in lines
    (tmp_path / "bad.json").write_text('{"cases": -1}')
    assert main(["plan", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"fedamlp: error: {tmp_path / 'bad.json'}: fingerprint cases=-1 is not a count\n"
    assert main(["data", "fingerprint", str(tmp_path / "site0"), "--out", str(tmp_path / "site0" / "x.json")]) == 2
    assert "--out" in capsys.readouterr().err  # an output inside the dataset it reads is refused
