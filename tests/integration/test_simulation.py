"""Real Flower simulations of the two-phase federation (SuperLink, simulation engine, Ray).

Each run takes 20-40 s on two cores, most of it Flower's and Ray's start-up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amlp_core import protocol as P
from amlp_core.data import make_phantom, partition_names, split_names, write_phantom_dataset
from amlp_core.engine.artefacts import load_segmentation
from amlp_core.engine.inference import evaluate, predict_file
from amlp_core.errors import CheckpointError, ConfigError
from amlp_core.methods import build_method
from amlp_core.runfolder import RunFolderError
from simulations.processes import processes_with_env
from simulations.simulate import simulate
from tests.integration.helpers import TWO_PHASE_PLAN, assert_no_process_left, round_rows, sim_config, tree_digest

pytestmark = pytest.mark.slow


def _check_two_phase_run(run: Path, cfg, tmp_path: Path) -> None:
    """A finished two-phase federation: its rows, messages, summary and the model `predict` loads."""
    assert_no_process_left(run)
    rows = round_rows(run)
    pre = [r for r in rows if r["phase"] == "pretrain" and r["site"] != P.ALL_SITES]
    rounds = sorted({r["round"] for r in pre})
    assert rounds == list(range(1, cfg.federation.pretrain_rounds + 1))
    for rnd in rounds:
        this = [r for r in pre if r["round"] == rnd]
        assert sorted(r["site"] for r in this) == ["site0", "site1"] and all(r["status"] == "ok" for r in this)
        assert len({r[P.MASK_RATIO] for r in this}) == 1  # every site masked alike
    # Pretraining messages carry the encoder only: what each site sent is exactly the encoder's size.
    encoder = build_method(cfg.model, cfg.method).shared_state_dict()
    encoder_bytes = sum(v.numel() * v.element_size() for v in encoder.values())
    assert all(r["bytes_up"] == encoder_bytes and r["bytes_down"] == encoder_bytes for r in pre)
    evaluation = [r for r in rows if r["kind"] == "evaluate" and r["site"] == P.ALL_SITES]
    assert len(evaluation) == 1 and 0.0 <= evaluation[0]["dice_mean"] <= 1.0
    summary = (run / "results" / "summary.md").read_text()
    assert "Dice after fine-tuning round 1" in summary and f"- pretraining: {cfg.method.name}\n" in summary
    assert re.search(r"- site data: 2 sites: \d+ training images \(pretraining uses all\), \d+ labelled", summary)
    assert (run / "results" / "rounds.csv").read_text().startswith("phase,round,kind,site,status")
    # The final model is what `fedamlp predict` loads.
    model, meta = load_segmentation(run / "model")
    assert meta["kind"] == "segmentation" and meta["class_names"] == {"0": "background", "1": "lesion"}
    image, _ = make_phantom((16, 16, 16), np.random.default_rng(0))
    import nibabel as nib

    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
    out = predict_file(run / "model", tmp_path / "scan.nii.gz", tmp_path / "seg.nii.gz", device="cpu")
    assert nib.load(out).shape == (16, 16, 16)


def test_plain_unet_federation_trains_from_scratch(tmp_path):
    """``model.seg_arch=unet``: no pretraining phase, the whole U-Net goes round, `predict` loads it. No
    site has test cases (``data.test_fraction=0``): the run trains to the end and says it skipped
    the evaluation."""
    from monai.networks.nets import UNet

    from amlp_core.models import build_segmentation_model

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="federation.pretrain_rounds"):  # refused before anything starts
        simulate(sim_config(run, **{"model.seg_arch": "unet"}), timeout=600)
    assert not run.exists()
    # Phantoms of 24 x 8 x 16 voxels, a 16^3 model.img_size: the server plans a 24 x 8 x 16 input (the
    # median case does not fit the configured box but fits its voxel count), and every network is built for it.
    cfg = sim_config(
        run,
        **{
            "model.seg_arch": "unet",
            "federation.pretrain_rounds": 0,
            "data.test_fraction": 0,
            "data.synthetic_size": "24,8,16",
        },
    )
    simulate(cfg, timeout=600)
    assert_no_process_left(run)
    rows = round_rows(run)
    assert not [r for r in rows if r["phase"] == "pretrain"]
    train = [r for r in rows if r["kind"] == "train" and r["site"] != P.ALL_SITES]
    assert sorted(r["site"] for r in train) == ["site0", "site1"] and all(r["status"] == "ok" for r in train)
    unet = build_segmentation_model(cfg.model).state_dict()
    unet_bytes = sum(v.numel() * v.element_size() for v in unet.values())
    assert all(r["bytes_up"] == unet_bytes == r["bytes_down"] for r in train)  # the whole U-Net, no encoder
    assert not [r for r in rows if r["kind"] == "evaluate"]
    summary = (run / "results" / "summary.md").read_text()
    assert "- pretraining: none (plain U-Net, no encoder)" in summary
    assert "- evaluation: skipped: no site has test cases" in summary
    # The plan the server decided from the sites' fingerprints: in the summary, the run's config and the model.
    assert "- plan: MR, 1 x 1 x 1 mm (linear), zscore, input 24x8x16" in summary
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["plan"]["target_spacing"] == [1.0, 1.0, 1.0] and saved["model"]["img_size"] == [24, 8, 16]
    model, meta = load_segmentation(run / "model")
    assert isinstance(model, UNet) and meta["init_method"] == "scratch"
    assert meta["config"]["plan"]["normalization"] == "zscore" and meta["config"]["plan"]["modality"] == "MR"
    assert meta["config"]["plan"]["input_size"] == meta["config"]["model"]["img_size"] == [24, 8, 16]
    every_case = evaluate(run / "model", device="cpu", all_cases=True)  # the final model, on the training cases
    assert 0.0 <= every_case["dice_mean"] <= 1.0 and every_case["num_examples"] > 0
    image, _ = make_phantom((16, 16, 16), np.random.default_rng(0))
    import nibabel as nib

    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
    out = predict_file(run / "model", tmp_path / "scan.nii.gz", tmp_path / "seg.nii.gz", device="cpu")
    assert nib.load(out).shape == (16, 16, 16)


def test_two_phase_federation_end_to_end_and_resume_reaches_its_final_state(two_phase_run, tmp_path):
    """One uninterrupted run (checked end to end), and the same plan stopped after a round and resumed."""
    plan = TWO_PHASE_PLAN
    straight, cfg = two_phase_run
    _check_two_phase_run(straight, cfg, tmp_path)  # a whole two-phase federation, end to end
    stopped = tmp_path / "stopped"
    simulate(sim_config(stopped, **plan, **{"federation.stop_after_rounds": 1}), timeout=600)
    assert not (stopped / "model").exists() and (stopped / "server_checkpoint.pt").exists()
    before = tree_digest(stopped)
    with pytest.raises(CheckpointError, match="different configuration"):  # a changed plan is refused ...
        simulate(
            sim_config(stopped, **{**plan, "federation.finetune_rounds": 2}, **{"federation.resume": True}), timeout=600
        )
    with pytest.raises(RunFolderError, match="already holds a run: pass --resume"):  # ... and so is a fresh start
        simulate(sim_config(stopped, **plan), timeout=600)
    assert tree_digest(stopped) == before and not (stopped / "FAILED").exists()  # ... changing nothing
    simulate(sim_config(stopped, **plan, **{"federation.resume": True}), timeout=600)
    a, _ = load_segmentation(straight / "model")
    b, _ = load_segmentation(stopped / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
    ratios = {
        (r["round"], r["site"]): r[P.MASK_RATIO]
        for r in round_rows(stopped)
        if r["phase"] == "pretrain" and r["site"] != P.ALL_SITES
    }
    assert ratios[1, "site0"] == ratios[1, "site1"] < ratios[2, "site0"] == ratios[2, "site1"]
    assert_no_process_left(stopped)


def test_a_broken_site_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    data = write_phantom_dataset(tmp_path / "data", n=15, shape=(16, 16, 16), seed=0)
    monkeypatch.chdir(tmp_path)  # a relative data path reaches every site as the same folder
    cfg = sim_config(tmp_path / "run", **{"data.path": "data", "federation.sites": 3, "federation.min_sites": 2})
    train, _ = split_names(
        [p.name.removesuffix(".nii.gz") for p in (data / "imagesTr").iterdir()],
        cfg.data.test_fraction,
        cfg.data.split_seed,
    )
    victim_name = partition_names(train, 3, "iid", seed=cfg.data.split_seed)[1][0]
    victim = data / "imagesTr" / f"{victim_name}.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    simulate(cfg, timeout=600)
    rows = round_rows(tmp_path / "run")
    errors = [r for r in rows if r["status"] == "error"]
    assert errors and all(r["site"] == "site1" and r["error"].startswith("site site1: data problem") for r in errors)
    assert not [r for r in rows if victim.name.removesuffix(".nii.gz") in str(r)]  # no path or case id left the site
    assert all(r["status"] == "ok" for r in rows if r["site"] in ("site0", "site2"))
    assert "site1" in (tmp_path / "run" / "results" / "summary.md").read_text()
    assert (tmp_path / "run" / "model" / "checkpoint.pt").exists()


def test_a_simulation_that_cannot_succeed_is_refused_before_flower_starts(tmp_path):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text("kept: true\n")
    before = tree_digest(run)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"federation.min_sites=3: more than the simulation's federation.sites=2"):
        simulate(sim_config(run, **{"federation.min_sites": 3, "federation.overwrite": True}), timeout=300)
    with pytest.raises(CheckpointError, match="/nonexistent/encoder"):
        plan = {"federation.init_encoder": "/nonexistent/encoder", "federation.pretrain_rounds": 0}
        simulate(sim_config(run, **plan, **{"federation.overwrite": True}), timeout=300)
    assert time.monotonic() - started < 30 and tree_digest(run) == before  # (the deployment test waits for sites)
    assert_no_process_left(run)


def _default_sigint() -> None:
    """A job started in the background (``cmd &``, some CI runners) inherits SIGINT ignored; a terminal's is not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_simulation_leaves_no_process(tmp_path, sig, code):
    run = tmp_path / "run"
    cfg = sim_config(run, **{"federation.pretrain_rounds": 20})
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedamlp.cli", "simulate", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "sites").exists():  # wait until sites are training
        time.sleep(0.5)
    assert (run / "sites").exists(), "the simulation never started"
    with pytest.raises(RunFolderError, match="in use by another run"):  # the folder is held while it runs
        simulate(cfg.replace(federation={"resume": True}), timeout=60)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode == code, proc.stderr.read()[-2000:]
    assert_no_process_left(run)


def test_stop_processes_reaches_a_child_in_its_own_session(tmp_path):
    """Ray starts processes in sessions of their own and without a reliable marker: the clean-up
    follows the process tree, read before the first signal, down to them."""
    from simulations.processes import _running, stop_processes

    pid_file = tmp_path / "pid"
    proc = subprocess.Popen(["bash", "-c", f"setsid sleep 60 & echo $! > {pid_file}; wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text().strip()):
        time.sleep(0.1)
    child = int(pid_file.read_text())
    # `setsid` runs in the child after bash wrote its pid: wait until it has left the session.
    while time.monotonic() < deadline and _running(child) and os.getsid(child) == os.getsid(proc.pid):
        time.sleep(0.05)
    assert _running(child) and os.getsid(child) != os.getsid(proc.pid)  # out of reach of the session's signal
    try:
        stop_processes("no-process-has-this-marker", [proc], grace=2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.1)
        assert not _running(child)
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


#: Ray's per-node agents: they notice that their raylet is gone and exit by themselves, about two
#: minutes later (measured), so the test below does not wait for them.
RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def test_a_killed_simulation_takes_its_superlink_with_it(tmp_path):
    """SIGKILL runs no clean-up in the killed process: Linux's parent-death signal stops the SuperLink,
    and the SuperLink the rest. Without it the SuperLink and SuperExec outlived their parent for good."""
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(sim_config(run, **{"federation.pretrain_rounds": 20}).to_dict()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedamlp.cli", "simulate", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def left() -> dict[int, bytes]:  # the simulation's processes still running, but Ray's agents
        out = {}
        for pid in processes_with_env("FLWR_HOME", str(run / ".flwr")):
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100]
            except OSError:
                continue
        return out

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run / "sites").exists():  # wait until sites are training
            time.sleep(0.5)
        assert (run / "sites").exists(), "the simulation never started"
        assert any(b"flower-superlink" in c for c in left().values()), "no SuperLink to stop"
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and [c for c in left().values() if not c.startswith(RAY_AGENTS)]:
            time.sleep(0.5)
        assert [c for c in left().values() if not c.startswith(RAY_AGENTS)] == []
        after_kill = tree_digest(run)  # and nothing goes on writing: no more rounds, no model
        time.sleep(15)
        assert tree_digest(run) == after_kill and not (run / "model").exists()
        assert not list(Path(tempfile.gettempdir()).glob("fedamlp-ray-*"))  # the watchdog removed Ray's folder
    finally:
        for pid in left():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_private_federation_reports_the_epsilon_of_every_site_and_the_server(tmp_path):
    """Site DP (Opacus, both phases) and server DP (Flower's wrapper) in one real simulation."""
    run = tmp_path / "run"
    cfg = sim_config(
        run,
        **{
            "privacy.site_dp": True,
            "privacy.phases": "both",
            "privacy.budget": 8.0,
            "privacy.server_dp": True,
            "privacy.server_noise_multiplier": 0.5,
            "privacy.server_clipping_norm": 50.0,
        },
    )
    simulate(cfg, timeout=600)
    assert_no_process_left(run)
    rows = round_rows(run)
    train = [r for r in rows if r["kind"] == "train" and r["site"] != P.ALL_SITES]
    assert {(r["phase"], r["site"]) for r in train} == {
        (p, s) for p in ("pretrain", "finetune") for s in ("site0", "site1")
    }
    for site in ("site0", "site1"):
        eps = [r["epsilon"] for r in train if r["site"] == site]
        assert 0 < eps[0] < eps[1] <= 8.0  # grows over the run, never past the budget
        ledger = json.loads((run / "sites" / site / "privacy_ledger.json").read_text())
        assert ledger["epsilon"] == pytest.approx(eps[1], abs=1e-5)
    server = [r["server_epsilon"] for r in rows if r["kind"] == "train" and r["site"] == P.ALL_SITES]
    assert len(server) == 2 and 0 < server[0] < server[1]  # one client-level release per round
    summary = (run / "results" / "summary.md").read_text()
    assert "Privacy spent" in summary and "site DP" in summary and "server DP" in summary
    assert "What the sites' epsilon covers: pretraining and fine-tuning: one noise level" in summary
    # The private recipe the sites ran, resolved for the start (auto, after a pretraining phase: the decoder).
    assert "trains decoder, sgd at 0.5 (privacy.trainable=auto)" in summary


def test_lesion_images_federation_reports_lesion_metrics(tmp_path):
    """A BUSI-like folder in a real two-site simulation: the 2D plan resizes, each site evaluates the
    lesion metrics, the server pools them from the counts, and the summary shows them. Evaluated every
    second fine-tuning round (``federation.eval_every``) and after the last."""
    from amlp_core.engine.lesions import EMPTY_CASES, EMPTY_HITS, EMPTY_SHARE, LESION_CASES, LESION_DICE
    from tests.conftest import tiny_model
    from tests.data.test_lesion_data import write_busi

    root = write_busi(tmp_path / "Dataset_BUSI_with_GT", n_per_class=6, duplicate_of=("malignant", 2))
    run = tmp_path / "run"
    small = tiny_model(2)
    cfg = sim_config(
        run,
        **{
            **{f"model.{k}": getattr(small, k) for k in ("spatial_dims", "img_size", "conv_channels", "embed_dim")},
            "model.num_classes": 2,
            "data.path": str(root),
            "data.test_fraction": 0.4,
            "federation.partition": "category",
            "federation.dirichlet_alpha": 5.0,
            "model.post_keep_largest": True,
            "federation.finetune_rounds": 3,
            "federation.eval_every": 2,  # evaluated after round 2, and after the last
        },
    )
    simulate(cfg, timeout=600)
    rows = round_rows(run)
    assert sorted({r["round"] for r in rows if r["kind"] == "evaluate"}) == [2, 3]
    rows = [r for r in rows if r["round"] == 3]
    sites = [r for r in rows if r["kind"] == "evaluate" and r["site"] != P.ALL_SITES]
    pooled = next(r for r in rows if r["kind"] == "evaluate" and r["site"] == P.ALL_SITES)
    assert len(sites) == 2 and all(r[LESION_CASES] + r[EMPTY_CASES] == r[P.NUM_EXAMPLES] for r in sites)
    assert pooled[LESION_CASES] == sum(r[LESION_CASES] for r in sites) and pooled[EMPTY_CASES] > 0
    assert pooled[EMPTY_SHARE] == pytest.approx(sum(r[EMPTY_HITS] for r in sites) / pooled[EMPTY_CASES])
    lesion_weighted = sum(r[LESION_DICE] * r[LESION_CASES] for r in sites) / pooled[LESION_CASES]
    assert pooled[LESION_DICE] == pytest.approx(lesion_weighted)
    summary = (run / "results" / "summary.md").read_text()
    assert "| site | images with a lesion | lesion Dice | lesion-free images | predicted empty |" in summary
    saved = yaml.safe_load((run / "model" / "config.yaml").read_text())
    assert saved["plan"]["image_fit"] == "resize" and saved["model"]["post_keep_largest"] is True
