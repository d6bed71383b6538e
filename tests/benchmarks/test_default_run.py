"""The default-run benchmark: one real simulation started through the CLI as a user would, its figures read
back from the run folder, the targets judged, a finished folder read again, and resumption."""

from __future__ import annotations

import json

import pytest

from simulations.benchmarks import default_run
from tests.benchmarks.test_compare import TINY

pytestmark = pytest.mark.slow


def test_a_run_is_started_like_a_user_would_and_judged_against_the_targets(tmp_path):
    sets = [item for kv in [*TINY, "federation.pretrain_rounds=1"] for item in ("--set", kv)]
    out = tmp_path / "default_run.json"
    args = ["--data", "synthetic", "--sites", "2", "--runs", str(tmp_path / "runs"), "--out", str(out), *sets]
    # Two fine-tuning rounds, evaluated after the second only: the curve has the last round alone.
    first = "--row=tiny=federation.finetune_rounds=2;federation.eval_every=2"
    result = default_run.main([*args, first, "--target-dice", "0.0", "--target-minutes", "30"])
    (row,) = result["rows"]
    assert row["name"] == "tiny" and row["sets"][-2:] == ["federation.finetune_rounds=2", "federation.eval_every=2"]
    assert row["rounds"] == 2 and [p["round"] for p in row["curve"]] == [2]
    assert 0.0 <= row["dice_mean"] <= 1.0 and row["curve"][-1]["dice_mean"] == row["dice_mean"]
    assert row["timed"] == "the command" and 0 < row["server_seconds"] < row["seconds"] < 30 * 60
    assert row["meets_dice"] and row["meets_time"]
    assert (tmp_path / "runs" / "tiny" / "model").is_dir()
    # The same folder read back as a finished run, judged against a target it cannot meet; the first row is
    # kept (resumed), not run again.
    again = f"--read=again={tmp_path / 'runs' / 'tiny'}=federation.finetune_rounds=2"
    result = default_run.main([*args, first, again, "--target-dice", "1.01"])
    assert [r["name"] for r in result["rows"]] == ["tiny", "again"]
    read = result["rows"][1]
    assert read["dice_mean"] == row["dice_mean"] and read["timed"] == "the server (no start-up)"
    assert read["seconds"] == row["server_seconds"] and read["sets"] == ["federation.finetune_rounds=2"]
    assert not read["meets_dice"]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert "| again |" in out.with_suffix(".md").read_text()
    # Lesion images: the lesion Dice is held against the target (phantoms' test cases all hold a lesion).
    lesion = f"--read=lesion={tmp_path / 'runs' / 'tiny'}="
    result = default_run.main(
        [*args, lesion, "--metric", "lesion_dice", "--target-dice", "0.0", "--out", str(out) + "2"]
    )
    (row,) = result["rows"]
    assert 0.0 <= row["lesion_dice"] <= 1.0 and row["meets_dice"] and result["metric"] == "lesion_dice"
    assert row["lesion_cases"] > 0 and row["curve"][-1]["lesion_dice"] == row["lesion_dice"]
    assert not default_run.main([*args, lesion, "--metric", "lesion_dice", "--target-dice", "1.01", "--out",
                                 str(tmp_path / "d3.json")])["rows"][0]["meets_dice"]  # fmt: skip
