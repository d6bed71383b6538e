"""Whole jobs at one site: load data, pretrain, fine-tune, evaluate, predict.

The command line calls these directly; the federation's client calls the same pieces
round by round. A run folder holds ``config.yaml``, ``checkpoint.pt``, ``metrics.jsonl``
and, after evaluation, ``evaluation.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amlp_core.config import ARCHITECTURE, Config, ModelConfig, build_config, build_section, save_config
from amlp_core.data import (
    Sample,
    discover,
    label_subset,
    load_samples,
    make_phantom_samples,
    normalize_intensity,
    partition_names,
    read_image,
    split_names,
    to_slices,
    write_nifti,
)
from amlp_core.engine.checkpoint import atomic_write_text, load_checkpoint, require_meta, save_checkpoint
from amlp_core.engine.device import make_generator, resolve_device, seed_everything, set_threads
from amlp_core.engine.local import finetune_for, make_loader, pretrain_epochs, run_epochs
from amlp_core.engine.loops import evaluate_segmentation, finetune_budget, predict_volume
from amlp_core.engine.optim import finetune_optimizer, pretrain_optimizer
from amlp_core.errors import CheckpointError, ConfigError, DataError
from amlp_core.methods import PretrainMethod, build_method
from amlp_core.models import (
    SEG_ARCH_CLASSES,
    SegmentationNet,
    build_segmentation_model,
    encoder_state,
    has_encoder,
    pretrained_decoder_state,
)
from amlp_core.presets import ROI, phantoms
from amlp_core.privacy import PrivacyLedger, PrivatePhase, ready_ledger

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT_STEPS = 10  # fine-tuning: a checkpoint after a pass at most this often (in steps), and at the end
EVALUATION = "evaluation.json"
#: Pretraining: what an unfinished run needs to go on where it stopped (removed when it finishes).
RESUME = "resume.pt"


@dataclass
class DataSplit:
    """A dataset cut into a training and a test part by case (never by slice)."""

    train: list[Sample]
    test: list[Sample]
    class_names: dict[int, str]


def load_split(cfg: Config, site: int = 0, num_sites: int = 1) -> DataSplit:
    """Read (or synthesise) the data named by ``cfg.data`` and split it by case.

    With ``num_sites > 1`` (a simulated federation) the fixed train/test split is cut into
    sites by ``cfg.federation.partition`` and only site ``site``'s cases are read; synthetic
    phantoms are generated per site instead, each site with its own scanner style.

    Raises:
        DataError: unreadable data, naming the file.
        ConfigError: data that does not fit the model (dimensions, channels, classes).
    """
    d, m = cfg.data, cfg.model
    if d.synthetic:
        samples = make_phantom_samples(
            d.synthetic_cases, d.synthetic_size, seed=d.split_seed, site=site if num_sites > 1 else d.synthetic_site
        )
        class_names, dims = {0: "background", 1: "lesion"}, len(d.synthetic_size)
        train_names, test_names = split_names([s.name for s in samples], d.test_fraction, d.split_seed)
    else:
        index = discover(d.path, d.format)
        class_names = index.class_names or {k: f"class_{k}" for k in range(m.num_classes)}
        dims = index.spatial_dims
        train_names, test_names = split_names([c.name for c in index.cases], d.test_fraction, d.split_seed)
        if num_sites > 1:
            f = cfg.federation
            train_names = partition_names(train_names, num_sites, f.partition, f.dirichlet_alpha, d.split_seed)[site]
            test_names = partition_names(test_names, num_sites, "iid", seed=d.split_seed)[site] if test_names else []
        wanted = set(train_names) | set(test_names)
        index = dataclasses.replace(index, cases=tuple(c for c in index.cases if c.name in wanted))
        samples = load_samples(index, with_labels=True)
    _check_fits(samples, class_names, dims, cfg)
    by_name = {s.name: s for s in samples}
    train = [by_name[n] for n in train_names]
    test = [by_name[n] for n in test_names]
    if d.as_slices:
        train = to_slices(train, d.slice_axis)
    return DataSplit(train, test, class_names)


def _check_fits(samples: list[Sample], class_names: dict[int, str], dims: int, cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    if d.as_slices and dims == 3:
        dims = 2
    if dims != m.spatial_dims:
        raise ConfigError(
            f"data at {d.path} is {dims}D but model.spatial_dims={m.spatial_dims} "
            f"(use --dims {dims}, or data.as_slices for 3D volumes in a 2D model)"
        )
    channels = {s.image.shape[0] for s in samples}
    if channels and channels != {m.in_channels}:
        raise ConfigError(f"data at {d.path} has {sorted(channels)} channel(s) but model.in_channels={m.in_channels}")
    if len(class_names) != m.num_classes:
        raise ConfigError(
            f"data at {d.path} declares {len(class_names)} classes {class_names} but model.num_classes={m.num_classes}"
        )


def _append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _prepare(cfg: Config, out_dir: str | Path, keep_metrics: int = 0) -> tuple[Path, torch.device]:
    """Make ``out_dir``, write the config, seed and set threads. ``metrics.jsonl`` starts empty, or keeps
    its first ``keep_metrics`` epochs (a resumed pretraining)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / METRICS
    kept = [
        line
        for line in (metrics.read_text().splitlines() if keep_metrics and metrics.exists() else [])
        if json.loads(line).get("epoch", 0) <= keep_metrics
    ]
    atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    save_config(cfg, out / CONFIG)
    seed_everything(cfg.train.seed)
    set_threads(cfg.train.num_threads)
    return out, resolve_device(cfg.train.device)


def _resume_digest(cfg: Config) -> str:
    """What a resumed pretraining must share with the stopped one: everything but its time limit."""
    return cfg.replace(train={"max_minutes": 0.0}).run_digest()


def _resume_state(out: Path, cfg: Config) -> dict[str, Any] | None:
    """The saved state of an unfinished pretraining of ``cfg`` in ``out`` (see :data:`RESUME`), or None
    (none there, or one of other settings: the run starts again, and says so)."""
    path = out / RESUME
    if not path.is_file():
        return None
    try:
        state, meta = load_checkpoint(path)
    except CheckpointError as err:
        log.warning("%s; pretraining starts again", err)
        return None
    if meta.get("digest") != _resume_digest(cfg) or not 0 < meta.get("epoch", 0) < cfg.train.epochs:
        log.warning("%s is another pretraining's (other settings); this one starts again", path)
        return None
    return {**state, "epoch": meta["epoch"]}


def _out_of_time(start: float, cfg: Config) -> bool:
    return cfg.train.max_minutes > 0 and time.monotonic() - start > 60 * cfg.train.max_minutes


def pretrain(cfg: Config, out_dir: str | Path, split: DataSplit | None = None) -> dict[str, Any]:
    """Self-supervised pretraining of ``cfg.method.name`` on the training cases' images.

    Writes ``checkpoint.pt`` (kind ``pretrain``) after every epoch. A run stopped before its last epoch
    (killed, or ``train.max_minutes``) goes on from its last finished epoch when started again with the
    same settings in the same folder (:data:`RESUME`), and ends where the uninterrupted run ends.
    Returns the last epoch's metrics.

    Raises:
        ConfigError: ``model.seg_arch=unet``, whose plain U-Net has no encoder to pretrain.
    """
    if not has_encoder(cfg.model):
        raise ConfigError(
            f"model.seg_arch={cfg.model.seg_arch} has no encoder to pretrain (a plain U-Net trains "
            "from scratch with `fedamlp finetune`); pretrain with model.seg_arch=vit"
        )
    resumed = _resume_state(Path(out_dir), cfg)
    first = resumed["epoch"] if resumed else 0
    out, device = _prepare(cfg, out_dir, keep_metrics=first)
    split = split or load_split(cfg)
    method = build_method(cfg.model, cfg.method).to(device)
    loader = make_loader(split.train, cfg, augment=True, labels=False)
    optimizer = pretrain_optimizer(method, cfg.train)
    generator = make_generator(cfg.train.seed, device)
    if resumed:  # go on exactly where the stopped run was: weights, optimizer, mask and shuffle streams
        method.load_state_dict(resumed["method"])
        optimizer.load_state_dict(resumed["optimizer"])
        generator.set_state(resumed["generator"])
        loader.generator.set_state(resumed["shuffle"])
        torch.set_rng_state(resumed["torch"])
    epochs = cfg.train.epochs
    private = cfg.privacy.site_dp and cfg.privacy.private("pretrain")
    if cfg.privacy.site_dp and not private:
        log.info("privacy.site_dp: pretraining is not private (privacy.phases=%s); fine-tuning is", cfg.privacy.phases)
    log.info(
        "pretraining %s on %d images for %d epochs on %s%s%s",
        cfg.method.name,
        len(split.train),
        epochs,
        device,
        f", resumed after epoch {first}" if first else "",
        " with DP-SGD" if private else "",
    )
    start, metrics = time.monotonic(), {}
    for epoch in range(first, epochs):
        # One stretch per epoch: under DP its steps are on the ledger before the epoch's checkpoint is.
        ledger = (
            _privacy_ledger(
                cfg,
                out,
                PrivatePhase(rounds=epochs - epoch, cases=len(split.train), epochs=1),
                f"pretraining epoch {epoch + 1} in {out}",
            )
            if private
            else None
        )
        metrics = pretrain_epochs(
            method,
            optimizer,
            loader,
            device,
            cfg,
            run_epochs(epoch, epoch + 1, epochs),
            generator,
            total_epochs=epochs,
            ledger=ledger,
            seed=cfg.train.seed + epoch,
            stretch=("pretrain", epoch + 1),
        )
        metrics.update(epoch=epoch + 1, seconds=round(time.monotonic() - start, 2))
        _append_metrics(out, metrics)
        log.info("epoch %d/%d loss %.4f ratio %.2f", epoch + 1, epochs, metrics["loss"], metrics.get("ratio", 0))
        save_pretrained(out / CHECKPOINT, method, cfg, epoch + 1)
        if epoch + 1 < epochs:
            save_checkpoint(
                out / RESUME,
                {
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "shuffle": loader.generator.get_state(),
                    "torch": torch.get_rng_state(),
                },
                {"kind": "pretrain-resume", "epoch": epoch + 1, "digest": _resume_digest(cfg)},
            )
        if _out_of_time(start, cfg):
            log.info(
                "stopping after %d epochs: train.max_minutes=%s reached (run it again to go on)",
                epoch + 1,
                cfg.train.max_minutes,
            )
            break
    if metrics.get("epoch") == epochs:
        (out / RESUME).unlink(missing_ok=True)
    return metrics


def pretrained_meta(cfg: Config, epoch: int) -> dict[str, Any]:
    """The metadata of a pretraining checkpoint (kind ``pretrain``), as :func:`load_pretrained_encoder` reads it."""
    return {
        "kind": "pretrain",
        "architecture": ARCHITECTURE,
        "method": cfg.method.name,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "spatial_dims": cfg.model.spatial_dims,
        "patch_size": cfg.model.patch_size,
        "model_digest": cfg.digest("model"),
    }


def segmentation_meta(
    cfg: Config, class_names: Mapping[str, str], init_method: str, init_from: str, labelled_cases: int
) -> dict[str, Any]:
    """The metadata of a segmentation checkpoint (kind ``segmentation``): alike for a local fine-tuning run
    and a federation's final model, so ``fedamlp predict``/``evaluate`` read both the same way.

    Args:
        class_names: ``{"0": "background", ...}``.
        init_method: the pretraining method that made the encoder, or ``"scratch"``.
        init_from: where the encoder came from: a pretraining run's folder, ``"federated pretraining"``,
            or ``""`` (scratch).
        labelled_cases: the labelled training cases fine-tuning used (over all sites in a federation).
    """
    return {
        "kind": "segmentation",
        "architecture": ARCHITECTURE,
        "config": cfg.to_dict(),
        "class_names": {str(k): v for k, v in class_names.items()},
        "init_method": init_method,
        "init_from": init_from,
        "labelled_cases": labelled_cases,
        "spatial_dims": cfg.model.spatial_dims,
        "patch_size": cfg.model.patch_size,
    }


def save_pretrained(path: Path, method: PretrainMethod, cfg: Config, epoch: int) -> None:
    save_checkpoint(path, {"method": method.state_dict()}, pretrained_meta(cfg, epoch))


def require_architecture(meta: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose network layout is not this version's (:data:`~amlp_core.config.ARCHITECTURE`).

    Raises:
        CheckpointError: naming the file and both layouts.
    """
    have = meta.get("architecture", 1)  # layout 1 (a ViT on raw patches beside a conv U-Net) wrote no tag
    if have != ARCHITECTURE:
        raise CheckpointError(
            f"checkpoint {path} holds network layout {have}, this version needs layout "
            f"{ARCHITECTURE} (the encoder is now conv stages + ViT, the segmentation network's "
            "whole down path): pretrain or fine-tune it again with this version"
        )


def _checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    return run / CHECKPOINT if run.is_dir() else run


def _read_pretraining(run: str | Path, model_cfg: ModelConfig) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A pretraining run's checkpoint (folder or file), read once and checked: ``(path, method state, meta)``.

    Raises:
        CheckpointError: not a pretraining checkpoint, or made for another model configuration.
    """
    path = _checkpoint_path(run)
    state, meta = load_checkpoint(path)
    require_meta(meta, path, kind="pretrain")
    require_architecture(meta, path)
    have = build_section("model", meta["config"]["model"])
    if have != model_cfg:
        raise CheckpointError(f"checkpoint {path} was made for model {have}, not {model_cfg}")
    return path, state["method"], meta


def _encoder_of(path: Path, method_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    encoder = encoder_state(method_state)
    if not encoder:
        raise CheckpointError(f"checkpoint {path} holds no encoder weights")
    return encoder


def load_pretrained_encoder(run: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The encoder's weights from a pretraining run (folder or checkpoint file), and the run's metadata.

    Raises:
        CheckpointError: not a pretraining checkpoint, or made for another model configuration.
    """
    path, method_state, meta = _read_pretraining(run, model_cfg)
    return _encoder_of(path, method_state), meta


def load_pretrained(run: str | Path, model: SegmentationNet, decoder: bool = False) -> dict:
    """Start ``model`` from a pretraining run: its encoder strictly, and with ``decoder`` (``train.init_decoder``)
    its decoder from the U-Net of the run's SparK decoder, all but the output level. Returns the run's metadata.

    Raises:
        CheckpointError: naming the file, when it is not a pretraining run of ``model``'s configuration
        or its decoder does not fit.
    """
    path, method_state, meta = _read_pretraining(run, model.cfg)
    model.encoder.load_state_dict(_encoder_of(path, method_state), strict=True)
    if decoder:
        try:
            model.load_pretrained_decoder(pretrained_decoder_state(method_state))
        except ValueError as err:
            raise CheckpointError(f"checkpoint {path}: {err}") from None
    return meta


def pretraining_method(run: str | Path) -> str:
    """The method that made a pretraining run's encoder (its checkpoint's ``method``)."""
    _, meta = load_checkpoint(_checkpoint_path(run))
    return str(meta.get("method", "unknown"))


def model_config_of(run: str | Path) -> ModelConfig:
    """The model configuration a run's checkpoint was made with."""
    _, meta = load_checkpoint(_checkpoint_path(run))
    return build_section("model", meta["config"]["model"])


def finetune(
    cfg: Config, out_dir: str | Path, init: str | Path | None = None, split: DataSplit | None = None
) -> dict[str, Any]:
    """Segmentation fine-tuning on ``train.label_fraction`` of the labelled training cases.

    The network is ``model.seg_arch``'s (:func:`~amlp_core.models.build_segmentation_model`). The
    ViT's encoder starts from the pretraining run ``init`` (strict load) or from scratch; the plain
    U-Net (``unet``) has no encoder and always starts from scratch. Trains for the steps of
    :func:`train_segmentation`, writes ``checkpoint.pt`` (kind ``segmentation``) as it goes and at the end,
    and evaluates on the test cases at the end. Returns the evaluation.

    Raises:
        ConfigError: ``init`` given with ``model.seg_arch=unet``.
        CheckpointError: ``init`` is not a pretraining checkpoint for this model.
    """
    if init is not None and not has_encoder(cfg.model):
        raise ConfigError(
            f"cannot fine-tune model.seg_arch={cfg.model.seg_arch} from the pretraining run {init}: "
            "a plain U-Net has no encoder to load (omit --init to train it from scratch, or use "
            "model.seg_arch=vit)"
        )
    model = build_segmentation_model(cfg.model)
    init_meta: dict = {}
    if init is not None:
        assert isinstance(model, SegmentationNet)  # has_encoder: the ViT network
        init_meta = load_pretrained(init, model, decoder=cfg.train.init_decoder)
    return train_segmentation(
        model, cfg, out_dir, split, init_method=init_meta.get("method", "scratch"), init_from=str(init or "")
    )


def _privacy_ledger(cfg: Config, out: Path, phase: PrivatePhase, what: str) -> PrivacyLedger:
    """The ledger in ``out`` for the next stretch of ``phase`` (all that is still to come of the run),
    checked against ``privacy.budget`` before any step."""
    ledger = ready_ledger(out, cfg.privacy, cfg.train.batch_size, phase, [], what)
    log.info(
        "DP-SGD: noise multiplier %.3f, clip %g, sample rate %.3f, budget epsilon %g at delta %g",
        ledger.noise_multiplier,
        cfg.privacy.max_grad_norm,
        phase.rate(cfg.train.batch_size),
        cfg.privacy.budget,
        cfg.privacy.delta,
    )
    return ledger


def train_segmentation(
    model: torch.nn.Module,
    cfg: Config,
    out_dir: str | Path,
    split: DataSplit | None = None,
    init_method: str = "scratch",
    init_from: str = "",
) -> dict[str, Any]:
    """Train any segmentation network ``[B, C, *S] -> [B, K, *S]`` with Dice + CE, then evaluate.

    ``checkpoint.pt`` is written only for the class ``model.seg_arch`` names (what
    :func:`load_segmentation` rebuilds); another network is trained and evaluated without one.

    The budget is in optimiser steps (:func:`~amlp_core.engine.loops.finetune_budget`):
    ``train.finetune_steps``, or ``train.epochs`` epochs over all the labelled training cases, whatever
    ``train.label_fraction`` keeps; the loader cycles over the subset until they are done. The rate is
    set every step: linear warm-up over ``train.finetune_warmup`` of the steps, then cosine to 0. With
    ``train.max_minutes`` the schedule follows the elapsed share of that time budget (or of the steps,
    whichever is further), so a time-limited run still anneals. Under ``privacy.site_dp`` a step is one
    Poisson draw (an empty one included), and the ledger is planned and charged in those steps.
    """
    out, device = _prepare(cfg, out_dir)
    split = split or load_split(cfg)
    labelled = [s for s in split.train if s.label is not None]
    if not labelled:
        raise DataError(f"no labelled training cases in {cfg.data.path}: fine-tuning needs labels")
    subset = label_subset(labelled, cfg.train.label_fraction, cfg.train.seed)
    model.to(device)
    loader = make_loader(subset, cfg, augment=True, labels=True)
    optimizer = finetune_optimizer(model, cfg.train, pretrained=init_method != "scratch")
    steps = finetune_budget(cfg.train.finetune_steps, cfg.train.epochs, len(labelled), cfg.train.batch_size)
    log.info(
        "fine-tuning on %d of %d labelled cases (%s) for %d steps on %s",
        len(subset),
        len(labelled),
        init_method,
        steps,
        device,
    )
    meta = segmentation_meta(
        cfg, {str(k): v for k, v in split.class_names.items()}, init_method, init_from, len(subset)
    )
    saveable = isinstance(model, SEG_ARCH_CLASSES[cfg.model.seg_arch])  # what load_segmentation rebuilds
    ledger = (
        _privacy_ledger(
            cfg, out, PrivatePhase(rounds=1, cases=len(subset), steps=steps), f"fine-tuning {steps} steps in {out}"
        )
        if cfg.privacy.site_dp
        else None
    )
    start, saved_at, evaluated_at = time.monotonic(), [0], [0]
    every = cfg.train.eval_every if ledger is None else 0  # a private run evaluates at the end only

    def on_pass(metrics: dict[str, Any]) -> bool:
        """After every pass over the subset: metrics line, log, checkpoint (at most every CHECKPOINT_STEPS
        steps, and always at the end), and the time budget."""
        done, stop = metrics["step"], _out_of_time(start, cfg)
        record = {
            "loss": metrics.get("loss", float("nan")),
            "num_examples": metrics["num_examples"],
            "epoch": metrics["pass"],
            "step": done,
            "seconds": round(time.monotonic() - start, 2),
        }
        if every and split.test and done - evaluated_at[0] >= every and done < steps:  # the curve
            curve = evaluate_segmentation(
                model,
                split.test,
                cfg.model.img_size,
                cfg.model.num_classes,
                device,
                cfg.train.amp,
                slice_axis=cfg.data.slice_axis,
            )
            model.train()
            record.update({f"test_{k}": v for k, v in curve.items() if k.startswith("dice_")})
            evaluated_at[0] = done
        _append_metrics(out, record)
        log.info(
            "pass %d, step %d/%d loss %.4f%s",
            record["epoch"],
            done,
            steps,
            record["loss"],
            f" test Dice {record['test_dice_mean']:.4f}" if "test_dice_mean" in record else "",
        )
        if saveable and (done >= steps or stop or done - saved_at[0] >= CHECKPOINT_STEPS):
            save_checkpoint(
                out / CHECKPOINT, {"model": model.state_dict()}, {**meta, "epoch": record["epoch"], "step": done}
            )
            saved_at[0] = done
        if stop and done < steps:
            log.info("stopping after %d of %d steps: train.max_minutes=%s reached", done, steps, cfg.train.max_minutes)
        return stop

    metrics = finetune_for(
        model,
        optimizer,
        loader,
        device,
        cfg,
        steps,
        lambda k: _progress(k, steps, start, cfg),
        ledger=ledger,
        seed=cfg.train.seed,
        on_pass=on_pass,
    )
    privacy = {"epsilon": metrics["epsilon"], "delta": cfg.privacy.delta} if ledger else {}
    result = evaluate_segmentation(
        model,
        split.test,
        cfg.model.img_size,
        cfg.model.num_classes,
        device,
        cfg.train.amp,
        slice_axis=cfg.data.slice_axis,
    )
    result.update(
        train_seconds=round(time.monotonic() - start, 2),
        epochs=metrics["passes"],
        steps=metrics["steps"],
        labelled_cases=len(subset),
        **privacy,
    )
    (out / EVALUATION).write_text(json.dumps(result, indent=2))
    return result


def _progress(step: int, steps: int, start: float, cfg: Config) -> float:
    """Training progress in [0, 1] of fine-tuning step ``step`` of ``steps``: the share of the steps at the
    step's middle (so neither the first warm-up step nor the last decay step has a zero rate), or of the
    time budget ``train.max_minutes`` if that is further."""
    t = (step + 0.5) / steps
    if cfg.train.max_minutes > 0:
        t = max(t, (time.monotonic() - start) / (60 * cfg.train.max_minutes))
    return min(t, 1.0)


def load_segmentation(run: str | Path, device: torch.device | None = None) -> tuple[torch.nn.Module, dict]:
    """A fine-tuned segmentation model (the architecture its saved config names) and its checkpoint metadata."""
    path = _checkpoint_path(run)
    state, meta = load_checkpoint(path)
    require_meta(meta, path, kind="segmentation")
    require_architecture(meta, path)
    cfg = build_config(meta["config"])
    model = build_segmentation_model(cfg.model)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit its own model configuration: {e}") from None
    model.to(device or torch.device("cpu")).eval()
    return model, meta


def evaluate(
    run: str | Path, data_cfg_overrides: dict[str, Any] | None = None, device: str = "auto", all_cases: bool = False
) -> dict[str, Any]:
    """Dice per class of a fine-tuned model on the test cases of the data it names (or overrides)."""
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev)
    cfg = build_config(meta["config"])
    if data_cfg_overrides:
        cfg = build_config({f"data.{k}": v for k, v in data_cfg_overrides.items()}, base=cfg)
    split = load_split(cfg)
    cases = split.train + split.test if all_cases else split.test
    if not cases:
        raise DataError(f"no cases to evaluate in {cfg.data.path} (data.test_fraction={cfg.data.test_fraction})")
    result = evaluate_segmentation(
        model, cases, cfg.model.img_size, cfg.model.num_classes, dev, cfg.train.amp, slice_axis=cfg.data.slice_axis
    )
    result["class_names"] = meta.get("class_names", {})
    return result


def predict_file(run: str | Path, input_path: str | Path, output_path: str | Path, device: str = "auto") -> Path:
    """Segment one scan: NIfTI (or PNG) in, NIfTI label map out with the input's shape and affine.

    A 2D model segments a 3D volume slice by slice along ``data.slice_axis``.
    """
    dev = resolve_device(device)
    model, meta = load_segmentation(run, dev)
    cfg = build_config(meta["config"])
    image, affine = read_image(input_path)  # [C, *S]
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


def data_defaults(path: str, fmt: str = "auto", dims: int | None = None, as_slices: bool = False) -> dict[str, Any]:
    """Model and data settings that follow from the data, as flat config overrides.

    The built-in phantoms get a model of their own size with two classes (:func:`~amlp_core.presets.phantoms`);
    a dataset gets its class count from its labels and the region of interest of its kind
    (:data:`~amlp_core.presets.ROI`).
    """
    if path == "synthetic":
        return phantoms(dims or 3)
    index = discover(path, fmt)
    if index.class_names is None:
        raise DataError(f"{path}: no class names found; pass --set model.num_classes=K")
    data_dims = index.spatial_dims
    if dims is None:
        dims = 2 if as_slices else data_dims
    if dims == 2 and data_dims == 3:
        as_slices = True
    size = ROI["volume" if dims == 3 else ("slices" if as_slices else "image")]
    return {
        "model.spatial_dims": dims,
        "model.img_size": size,
        "model.num_classes": len(index.class_names),
        "data.as_slices": as_slices,
        "data.path": path,
        "data.format": fmt,
    }
