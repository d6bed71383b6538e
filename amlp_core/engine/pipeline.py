"""Whole jobs at one site: pretrain, fine-tune (the command line's ``pretrain`` and ``finetune``).

A run writes its folder through :mod:`amlp_core.engine.artefacts`; the training itself is the engine's
(:mod:`amlp_core.engine.local`), which the federation's client calls round by round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amlp_core.config import Config, save_config
from amlp_core.data import (
    label_subset,
)
from amlp_core.data.dataset import record_count
from amlp_core.engine.artefacts import (
    CHECKPOINT,
    CONFIG,
    EVALUATION,
    FINETUNE_RESUME_VERSION,
    KIND_FINETUNE_RESUME,
    KIND_RESUME,
    METRICS,
    RESUME,
    RESUME_VERSION,
    append_metrics,
    check_record,
    load_pretrained,
    save_pretrained,
    segmentation_meta,
)
from amlp_core.engine.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from amlp_core.engine.device import make_generator, resolve_device, seed_everything, set_threads
from amlp_core.engine.lesions import EMPTY_SHARE, LESION_DICE, inference_args
from amlp_core.engine.local import (
    Stretch,
    finetune_for,
    finetune_records,
    make_loader,
    pretrain_epochs,
    run_epochs,
    semi_training,
)
from amlp_core.engine.loops import evaluate_segmentation, finetune_budget
from amlp_core.engine.optim import finetune_optimizer, pretrain_optimizer
from amlp_core.engine.semi import SemiTraining
from amlp_core.engine.split import DataSplit, load_split, with_plan
from amlp_core.errors import CheckpointError, ConfigError, DataError
from amlp_core.methods import build_method
from amlp_core.models import (
    SEG_ARCH_CLASSES,
    SegmentationNet,
    build_segmentation_model,
    has_encoder,
)
from amlp_core.privacy import PrivacyLedger, PrivatePhase, ready_ledger
from amlp_core.runfolder import RunFolderError, clear_run, holds_run

log = logging.getLogger(__name__)
CURVE_KEYS = (LESION_DICE, EMPTY_SHARE)  # besides Dice per class, what a curve point records


CHECKPOINT_STEPS = 10  # fine-tuning: a checkpoint after a pass at most this often (in steps), and at the end


def _prepare(
    cfg: Config, out_dir: str | Path, keep_metrics: int = 0, overwrite: bool = False
) -> tuple[Path, torch.device]:
    """Make ``out_dir`` (with ``overwrite``: remove the run in it first), write the config, seed and set
    threads. ``metrics.jsonl`` starts empty, or keeps its first ``keep_metrics`` epochs (a resumed
    pretraining). Called once every check of the start has passed, so a refused start changes nothing."""
    out = Path(out_dir)
    if overwrite:
        clear_run(out)
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


#: A stopped run's resume.pt of each phase: its record kind and version, its name in messages, and the count
#: (epochs, steps) it stopped after.
_RESUMES = {
    "pretrain": (KIND_RESUME, RESUME_VERSION, "pretraining", "epoch"),
    "finetune": (KIND_FINETUNE_RESUME, FINETUNE_RESUME_VERSION, "fine-tuning", "step"),
}


def _resume_state(out: Path, cfg: Config, phase: str = "pretrain") -> dict[str, Any] | None:
    """The saved state of an unfinished ``phase`` (pretrain, finetune) of ``cfg`` in ``out`` (see
    :data:`RESUME`) with the epoch (pretraining; and ``passes``, fine-tuning) or step it stopped after, or
    None (none there, or one of other settings: the run starts again, and says so)."""
    kind, version, what, count = _RESUMES[phase]
    path = out / RESUME
    if not path.is_file():
        return None
    try:
        state, meta = load_checkpoint(path)
        check_record(meta, path, kind, version)
    except CheckpointError as err:
        log.warning("%s; %s starts again", err, what)
        return None
    done = meta.get(count)
    within = isinstance(done, int) and done >= 1 and (phase != "pretrain" or done < cfg.train.epochs)
    if meta.get("digest") != _resume_digest(cfg) or not within:
        log.warning("%s is another %s's (other settings); this one starts again", path, what)
        return None
    return {**state, count: done, **({"passes": meta["passes"]} if phase == "finetune" else {})}


def check_resume(out: str | Path, cfg: Config, phase: str = "pretrain") -> None:
    """RunFolderError unless ``out`` is empty or holds a stopped ``phase`` (pretrain or finetune) of ``cfg``
    to go on with."""
    what = _RESUMES[phase][2]
    if holds_run(out) and _resume_state(Path(out), cfg, phase) is None:
        raise RunFolderError(
            f"run folder {out} holds no stopped {what} of these settings to resume (it has finished, or "
            "was made with other settings); pass --overwrite to start it again, or choose another folder"
        )


@dataclass
class _Streams:
    """What a stopped pretraining needs to go on exactly where it stopped (:data:`RESUME`): the method's
    weights, the optimiser, the mask generator, the loader's shuffle stream and torch's global stream."""

    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    shuffle: torch.Generator

    def state(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "shuffle": self.shuffle.get_state(),
            "torch": torch.get_rng_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.shuffle.set_state(state["shuffle"])
        torch.set_rng_state(state["torch"])


def _out_of_time(start: float, cfg: Config) -> bool:
    return cfg.train.max_minutes > 0 and time.monotonic() - start > 60 * cfg.train.max_minutes


def pretrain(
    cfg: Config, out_dir: str | Path, split: DataSplit | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Self-supervised pretraining of ``cfg.method.name`` on the training cases' images.

    Writes ``checkpoint.pt`` (kind ``pretrain``) after every epoch. A run stopped before its last epoch
    (killed, or ``train.max_minutes``) goes on from its last finished epoch when started again with the
    same settings in the same folder (:data:`RESUME`), and ends where the uninterrupted run ends.
    With ``overwrite`` the run already in ``out_dir`` is removed once the start's checks have passed
    (its privacy ledger stays). Returns the last epoch's metrics.

    Raises:
        ConfigError: ``model.seg_arch=unet``, whose plain U-Net has no encoder to pretrain.
        PrivacyBudgetExceeded: under DP, the first epoch would overspend (before anything is written).
    """
    if not has_encoder(cfg.model):
        raise ConfigError(
            f"model.seg_arch={cfg.model.seg_arch} has no encoder to pretrain (a plain U-Net trains "
            "from scratch with `fedamlp finetune`); pretrain with model.seg_arch=vit"
        )
    split = split or load_split(cfg)  # bad data is refused before anything is written
    cfg = with_plan(cfg, split)  # the checkpoint carries the plan, so that predict applies it
    resumed = None if overwrite else _resume_state(Path(out_dir), cfg)
    first = resumed["epoch"] if resumed else 0
    epochs = cfg.train.epochs
    private = cfg.privacy.site_dp and cfg.privacy.private("pretrain")

    def epoch_ledger(epoch: int) -> PrivacyLedger | None:
        """Under DP, one stretch per epoch: its steps are on the ledger before the epoch's checkpoint is."""
        if not private:
            return None
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        phase = PrivatePhase(rounds=epochs - epoch, cases=record_count(split.train), epochs=1)
        return _privacy_ledger(cfg, Path(out_dir), phase, f"pretraining epoch {epoch + 1} in {out_dir}")

    first_ledger = epoch_ledger(first) if first < epochs else None  # overspending: refused before any write
    out, device = _prepare(cfg, out_dir, keep_metrics=first, overwrite=overwrite)
    method = build_method(cfg.model, cfg.method, private=private).to(device)
    loader = make_loader(split.train, cfg, augment=True, labels=False)
    optimizer = pretrain_optimizer(method, cfg.train)
    generator = make_generator(cfg.train.seed, device)
    streams = _Streams(method, optimizer, generator, loader.generator)
    if resumed:  # go on exactly where the stopped run was: weights, optimizer, mask and shuffle streams
        streams.restore(resumed)
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
        ledger = first_ledger if epoch == first else epoch_ledger(epoch)
        metrics = pretrain_epochs(
            method,
            optimizer,
            loader,
            device,
            cfg,
            run_epochs(epoch, epoch + 1, epochs),
            generator,
            Stretch("pretrain", epoch + 1, cfg.train.seed + epoch, ledger),
            total_epochs=epochs,
        )
        metrics.update(epoch=epoch + 1, seconds=round(time.monotonic() - start, 2))
        append_metrics(out, metrics)
        log.info("epoch %d/%d loss %.4f ratio %.2f", epoch + 1, epochs, metrics["loss"], metrics.get("ratio", 0))
        save_pretrained(out / CHECKPOINT, method, cfg, epoch + 1)
        if epoch + 1 < epochs:
            meta = {"kind": KIND_RESUME, "version": RESUME_VERSION, "epoch": epoch + 1, "digest": _resume_digest(cfg)}
            save_checkpoint(out / RESUME, streams.state(), meta)
        if _out_of_time(start, cfg):
            minutes = cfg.train.max_minutes
            log.info("stopping after %d epochs: train.max_minutes=%s reached (go on with --resume)", epoch + 1, minutes)
            break
    if metrics.get("epoch") == epochs:
        (out / RESUME).unlink(missing_ok=True)
    return metrics


def finetune(
    cfg: Config,
    out_dir: str | Path,
    init: str | Path | None = None,
    split: DataSplit | None = None,
    overwrite: bool = False,
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
    split = split or load_split(cfg)  # bad data is refused before anything is written
    cfg = with_plan(cfg, split)  # the network takes the plan's input size
    seed_everything(cfg.train.seed)  # the initial weights follow the seed, not the process's random state
    model = build_segmentation_model(cfg.model)
    init_meta: dict = {}
    if init is not None:
        assert isinstance(model, SegmentationNet)  # has_encoder: the ViT network
        init_meta = load_pretrained(init, model, decoder=cfg.train.init_decoder)
    return train_segmentation(
        model,
        cfg,
        out_dir,
        split,
        init_method=init_meta.get("method", "scratch"),
        init_from=str(init or ""),
        overwrite=overwrite,
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
    overwrite: bool = False,
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
    split = split or load_split(cfg)  # bad data is refused before anything is written
    cfg = with_plan(cfg, split)  # the checkpoint carries the plan, so that predict applies it
    labelled = [s for s in split.train if s.label is not None]
    if not labelled:
        raise DataError(f"no labelled training cases in {cfg.data.path}: fine-tuning needs labels")
    subset = label_subset(labelled, cfg.train.label_fraction, cfg.train.seed)
    steps = finetune_budget(cfg.train.finetune_steps, cfg.train.epochs, len(labelled), cfg.train.batch_size)
    resumed = None if overwrite else _resume_state(Path(out_dir), cfg, "finetune")
    if resumed is not None and cfg.privacy.site_dp:
        raise RunFolderError(
            f"run folder {out_dir} holds a stopped private fine-tuning: its steps were never charged to the ledger, "
            "so it cannot go on; pass --overwrite to start it again (the ledger keeps what was charged)"
        )
    ledger = None
    if cfg.privacy.site_dp:  # an overspending run is refused before anything is written
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        phase = PrivatePhase(rounds=1, cases=finetune_records(cfg, split.train, subset), steps=steps)
        ledger = _privacy_ledger(cfg, Path(out_dir), phase, f"fine-tuning {steps} steps in {out_dir}")
    first_step, first_pass = (resumed["step"], resumed["passes"]) if resumed else (0, 0)
    out, device = _prepare(cfg, out_dir, keep_metrics=first_pass, overwrite=overwrite)
    model.to(device)
    loader = make_loader(subset, cfg, augment=True, labels=True)
    optimizer = finetune_optimizer(model, cfg.train, pretrained=init_method != "scratch", privacy=cfg.privacy)
    log.info(
        "fine-tuning on %d of %d labelled cases (%s) for %d steps on %s%s",
        len(subset),
        len(labelled),
        init_method,
        steps,
        device,
        f", resumed after step {first_step}" if resumed else "",
    )
    meta = segmentation_meta(
        cfg, {str(k): v for k, v in split.class_names.items()}, init_method, init_from, len(subset)
    )
    saveable = isinstance(model, SEG_ARCH_CLASSES[cfg.model.seg_arch])  # what load_segmentation rebuilds
    start = time.monotonic()

    def test_dice() -> dict[str, Any]:
        """Dice of the model now on the test cases (the curve's points and the final evaluation)."""
        m = cfg.model
        return evaluate_segmentation(
            model,
            split.test,
            m.img_size,
            m.num_classes,
            device,
            cfg.train.amp,
            slice_axis=cfg.data.slice_axis,
            **inference_args(m),
        )

    # The test-Dice curve (also under DP: the test cases are no training record, and a forward pass in eval
    # mode without gradients leaves Opacus's per-case gradients untouched).
    every = cfg.train.eval_every if split.test else 0

    def progress_at(k: int) -> float:  # (k counts the steps of this call: a resumed run goes on where it stopped)
        return _progress(first_step + k, steps, start, cfg)

    semi = semi_training(cfg, model, split.train, subset, cfg.train.seed, progress_at, first_pass)
    streams = _FinetuneStreams(model, optimizer, loader.generator, semi)
    if resumed:
        streams.restore(resumed)
    on_pass = _PassRecorder(model, cfg, out, steps, meta if saveable else None, test_dice, every, start)
    on_pass.resume_from(first_step, first_pass, streams if saveable and ledger is None else None)
    metrics = finetune_for(
        model,
        optimizer,
        loader,
        device,
        cfg,
        steps - first_step,
        progress_at,
        Stretch("finetune", 1, cfg.train.seed, ledger),
        on_pass=on_pass,
        semi=semi,
        first_pass=first_pass,
    )
    covers = f"fine-tuning; the encoder from {init_from} was made outside this budget" if init_from else "fine-tuning"
    covers += "; one record is one patient"
    privacy = {"epsilon": metrics["epsilon"], "delta": cfg.privacy.delta, "dp_covers": covers} if ledger else {}
    result: dict[str, Any]
    if split.test:
        result = test_dice()
    else:  # nothing to evaluate on: say so rather than fail after the training
        log.warning("no test cases (data.test_fraction=%g): the final evaluation is skipped", cfg.data.test_fraction)
        result = {"num_examples": 0, "evaluation": "skipped: no test cases"}
    result.update(
        train_seconds=round(time.monotonic() - start, 2),
        epochs=first_pass + metrics["passes"],
        steps=first_step + metrics["steps"],
        labelled_cases=len(subset),
        **privacy,
    )
    atomic_write_text(out / EVALUATION, json.dumps(result, indent=2))
    return result


@dataclass
class _PassRecorder:
    """After every pass of a fine-tuning run over its labelled subset: the ``metrics.jsonl`` line (with the
    test Dice every ``every`` steps: the curve), the log line, the checkpoint (when ``meta`` is given: at
    most every CHECKPOINT_STEPS steps, and always at the end), and the time budget. Returns whether to stop."""

    model: torch.nn.Module
    cfg: Config
    out: Path
    steps: int
    meta: dict[str, Any] | None  # the checkpoint's metadata; None: the network is not saved
    test_dice: Callable[[], dict[str, Any]]
    every: int
    start: float
    saved_at: int = 0
    evaluated_at: int = 0
    first_step: int = 0  # a resumed run's steps and passes before this call
    first_pass: int = 0
    streams: _FinetuneStreams | None = None  # what resume.pt keeps of an unfinished run (None: nothing)

    def resume_from(self, step: int, passes: int, streams: _FinetuneStreams | None) -> None:
        """Count on from a resumed run's ``step`` and ``passes``; with ``streams``, keep resume.pt."""
        self.first_step = self.saved_at = self.evaluated_at = step
        self.first_pass, self.streams = passes, streams

    def __call__(self, metrics: dict[str, Any]) -> bool:
        done, stop, steps = self.first_step + metrics["step"], _out_of_time(self.start, self.cfg), self.steps
        record = {
            **{k: v for k, v in metrics.items() if k.startswith("semi_")},
            "loss": metrics.get("loss", float("nan")),
            "num_examples": metrics["num_examples"],
            "epoch": self.first_pass + metrics["pass"],
            "step": done,
            "seconds": round(time.monotonic() - self.start, 2),
        }
        if self.every and done - self.evaluated_at >= self.every and done < steps:  # the curve
            curve = self.test_dice()
            self.model.train()
            record.update({f"test_{k}": v for k, v in curve.items() if k.startswith("dice_") or k in CURVE_KEYS})
            self.evaluated_at = done
        append_metrics(self.out, record)
        test = f" test Dice {record['test_dice_mean']:.4f}" if "test_dice_mean" in record else ""
        log.info("pass %d, step %d/%d loss %.4f%s", record["epoch"], done, steps, record["loss"], test)
        if self.meta is not None and (done >= steps or stop or done - self.saved_at >= CHECKPOINT_STEPS):
            finished = done >= steps or stop  # (a time budget, train.max_minutes, ends a run as planned)
            state = {"model": self.model.state_dict()}
            meta = {**self.meta, "epoch": record["epoch"], "step": done, "steps": steps, "finished": finished}
            if self.streams is not None and not finished:  # first what resumes it, then the model it resumes
                resume = {"kind": KIND_FINETUNE_RESUME, "version": FINETUNE_RESUME_VERSION, "step": done}
                resume.update(passes=record["epoch"], digest=_resume_digest(self.cfg))
                save_checkpoint(self.out / RESUME, self.streams.state(), resume)
            save_checkpoint(self.out / CHECKPOINT, state, meta)
            if finished:
                (self.out / RESUME).unlink(missing_ok=True)
            self.saved_at = done
        if stop and done < steps:
            log.info(
                "stopping after %d of %d steps: train.max_minutes=%s reached", done, steps, self.cfg.train.max_minutes
            )
        return stop


@dataclass
class _FinetuneStreams:
    """What a stopped fine-tuning needs to go on (:data:`RESUME`): the network, the optimiser, the loader's
    shuffle stream, torch's global stream, and semi-supervised, the teacher and the unlabelled shuffle."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator
    semi: SemiTraining | None

    def state(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "shuffle": self.shuffle.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.semi is not None:
            state["teacher"] = self.semi.objective.teacher.state_dict()
            state["semi_shuffle"] = self.semi.loader.generator.get_state()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.shuffle.set_state(state["shuffle"])
        torch.set_rng_state(state["torch"])
        if self.semi is not None and "teacher" in state:
            self.semi.objective.teacher.load_state_dict(state["teacher"])
            self.semi.loader.generator.set_state(state["semi_shuffle"])


def _progress(step: int, steps: int, start: float, cfg: Config) -> float:
    """Training progress in [0, 1] of fine-tuning step ``step`` of ``steps``: the share of the steps at the
    step's middle (so neither the first warm-up step nor the last decay step has a zero rate), or of the
    time budget ``train.max_minutes`` if that is further."""
    t = (step + 0.5) / steps
    if cfg.train.max_minutes > 0:
        t = max(t, (time.monotonic() - start) / (60 * cfg.train.max_minutes))
    return min(t, 1.0)
