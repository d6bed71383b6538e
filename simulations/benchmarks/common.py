"""Shared pieces of the benchmark scripts: the real-data location, the fixed split, output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from amlp_core.atomic import atomic_write_text
from amlp_core.logs import setup_logging

REPO = Path(__file__).resolve().parents[2]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "msd_hippocampus"
#: A semi-supervised row's name in the benchmarks' tables: ``"<start> + <train.semi_supervised>"``.
SEMI_JOIN = " + "
# The hippocampus split, fixed before any result was seen: 48 of 208 cases for testing
# (data.split_seed=0), the other 160 for training (and, at a label fraction, a seeded subset).
HIPPOCAMPUS_SPLIT = {"data.test_fraction": 48 / 208, "data.split_seed": 0}


#: Phantoms (32x32, 2D) and a small network, for the federation-scale benchmarks (robustness, scale):
#: a site's round takes about a second on two cores.
SMALL_FEDERATION: dict[str, Any] = {
    "model.spatial_dims": 2,
    "model.img_size": [32, 32],
    "model.patch_size": 4,
    "model.embed_dim": 48,
    "model.depth": 2,
    "model.num_heads": 4,
    "model.decoder_dim": 24,
    "model.decoder_depth": 1,
    "model.decoder_heads": 4,
    "model.conv_channels": [8, 16],
    "model.num_classes": 2,
    "data.synthetic_size": [32, 32],
    "data.synthetic_cases": 64,
    "train.batch_size": 8,
    "train.device": "cpu",
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """``payload`` as JSON at ``path``, written atomically (a benchmark stopped mid-write keeps its last file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(payload, indent=2))


def write_results(path: str | Path, payload: dict[str, Any], markdown: str) -> Path:
    """A benchmark's output: ``payload`` as JSON at ``path``, ``markdown`` beside it (``.md``) and on stdout."""
    out = write_json(path, payload)
    out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), e.g. over seeds."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_differences(
    rows: Sequence[dict[str, Any]], field: str, ours: str, theirs: str, fraction: float, metric: str = "dice_mean"
) -> dict[int, float]:
    """``metric`` of the rows whose ``field`` is ``ours`` minus that of ``theirs``, at label ``fraction``, seed by
    seed (only the seeds both have, in order). Pairing by seed compares runs with the same labelled subset and the
    same fine-tuning sampling, so the seed-to-seed spread they share cancels out."""

    def by_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in rows if r[field] == name and r["label_fraction"] == fraction}

    a, b = by_seed(ours), by_seed(theirs)
    return {s: a[s] - b[s] for s in sorted(a) if s in b}


def paired_test(differences: Sequence[float], alpha: float = 0.05) -> dict[str, Any]:
    """What paired differences (one per seed) say: their mean and spread, a two-sided one-sample t-test of
    a zero mean (scipy), and the verdict it supports: ``gain`` or ``loss`` below ``alpha``, else ``tie``
    (with one seed, or differences all equal, no test: ``one seed`` / the sign)."""
    mean, std = mean_std(differences)
    out: dict[str, Any] = {"mean": mean, "std": std, "n": len(differences)}
    if len(differences) < 2:
        return {**out, "p": None, "verdict": "one seed"}
    if std == 0:
        return {**out, "p": None, "verdict": "tie" if mean == 0 else ("gain" if mean > 0 else "loss")}
    from scipy import stats

    p = float(stats.ttest_1samp(differences, 0.0).pvalue)
    verdict = "tie" if p >= alpha else ("gain" if mean > 0 else "loss")
    return {**out, "p": p, "verdict": verdict}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (floats with 4 decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def benchmark_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The arguments every real-data benchmark takes: the data, the method, the JSON output."""
    setup_logging()
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", default=str(HIPPOCAMPUS), help="MSD-layout dataset (default: ../shared hippocampus)")
    p.add_argument("--method", default="amlp")
    p.add_argument("--out", default=out, help="JSON file to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config value")
    return p


def set_overrides(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as config overrides."""
    return dict(item.split("=", 1) for item in items)
