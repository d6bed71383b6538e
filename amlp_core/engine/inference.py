"""A trained segmentation model at work: evaluated on a dataset's test cases, or run on one new scan."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amlp_core.atomic import atomic_write_text, check_output, check_output_folder
from amlp_core.config import Config, PlanConfig, build_config
from amlp_core.data import read_image, write_nifti
from amlp_core.data.cases import Sample
from amlp_core.data.dicom import Series, find_series, read_series, write_seg
from amlp_core.data.geometry import canonical_grid, spacing_of
from amlp_core.data.io import (
    NIFTI_SUFFIXES,
    data_error,
    mask_pixels,
    overlay_pixels,
    quicklook_pixels,
    strip_suffix,
    write_png,
)
from amlp_core.data.plan import fingerprint, fit_problem, prepare, restore
from amlp_core.engine.artefacts import load_segmentation, saved_config
from amlp_core.engine.device import resolve_device
from amlp_core.engine.lesions import inference_args, post_args, postprocess
from amlp_core.engine.loops import evaluate_segmentation, predict_volume
from amlp_core.engine.split import load_split
from amlp_core.errors import DataError

log = logging.getLogger(__name__)


def evaluate(
    run: str | Path,
    data_cfg_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    all_cases: bool = False,
    post: dict[str, Any] | None = None,
    allow_unfinished: bool = False,
) -> dict[str, Any]:
    """Dice per class (and the lesion metrics) of a fine-tuned model on the test cases of the data it names
    (or overrides); with ``all_cases`` on every labelled case; ``post`` overrides the model's
    post-processing (``{"post_keep_largest": ..., "post_min_share": ...}``) for this evaluation. A model whose
    fine-tuning stopped early is refused unless ``allow_unfinished``."""
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev, allow_unfinished)
    cfg = saved_config(meta, run)
    if data_cfg_overrides:
        cfg = build_config({f"data.{k}": v for k, v in data_cfg_overrides.items()}, base=cfg)
    if post:
        cfg = build_config({f"model.{k}": v for k, v in post.items()}, base=cfg)
    split = load_split(cfg)
    cases = [s for s in (split.train + split.test if all_cases else split.test) if s.label is not None]
    if not cases:
        raise DataError(f"no cases to evaluate in {cfg.data.path} (data.test_fraction={cfg.data.test_fraction})")
    result = evaluate_segmentation(
        model,
        cases,
        cfg.model.img_size,
        cfg.model.num_classes,
        dev,
        cfg.train.amp,
        slice_axis=cfg.data.slice_axis,
        **inference_args(cfg.model),
    )
    result["class_names"] = meta.get("class_names", {})
    scored = ("post_keep_largest", "post_min_share", "post_min_confidence", "tta_flips")
    result.update({k: getattr(cfg.model, k) for k in scored})
    return result


#: Output names ``fedamlp predict`` writes: a NIfTI label map, or (for a DICOM series) a DICOM SEG object,
#: or (for a PNG image) a mask PNG with an overlay PNG beside it.
SEG_SUFFIXES = (".dcm",)
PNG_SUFFIXES = (".png",)
OVERLAY_SUFFIX = "_overlay.png"


def overlay_path(mask: Path) -> Path:
    """Where predict writes the overlay of the mask PNG ``mask``: ``x.png`` -> ``x_overlay.png``."""
    return mask.with_name(mask.name[: -len(".png")] + OVERLAY_SUFFIX)


def model_plan(cfg: Config, affine: np.ndarray, spatial_dims: int) -> PlanConfig:
    """The plan a model was trained on; a model saved before plans existed gets what it was trained with:
    the scan's own spacing (after reorientation to RAS) and per-case z-score."""
    if cfg.plan.decided:
        return cfg.plan
    plan = cfg.plan
    if not plan.target_spacing:
        own = spacing_of(canonical_grid((1, 1, 1), affine)[1])[:spatial_dims]
        spacing = tuple(float(v) for v in own)
        plan = dataclasses.replace(plan, target_spacing=spacing, modality="unknown", normalization="zscore")
    return dataclasses.replace(plan, input_size=cfg.model.img_size)  # (plans before the input size was planned)


def read_scan(input_path: str | Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray, str, Series | None]:
    """One scan to segment: a NIfTI or PNG file, or a folder holding one DICOM series.

    Returns:
        ``(image [C, *S], affine (4, 4), modality, series or None)``.
    """
    path = Path(input_path)
    if not path.is_dir():
        image, affine = read_image(path, max_voxels)
        return image, affine, "unknown", None
    found, _, problems = find_series(path)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(f"{errors[0].file}: {errors[0].message}")
    if len(found) != 1:
        raise data_error(path, f"holds {len(found)} DICOM image series; predict takes a folder of one series")
    image, affine = read_series(found[0], max_voxels)
    return image, affine, found[0].modality, found[0]


def segment_scan(
    model: torch.nn.Module, cfg: Config, dev: torch.device, input_path: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Series | None]:
    """Segment one scan (:func:`read_scan`) with a loaded model, the result on the scan's own grid.

    The scan is brought onto the model's plan (:func:`~amlp_core.data.plan.prepare`: RAS, the plan's
    spacing, its normalisation), segmented by sliding windows, and the class probabilities are mapped
    back onto the scan's grid before the argmax and the model's post-processing. A 2D model segments a
    3D volume slice by slice along ``data.slice_axis``.

    Returns:
        ``(labels uint8 [*S], image [C, *S], affine (4, 4), series or None)``.

    Raises:
        DataError: a scan the model cannot read (channels, dimensions, modality), naming it.
    """
    image, affine, modality, series = read_scan(input_path, cfg.data.max_voxels)  # [C, *S]
    if image.shape[0] != cfg.model.in_channels:
        raise DataError(f"{input_path}: has {image.shape[0]} channel(s), the model expects {cfg.model.in_channels}")
    dims = image.ndim - 1
    if not (dims == cfg.model.spatial_dims or (dims, cfg.model.spatial_dims) == (3, 2)):  # 2D models go slice-wise
        raise DataError(f"{input_path}: is a {dims}D image, the model segments {cfg.model.spatial_dims}D images")
    plan = model_plan(cfg, affine, dims)
    scan = Sample(Path(input_path).name, image, None, affine)
    problem = fit_problem(fingerprint([scan], modality), plan)  # (no label: its geometry and modality only)
    if problem and problem.kind != "spacing":  # another modality or dimensionality: the model cannot read it
        raise DataError(
            f"{input_path}: does not fit the model's plan: {str(problem).replace('its scans are', 'it is')}"
        )
    if problem:
        log.warning(
            "%s: %s; it is resampled onto the plan's grid", input_path, str(problem).replace("its", "the scan's")
        )
    planned = prepare(scan, plan, cfg.data.max_voxels, str(input_path))
    m = cfg.model
    probs = predict_volume(
        model, planned.image, m.img_size, dev, cfg.train.amp, slice_axis=cfg.data.slice_axis, flips=m.tta_flips
    )
    restored = restore(probs.numpy(), planned.affine, image.shape[1:], affine)  # [K, *S] on the scan's grid
    labels = postprocess(
        restored.argmax(0).astype(np.uint8), cfg.model.num_classes, probabilities=restored, **post_args(cfg.model)
    )
    return labels, image, affine, series


def predict_file(
    run: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    device: str = "auto",
    allow_unfinished: bool = False,
) -> Path:
    """Segment one scan (:func:`segment_scan`), the result on the scan's own grid: shape and affine (NIfTI), a
    mask PNG of the image's size with an overlay beside it (PNG input), or a DICOM SEG object that references
    the source series (``.dcm`` output of a DICOM series input). The output is checked before any work
    (:func:`~amlp_core.atomic.check_output`): a name of the right kind in a writable folder, never an input.
    """
    dicom_input = Path(input_path).is_dir()
    png_input = Path(input_path).name.lower().endswith(".png")
    suffixes = NIFTI_SUFFIXES + (SEG_SUFFIXES if dicom_input else ()) + (PNG_SUFFIXES if png_input else ())
    out = check_output(output_path, "output", suffixes, inputs=(input_path,), keep_out_of=(run,))
    if out.name.lower().endswith(PNG_SUFFIXES):
        check_output(overlay_path(out), "overlay", PNG_SUFFIXES, inputs=(input_path,), keep_out_of=(run,))
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev, allow_unfinished)
    cfg = saved_config(meta, run)
    labels, image, affine, series = segment_scan(model, cfg, dev, input_path)
    if series is not None and out.name.lower().endswith(SEG_SUFFIXES):
        class_names = {int(k): str(v) for k, v in meta.get("class_names", {}).items()} or {
            k: f"class_{k}" for k in range(cfg.model.num_classes)
        }
        return write_seg(labels, series, class_names, out)
    if out.name.lower().endswith(PNG_SUFFIXES):  # the image's own pixels: a mask and an overlay beside it
        write_png(mask_pixels(labels, cfg.model.num_classes), out)
        write_png(overlay_pixels(image, labels), overlay_path(out))
        log.info("wrote %s and %s", out, overlay_path(out))
        return out
    write_nifti(labels, affine, out)
    return out


#: The table ``predict`` writes beside a folder's segmentations: one row per case and class.
SIZES_CSV = "sizes.csv"


def scans_in(folder: str | Path) -> list[Path]:
    """The NIfTI and PNG scans directly in ``folder`` (PNG masks, ``x_mask.png``, left out), sorted."""
    found = []
    for path in sorted(Path(folder).iterdir()):
        name = path.name.lower()
        if not path.is_file() or name.startswith("."):
            continue
        if name.endswith(NIFTI_SUFFIXES) or (name.endswith(PNG_SUFFIXES) and not _MASK_NAME.match(path.stem)):
            found.append(path)
    return found


_MASK_NAME = re.compile(r"^.+_mask(?:_\d+)?$")


def class_sizes(labels: np.ndarray, affine: np.ndarray, num_classes: int, spaced: bool) -> list[dict[str, Any]]:
    """Each foreground class's size: voxels, and mL from the voxel spacing where the scan has one.

    Args:
        labels: ``[*S]``; affine: ``(4, 4)`` voxel-to-world in mm; spaced: whether it means mm (not a PNG's pixels).
    """
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0 if spaced and labels.ndim == 3 else None
    rows = []
    for k in range(1, num_classes):
        count = int((labels == k).sum())
        rows.append({"class": k, "voxels": count, "volume_ml": round(count * voxel_ml, 4) if voxel_ml else ""})
    return rows


def predict_folder(
    run: str | Path, input_dir: str | Path, output_dir: str | Path, device: str = "auto", allow_unfinished: bool = False
) -> Path:
    """Segment every scan of a folder (:func:`scans_in`) with one model: per case, its segmentation (NIfTI, or a
    mask PNG for a PNG), a quick-look PNG (:func:`~amlp_core.data.io.quicklook_pixels`: three orthogonal
    slices of a volume, or the image, with the labels over it), and its rows of ``sizes.csv`` (each class's
    voxels, and mL from the spacing; a PNG has pixels only).

    Returns:
        The path of ``sizes.csv`` in ``output_dir``.

    Raises:
        DataError: no scan in the folder, or a scan the model cannot read (those before it are written).
        ConfigError: an output folder inside the input folder or the model folder.
    """
    scans = scans_in(input_dir)
    if not scans:
        raise data_error(input_dir, "holds no NIfTI or PNG scan to segment")
    out = check_output_folder(output_dir, "output folder", inputs=(input_dir,), keep_out_of=(run,))
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev, allow_unfinished)
    cfg = saved_config(meta, run)
    names = {int(k): str(v) for k, v in meta.get("class_names", {}).items()}
    rows: list[dict[str, Any]] = []
    for scan in tqdm(scans, desc="predict", unit="scan", disable=None):
        labels, image, affine, _ = segment_scan(model, cfg, dev, scan)
        png = scan.name.lower().endswith(PNG_SUFFIXES)
        stem = strip_suffix(scan.name)
        if png:
            write_png(mask_pixels(labels, cfg.model.num_classes), out / f"{stem}_seg.png")
        else:
            write_nifti(labels, affine, out / f"{stem}_seg.nii.gz")
        write_png(quicklook_pixels(image, labels), out / f"{stem}_quicklook.png")
        for row in class_sizes(labels, affine, cfg.model.num_classes, spaced=not png):
            rows.append({"case": scan.name, "class_name": names.get(row["class"], f"class_{row['class']}"), **row})
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["case", "class", "class_name", "voxels", "volume_ml"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / SIZES_CSV, table.getvalue())
    log.info("segmented %d scans into %s", len(scans), out)
    return out / SIZES_CSV
