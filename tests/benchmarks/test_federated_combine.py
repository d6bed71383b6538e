"""Combining the federated benchmark's runs over seeds: the means, the ratio of means, budget checks."""

from __future__ import annotations

import json

import pytest

from simulations.benchmarks.federated import combine


def _run(path, seed, central, federated, **budget):
    payload = {
        "machine": {"cpu_threads": 2},
        "seed": seed,
        "sites": 4,
        "method": "amlp",
        "pretrain_rounds": 2,
        "finetune_rounds": 8,
        "local_epochs": 5,
        "label_fraction": 1.0,
        "central_batch_size": 8,
        "site_batch_size": 2,
        "centralized_dice": {"dice_mean": central},
        "federated_dice": {"dice_mean": federated},
        "dice_ratio": federated / central,
        **budget,
    }
    path.write_text(json.dumps(payload))
    return path


def test_mean_spread_and_ratio_of_means(tmp_path):
    files = [_run(tmp_path / "a.json", 0, 0.80, 0.76), _run(tmp_path / "b.json", 1, 0.90, 0.90)]
    result = combine(files)
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert result["centralized_mean"] == pytest.approx(0.85) and result["federated_mean"] == pytest.approx(0.83)
    assert result["ratio_mean"] == pytest.approx((0.95 + 1.0) / 2)
    assert result["ratio_std"] == pytest.approx(0.0353553, abs=1e-6)
    assert result["ratio_of_means"] == pytest.approx(0.83 / 0.85)  # not the mean of the ratios
    assert result["budget"]["site_batch_size"] == 2


def test_runs_of_different_budgets_are_refused(tmp_path):
    files = [_run(tmp_path / "a.json", 0, 0.8, 0.8), _run(tmp_path / "b.json", 1, 0.8, 0.8, site_batch_size=8)]
    with pytest.raises(SystemExit, match="different budgets"):
        combine(files)
    with pytest.raises(SystemExit, match="missing.json does not exist"):
        combine([files[0], tmp_path / "missing.json"])
