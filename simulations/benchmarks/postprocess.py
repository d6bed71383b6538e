"""The lesion post-processing, chosen on a development split and then scored once on the test split.

A few-label model of lesion images (BUSI) leaves false blobs on most normal images; the post-processing
(:func:`amlp_core.engine.lesions.postprocess`: drop components under ``min_share`` of the image or under
``min_confidence`` mean lesion probability, keep the largest) is the per-image decision that clears them.
Its constants are a preset (:data:`amlp_core.presets.LESION_IMAGES`), one value for every model, so this
benchmark chooses them the way a preset must be chosen: on images that are neither the models' training
images nor their test images.

- The development split: a fine-tuned run's *unused* labelled training images, those outside its
  ``train.label_fraction`` subset (near-duplicates of a labelled image are never among them). Only runs
  fine-tuned without ``train.semi_supervised`` qualify: a semi-supervised run trained on those images.
- Every run's class probabilities are computed once per image; each setting of the grid is applied to
  them, and the lesion metrics (lesion Dice, normal images predicted empty) pooled over the runs.
- Two settings are taken from the grid, each by its development figures: the preset's (``chosen``), the
  highest *image Dice*, the mean over every image of its Dice, a normal image scoring 1 when predicted
  empty and 0 otherwise (so the data's own share of normal images weighs the two errors; nnU-Net's
  convention for an empty reference); and the highest lesion Dice among the settings whose share of
  normal images predicted empty reaches ``--target-empty`` (0.9, issue 26's floor; none reaching it, the
  highest share). The test split is then scored once with each, with the preset in force, and with none.

    python -m simulations.benchmarks.postprocess runs/busi/methods/finetune_*_f0.1_s* \\
        --out results/busi_postprocess.json
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amlp_core.config import Config
from amlp_core.data.dataset import label_subset
from amlp_core.engine.artefacts import load_segmentation, saved_config
from amlp_core.engine.device import resolve_device
from amlp_core.engine.lesions import EMPTY_SHARE, LESION_DICE, LesionTally, post_args, postprocess
from amlp_core.engine.loops import predict_volume
from amlp_core.engine.split import load_split
from amlp_core.errors import ConfigError
from simulations.benchmarks.common import benchmark_parser, machine, table, write_results

log = logging.getLogger(__name__)

CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98)
SHARES = (0.002, 0.005, 0.01, 0.02, 0.04)

IMAGE_DICE = "image_dice"  # mean Dice over every image, a normal one scoring 1 when predicted empty, else 0
Setting = tuple[bool, float, float]  # (keep_largest, min_share, min_confidence)
NAMES = {LESION_DICE: "lesion Dice", EMPTY_SHARE: "normals empty", IMAGE_DICE: "image Dice"}
Scored = list[tuple[np.ndarray, np.ndarray]]  # per image: probabilities [K, *S], truth [*S]


def _probabilities(model, cfg: Config, samples: Sequence, device, desc: str) -> Scored:
    """Every sample's class probabilities ``[K, *S]`` (as the model's evaluation computes them) and label."""
    m = cfg.model
    out = []
    for s in tqdm(samples, desc=desc, leave=False, disable=None):
        p = predict_volume(
            model, s.image, m.img_size, device, cfg.train.amp, slice_axis=cfg.data.slice_axis, flips=m.tta_flips
        )
        out.append((p.numpy(), np.asarray(s.label)))
    return out


@dataclasses.dataclass
class DevelopmentRun:
    """A fine-tuned run read for a lesion benchmark: its network and config, the images it trained on
    (``labelled``), its unused labelled training images (``development``) and its test split."""

    model: torch.nn.Module
    cfg: Config
    labelled: list
    development: list
    test: list


def development_run(run: str | Path, device: torch.device) -> DevelopmentRun:
    """Load a fine-tuned run and split its labelled training images into those it used and the rest.

    Raises:
        ConfigError: the run was semi-supervised (its unused labelled images were training images), or it used
            every labelled image (no development split).
    """
    model, meta = load_segmentation(run, device)
    cfg = saved_config(meta, run)
    if cfg.train.semi_supervised != "none":
        raise ConfigError(
            f"{run}: fine-tuned with train.semi_supervised={cfg.train.semi_supervised}, so its unused "
            "labelled images were training images: not a development split"
        )
    split = load_split(cfg)
    labelled = [s for s in split.train if s.label is not None]
    used = {s.name for s in label_subset(labelled, cfg.train.label_fraction, cfg.train.seed)}
    dev = [s for s in labelled if s.name not in used]
    if not dev:
        raise ConfigError(f"{run}: train.label_fraction={cfg.train.label_fraction} leaves no development images")
    return DevelopmentRun(model, cfg, [s for s in labelled if s.name in used], dev, list(split.test))


def score(scored: Scored, num_classes: int, post: dict[str, Any]) -> LesionTally:
    """The lesion tally of ``scored`` images after the post-processing ``post`` (:func:`postprocess`'s
    keyword arguments)."""
    tally = LesionTally()
    for p, truth in scored:
        tally.add(postprocess(p.argmax(0), num_classes, probabilities=p, **post), truth)
    return tally


def _setting_args(setting: Setting) -> dict[str, Any]:
    largest, share, confidence = setting
    return {"keep_largest": largest, "min_share": share, "min_confidence": confidence}


def pooled(tallies: Sequence[LesionTally]) -> dict[str, float]:
    """Lesion metrics of several runs' tallies: the mean over runs of each run's lesion Dice, share of
    normal images predicted empty and :data:`IMAGE_DICE` (every run weighs alike)."""
    metrics = [
        t.metrics() | {IMAGE_DICE: (t.dice_sum + t.empty_hits) / (t.lesion_cases + t.empty_cases)} for t in tallies
    ]
    return {k: float(np.mean([m[k] for m in metrics if k in m])) for k in (LESION_DICE, EMPTY_SHARE, IMAGE_DICE)}


def best_image_dice(grid: dict[Setting, dict[str, float]]) -> Setting:
    """The setting with the highest :data:`IMAGE_DICE` (ties: the higher lesion Dice)."""
    return max(grid, key=lambda s: (grid[s][IMAGE_DICE], grid[s][LESION_DICE]))


def reaching(grid: dict[Setting, dict[str, float]], target: float) -> Setting:
    """The setting with the highest lesion Dice among those whose empty share reaches ``target``; if none
    does, the one with the highest empty share (ties: the higher Dice)."""
    reaching = [s for s, m in grid.items() if m[EMPTY_SHARE] >= target]
    if reaching:
        return max(reaching, key=lambda s: grid[s][LESION_DICE])
    return max(grid, key=lambda s: (grid[s][EMPTY_SHARE], grid[s][LESION_DICE]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = benchmark_parser(__doc__, "results/postprocess.json")
    p.add_argument("runs", nargs="+", help="fine-tuning run folders (their checkpoint.pt), trained without semi")
    p.add_argument("--target-empty", type=float, default=0.9, help="normal images predicted empty to reach")
    args = p.parse_args(argv)
    device = resolve_device("cpu")
    dev_sets: list[Scored] = []
    test_sets: list[Scored] = []
    runs_meta: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    num_classes = 2
    for run in args.runs:
        r = development_run(run, device)
        num_classes = r.cfg.model.num_classes
        current = current or post_args(r.cfg.model)
        dev_sets.append(_probabilities(r.model, r.cfg, r.development, device, f"{Path(run).name} development"))
        test_sets.append(_probabilities(r.model, r.cfg, r.test, device, f"{Path(run).name} test"))
        runs_meta.append({"run": str(run), "development_images": len(r.development), "test_images": len(r.test)})
    settings: list[Setting] = list(itertools.product((True, False), SHARES, CONFIDENCES))
    grid = {
        s: pooled([score(d, num_classes, _setting_args(s)) for d in dev_sets])
        for s in tqdm(settings, desc="grid", disable=None)
    }
    chosen, target = best_image_dice(grid), reaching(grid, args.target_empty)
    assert current is not None
    candidates = {
        "in force": current,
        "chosen": _setting_args(chosen),
        f"normals empty >= {args.target_empty:g}": _setting_args(target),
        "none": {},
    }
    test = {}
    for name, post in candidates.items():
        tallies = [score(t, num_classes, post) for t in test_sets]
        development = pooled([score(d, num_classes, post) for d in dev_sets])
        test[name] = {"post": post, **pooled(tallies), "per_run": [t.metrics() for t in tallies]}
        test[name]["development"] = development
    rows = [
        {
            "post-processing": name,
            "largest": v["post"].get("keep_largest", False),
            "min_share": v["post"].get("min_share", 0),
            "min_confidence": v["post"].get("min_confidence", 0),
            **{f"dev {n}": f"{v['development'][k]:.3f}" for k, n in NAMES.items()},
            **{f"test {n}": f"{v[k]:.3f}" for k, n in NAMES.items()},
        }
        for name, v in test.items()
    ]
    markdown = table(rows, list(rows[0]))
    payload = {
        "benchmark": "postprocess",
        "machine": machine(),
        "target_empty": args.target_empty,
        "runs": runs_meta,
        "grid": [_setting_args(s) | m for s, m in grid.items()],
        "chosen": _setting_args(chosen),
        "reaching_target": _setting_args(target),
        "test": test,
    }
    write_results(args.out, payload, markdown)
    return payload


if __name__ == "__main__":
    main()
