"""The TensorBoard event files of a real two-phase simulation: the server's hold the round's aggregates and
nothing image-like; each site's hold its own scalars and its pictures, in its own state folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from amlp_core.engine.board import BOARD_DIR, mask_picture, prediction_picture

pytestmark = pytest.mark.slow


def _events(folder: Path) -> EventAccumulator:
    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_the_server_board_holds_aggregates_and_each_site_its_own_pictures(two_phase_run):
    run, cfg = two_phase_run
    server = _events(run / BOARD_DIR)
    tags = set(server.Tags()["scalars"])
    assert {"finetune/evaluate/dice_mean", "pretrain/train/sites_ok", "finetune/train/loss"} <= tags
    assert {"finetune/evaluate/site0/dice_mean", "pretrain/train/site1/mask_ratio"} <= tags
    assert [e.step for e in server.Scalars("pretrain/train/sites_ok")] == list(
        range(1, cfg.federation.pretrain_rounds + 1)
    )
    assert server.Tags()["images"] == [] and server.Tags()["tensors"] == []  # no picture leaves a site
    for site in ("site0", "site1"):
        own = _events(run / "sites" / site / BOARD_DIR)
        pictures = own.Tags()["images"]
        assert any(t.startswith("pretrain/mask over ") for t in pictures), pictures
        assert any(t.startswith("evaluate/prediction on ") for t in pictures), pictures
        assert "evaluate/dice_mean" in own.Tags()["scalars"] and "pretrain/loss" in own.Tags()["scalars"]
    server_files = [p for p in run.rglob("*") if p.is_file() and "sites" not in p.relative_to(run).parts]
    pictures = [p for p in server_files if p.suffix.lower() in (".png", ".jpg", ".nii", ".gz", ".dcm")]
    assert all(p.parent.name == "report" and p.name.startswith("figure_") for p in pictures), pictures  # plots only


def test_the_pictures_show_the_label_beside_the_prediction_or_the_mask():
    image = np.zeros((1, 16, 16, 6), np.float32)
    label = np.zeros((16, 16, 6), np.int64)
    label[4:8, 4:8, 4] = 1  # the lesion's largest cross-section is slice 4
    picture = prediction_picture(image, label, np.zeros_like(label))
    assert picture.shape == (16, 32, 3) and picture.dtype == np.uint8
    assert picture[:, :16].any() and not picture[:, 16:].any()  # the label drawn left, an empty prediction right
    import torch

    masked = torch.zeros(8, dtype=torch.bool)
    masked[0] = True  # the patch at x 0-7, y 0-7, z 0-2: not on slice 4, the label's
    assert not mask_picture(image, label, masked, (2, 2, 2))[:, 16:].any()
    masked[:] = False
    masked[1] = True  # the patch at x 0-7, y 0-7, z 3-5: on slice 4, in the top-left quarter
    shown = mask_picture(image, label, masked, (2, 2, 2))[:, 16:]
    assert shown[:8, :8].any() and not shown[8:].any() and not shown[:, 8:].any()


def test_the_run_writes_its_report_and_the_command_writes_it_again(two_phase_run, tmp_path, capsys):
    """The report of a real run: self-contained HTML (figures inline), Markdown with PNG figures, what ran,
    the final Dice and the curves; `fedamlp report` on a folder that is not a run says so in one line."""
    import shutil

    from fedamlp.cli import main

    run, _ = two_phase_run
    page = (run / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and 'src="http' not in page  # opens offline
    assert "Dice after fine-tuning round" in page and "pretraining: amlp" in page
    md = (run / "report" / "report.md").read_text()
    figures = sorted(p.name for p in (run / "report").glob("figure_*.png"))
    assert figures and all(f"({name})" in md for name in figures)
    copy = tmp_path / "copy"
    shutil.copytree(run / "results", copy / "results")
    assert main(["report", str(copy)]) == 0 and (copy / "report" / "report.html").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedamlp: error: {tmp_path} is not a federated run folder: it has no results/rounds.json"]


def test_the_console_shows_a_line_a_round_and_the_log_file_holds_the_rest(two_phase_run):
    """The run's console: one line per phase-round with the overall figures, no site's line and no Flower
    or Ray chatter; the whole output, every site's lines included, in RUN_DIR/simulation.log."""
    from simulations.simulate import SIMULATION_LOG
    from tests.integration.conftest import CONSOLE_FILE

    run, cfg = two_phase_run
    console = (run.parent / CONSOLE_FILE).read_text().splitlines()
    rounds = [line for line in console if " round " in line]
    f = cfg.federation
    assert [line.split("server.progress: ")[1].split(":")[0] for line in rounds] == [
        *(f"pretrain round {r}/{f.pretrain_rounds}" for r in range(1, f.pretrain_rounds + 1)),
        *(f"finetune round {r}/{f.finetune_rounds}" for r in range(1, f.finetune_rounds + 1)),
    ], console
    assert all("sites ok, loss " in line for line in rounds) and "Dice " in rounds[-1]
    assert len(console) <= 4 + f.pretrain_rounds + f.finetune_rounds, console
    assert not [line for line in console if "site0" in line or "Flower" in line or "INFO [0m" in line], console
    whole = (run / SIMULATION_LOG).read_text()
    assert "finetune round 1 train, site0: " in whole and "Starting Flower Simulation" in whole

    from amlp_core.data.plan import read_plan_text
    from server.federation import PLAN_FILE

    plan = read_plan_text((run / PLAN_FILE).read_text(), PLAN_FILE)  # the decided plan, on its own
    assert plan.decided and list(plan.input_size) == list(cfg.model.img_size)


def test_a_site_writes_its_own_report_with_its_pictures_in_its_own_folder(two_phase_run, tmp_path, capsys):
    """`fedamlp report --site STATE_DIR`: the site's curves and its pictures (first and last round of each),
    written in its state folder; a folder without a site's events, or no folder at all, is one error line."""
    import shutil

    from fedamlp.cli import main

    run, _ = two_phase_run
    state = tmp_path / "site0"
    shutil.copytree(run / "sites" / "site0" / BOARD_DIR, state / BOARD_DIR)
    assert main(["report", "--site", str(state)]) == 0
    page = (state / "report" / "report.html").read_text()
    assert "Site report: site0" in page and "Test Dice per round" in page and 'src="http' not in page
    assert "pretrain/mask over " in page and "evaluate/prediction on " in page
    md = (state / "report" / "report.md").read_text()
    figures = sorted(p.name for p in (state / "report").glob("figure_*.png"))
    assert len(figures) >= 5 and page.count("data:image/png;base64,") == len(figures)
    assert all(f"({name})" in md for name in figures)
    capsys.readouterr()
    assert main(["report", "--site", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedamlp: error: ") and "not a site's state folder" in err and err.count("\n") == 1
    assert main(["report"]) == 2 and "one of the two" in capsys.readouterr().err


def test_no_reply_the_server_receives_holds_anything_image_like(two_phase_run):
    """Every reply of the real run, as the server's audit log kept it: weights of the model's own shapes in
    training replies only, numbers as metrics, short text as configs; no array shaped like a scan, no bytes."""
    import pickle

    from amlp_core.engine.weights import initial_segmentation_state, initial_shared_state
    from tests.integration.conftest import INBOX_DIR

    run, cfg = two_phase_run
    exchanges = [pickle.loads(p.read_bytes()) for p in sorted((run.parent / INBOX_DIR).glob("*.pkl"))]
    replies = [r for e in exchanges for r in e["received"]]
    assert len(replies) >= 2 * (cfg.federation.pretrain_rounds + 2 * cfg.federation.finetune_rounds)
    shared = initial_shared_state(cfg)
    model_shapes = {tuple(v.shape) for v in (*shared.values(), *initial_segmentation_state(cfg, shared).values())}
    scan = tuple(cfg.data.synthetic_size)
    for reply in replies:
        for record in reply["arrays"].values():
            for name, array in record.items():
                assert tuple(array.shape) in model_shapes, (name, array.shape)  # the model's weights, nothing else
                assert tuple(array.shape[-len(scan) :]) != scan, (name, array.shape)  # no scan-shaped array
        for record in reply["metrics"].values():
            assert all(isinstance(v, (int, float)) for v in record.values()), record  # numbers only
        for record in reply["configs"].values():
            for value in record.values():
                assert not isinstance(value, bytes) and len(str(value)) < 4096, str(value)[:200]
