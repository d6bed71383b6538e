"""A trained segmentation model at work: evaluated on a dataset's test cases, or run on one new scan."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from amlp_core.atomic import check_output
from amlp_core.config import build_config
from amlp_core.data import (
    normalize_intensity,
    read_image,
    write_nifti,
)
from amlp_core.data.io import NIFTI_SUFFIXES
from amlp_core.engine.artefacts import load_segmentation, saved_config
from amlp_core.engine.device import resolve_device
from amlp_core.engine.loops import evaluate_segmentation, predict_volume
from amlp_core.engine.split import load_split
from amlp_core.errors import DataError

log = logging.getLogger(__name__)


def evaluate(
    run: str | Path, data_cfg_overrides: dict[str, Any] | None = None, device: str = "auto", all_cases: bool = False
) -> dict[str, Any]:
    """Dice per class of a fine-tuned model on the test cases of the data it names (or overrides); with
    ``all_cases`` on every labelled case."""
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev)
    cfg = saved_config(meta, run)
    if data_cfg_overrides:
        cfg = build_config({f"data.{k}": v for k, v in data_cfg_overrides.items()}, base=cfg)
    split = load_split(cfg)
    cases = [s for s in (split.train + split.test if all_cases else split.test) if s.label is not None]
    if not cases:
        raise DataError(f"no cases to evaluate in {cfg.data.path} (data.test_fraction={cfg.data.test_fraction})")
    result = evaluate_segmentation(
        model, cases, cfg.model.img_size, cfg.model.num_classes, dev, cfg.train.amp, slice_axis=cfg.data.slice_axis
    )
    result["class_names"] = meta.get("class_names", {})
    return result


def predict_file(run: str | Path, input_path: str | Path, output_path: str | Path, device: str = "auto") -> Path:
    """Segment one scan: NIfTI (or PNG) in, NIfTI label map out with the input's shape and affine.

    A 2D model segments a 3D volume slice by slice along ``data.slice_axis``. The output is checked
    before any work (:func:`~amlp_core.atomic.check_output`): a NIfTI name in a writable folder, never
    the input itself.
    """
    check_output(output_path, "output", NIFTI_SUFFIXES, inputs=(input_path,))
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev)
    cfg = saved_config(meta, run)
    image, affine = read_image(input_path, cfg.data.max_voxels)  # [C, *S]
    if image.shape[0] != cfg.model.in_channels:
        raise DataError(f"{input_path}: has {image.shape[0]} channel(s), the model expects {cfg.model.in_channels}")
    image = normalize_intensity(image)
    dims = image.ndim - 1
    if not (dims == cfg.model.spatial_dims or (dims, cfg.model.spatial_dims) == (3, 2)):  # 2D models go slice-wise
        raise DataError(f"{input_path}: is a {dims}D image, the model segments {cfg.model.spatial_dims}D images")
    probs = predict_volume(model, image, cfg.model.img_size, dev, cfg.train.amp, slice_axis=cfg.data.slice_axis)
    labels = probs.argmax(0).numpy()
    write_nifti(labels.astype(np.uint8), affine, output_path)
    return Path(output_path)
