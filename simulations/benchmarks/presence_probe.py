"""Would an image-level "lesion present" head clear normal images better than the segmentation's own output?

Issue 26 asks that 90 % of normal images be predicted empty. The post-processing's per-image decision
(:mod:`simulations.benchmarks.postprocess`) uses the segmentation's own probabilities; at 10 % labels no
threshold on them reaches 90 % without losing most lesions. The lever proposed next was a head on the
encoder trained with "lesion present" (the mask empty or not). This benchmark measures what such a head
could reach before anyone builds it: a linear probe (logistic regression, standardised features, balanced
classes) on the fine-tuned encoder's pooled features, against the segmentation-derived score.

For every fine-tuned run (the plain U-Net has no encoder and is left out):

- features of each image: every conv stage's map and the ViT's tokens, pooled over positions by their
  mean (``mean``) or their maximum (``max``, where a small lesion is not averaged away);
- the segmentation score: the mean lesion probability over the predicted lesion pixels (0 when none),
  the score the post-processing's ``min_confidence`` thresholds;
- probes trained on the run's own labelled images (``labelled``: what a head trained with the masks would
  see) and on its development images (``development``: the run's unused labelled training images, ten times
  as many; what image-level labels for every training image, e.g. a report's "normal", would give);
- on the test split: ROC AUC for "lesion present", and, at the threshold that clears 90 % of the test
  normal images, the share of lesion images still kept (an oracle operating point: an upper bound on what the
  score can do, not a product figure).

    python -m simulations.benchmarks.presence_probe runs/busi/methods/finetune_scratch_f0.1_s0 \\
        --out results/busi_presence_probe.json
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from amlp_core.engine.device import resolve_device
from amlp_core.engine.loops import predict_volume
from amlp_core.errors import ConfigError
from amlp_core.models.segmentation import SegmentationNet
from simulations.benchmarks.common import benchmark_parser, machine, mean_std, table, write_results
from simulations.benchmarks.postprocess import development_run

log = logging.getLogger(__name__)

POOLS = ("mean", "max")
TRAIN_SETS = ("labelled", "development")
SEGMENTATION = "segmentation score"
CLEARED = 0.9  # the share of normal images the operating point clears (issue 26's floor)
PROBE_C = 0.1  # the logistic regression's inverse L2 strength (standardised features)


@torch.no_grad()
def image_features(model: SegmentationNet, image: np.ndarray) -> dict[str, np.ndarray]:
    """The encoder's features of one image ``[C, *S]`` (at the model's input size), pooled over positions by
    each of :data:`POOLS`: ``{pool: [sum_i c_i + D]}`` (every conv stage, then the ViT's tokens)."""
    model.eval()
    features = model.encoder(torch.as_tensor(image, dtype=torch.float32)[None])  # skips [1, c_i, *S_i], tokens
    maps = [s.flatten(2) for s in features.skips] + [features.tokens.transpose(1, 2)]  # [1, c, positions]
    return {
        "mean": torch.cat([m.mean(dim=2) for m in maps], dim=1)[0].float().numpy(),
        "max": torch.cat([m.amax(dim=2) for m in maps], dim=1)[0].float().numpy(),
    }


def segmentation_score(probabilities: np.ndarray) -> float:
    """The mean lesion probability over the predicted lesion pixels of ``[K, *S]`` probabilities (0: none)."""
    lesion = probabilities[1:].sum(0)  # [*S]
    predicted = probabilities.argmax(0) > 0
    return float(lesion[predicted].mean()) if predicted.any() else 0.0


def kept_at_cleared(scores: np.ndarray, present: np.ndarray, cleared: float = CLEARED) -> float:
    """The share of lesion images (``present``) scoring above the threshold under which ``cleared`` of the
    normal images fall."""
    threshold = np.quantile(scores[~present], cleared)
    return float((scores[present] > threshold).mean())


def _images(model, cfg, samples: Sequence, device, desc: str, segment: bool = False) -> dict[str, np.ndarray]:
    """Each sample's presence, pooled features and, with ``segment`` (the test split: the only one scored by
    it), its :func:`segmentation_score` as the model's evaluation computes the probabilities."""
    size = tuple(cfg.model.img_size)
    out: dict[str, list] = {"present": [], **({SEGMENTATION: []} if segment else {}), **{p: [] for p in POOLS}}
    for s in tqdm(samples, desc=desc, leave=False, disable=None):
        if tuple(np.shape(s.image)[1:]) != size:
            raise ConfigError(f"{s.name}: image {np.shape(s.image)[1:]} is not the model's {size} (plan.image_fit)")
        out["present"].append(bool(np.asarray(s.label).any()))
        if segment:
            p = predict_volume(model, s.image, size, device, cfg.train.amp, flips=cfg.model.tta_flips).numpy()
            out[SEGMENTATION].append(segmentation_score(p))
        for pool, features in image_features(model, s.image).items():
            out[pool].append(features)
    return {k: np.asarray(v) for k, v in out.items()}


def probe(train: dict[str, np.ndarray], test: dict[str, np.ndarray], pool: str) -> np.ndarray | None:
    """Test scores of a logistic regression fitted on ``train``'s ``pool`` features and presence (None when
    ``train`` holds one kind of image only: nothing to learn)."""
    x, y = train[pool], train["present"]
    if len(set(y.tolist())) < 2:
        return None
    fit = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=5000, class_weight="balanced"))
    return fit.fit(x, y).predict_proba(test[pool])[:, 1]


def run_scores(run: str, device) -> dict[str, Any]:
    """One run's test AUC and lesions kept at :data:`CLEARED`, for every score."""
    r = development_run(run, device)
    if not isinstance(r.model, SegmentationNet):
        raise ConfigError(f"{run}: model.seg_arch={r.cfg.model.seg_arch} has no encoder to probe")
    if len({bool(np.asarray(s.label).any()) for s in r.test}) < 2:
        raise ConfigError(f"{run}: the test split needs both normal and lesion images to score a per-image decision")
    name = Path(run).name
    sets = {
        "labelled": _images(r.model, r.cfg, r.labelled, device, f"{name} labelled"),
        "development": _images(r.model, r.cfg, r.development, device, f"{name} dev"),
    }
    test = _images(r.model, r.cfg, r.test, device, f"{name} test", segment=True)
    scores: dict[str, np.ndarray | None] = {SEGMENTATION: test[SEGMENTATION]}
    for pool in POOLS:
        for train_set in TRAIN_SETS:
            scores[f"probe, {pool} pooled, trained on {train_set}"] = probe(sets[train_set], test, pool)
    present = test["present"]
    return {
        "run": str(run),
        "images": {k: len(v["present"]) for k, v in {**sets, "test": test}.items()},
        "normal_test_images": int((~present).sum()),
        "scores": {
            k: {"auc": float(roc_auc_score(present, v)), "lesions_kept": kept_at_cleared(v, present)}
            for k, v in scores.items()
            if v is not None
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = benchmark_parser(__doc__, "results/presence_probe.json")
    p.add_argument("runs", nargs="+", help="fine-tuned run folders of our network, trained without semi")
    args = p.parse_args(argv)
    device = resolve_device("cpu")
    runs = [run_scores(run, device) for run in args.runs]
    rows = []
    for score in dict.fromkeys(k for r in runs for k in r["scores"]):
        scored = [r["scores"][score] for r in runs if score in r["scores"]]
        auc, kept = mean_std([s["auc"] for s in scored]), mean_std([s["lesions_kept"] for s in scored])
        rows.append(
            {
                "score": score,
                "runs": len(scored),
                "test AUC": f"{auc[0]:.3f} ± {auc[1]:.3f}",
                f"lesion images kept, {CLEARED:.0%} of normals cleared (oracle)": f"{kept[0]:.2f} ± {kept[1]:.2f}",
            }
        )
    payload = {
        "benchmark": "presence_probe",
        "machine": machine(),
        "probe": {"C": PROBE_C, "class_weight": "balanced", "cleared": CLEARED},
        "runs": runs,
        "summary": rows,
    }
    write_results(args.out, payload, table(rows, list(rows[0])))
    return payload


if __name__ == "__main__":
    main()
