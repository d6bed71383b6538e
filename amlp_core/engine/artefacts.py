"""Everything a run writes and reads back: its folder's file names, checkpoint metadata, the loaders of
pretraining and segmentation checkpoints (each checked: kind, architecture, model configuration), and
the typed records of a federation: the server's checkpoint and a site's state between rounds.

A run folder holds ``config.yaml``, ``checkpoint.pt``, ``metrics.jsonl`` and, after evaluation,
``evaluation.json``; an unfinished pretraining also ``resume.pt``. A federation's folder holds
``server_checkpoint.pt`` (:class:`ServerCheckpoint`); a site's state folder ``{phase}_r{round}.pt``
files (:func:`save_site_state`). Every record names its ``kind`` and ``version``; one of another
kind, or of a version this code does not read, is refused with a message that says which.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from amlp_core.config import ARCHITECTURE, Config, ModelConfig, build_config, save_config
from amlp_core.engine.checkpoint import load_checkpoint, require_meta, save_checkpoint
from amlp_core.errors import CheckpointError, ConfigError
from amlp_core.methods import PretrainMethod
from amlp_core.models import (
    PRETRAIN_UNET_PREFIX,
    SegmentationNet,
    build_segmentation_model,
    encoder_state,
    pretrained_decoder_state,
)

log = logging.getLogger(__name__)


CHECKPOINT = "checkpoint.pt"


CONFIG = "config.yaml"


METRICS = "metrics.jsonl"


EVALUATION = "evaluation.json"


#: Pretraining: what an unfinished run needs to go on where it stopped (removed when it finishes).
RESUME = "resume.pt"


#: A federation's checkpoint after every round (:class:`ServerCheckpoint`).
SERVER_CHECKPOINT = "server_checkpoint.pt"


#: The kinds of record, each with the version of its layout this code writes and reads. Records written
#: before records carried a version have the version-1 layout and read as version 1. (A model's network
#: layout is versioned apart: :data:`~amlp_core.config.ARCHITECTURE`.)
KIND_PRETRAIN, PRETRAIN_VERSION = "pretrain", 1  # a pretraining run's checkpoint.pt (the encoder)
KIND_RESUME, RESUME_VERSION = "pretrain-resume", 1  # an unfinished pretraining's resume.pt
KIND_FINETUNE_RESUME, FINETUNE_RESUME_VERSION = "finetune-resume", 1  # an unfinished fine-tuning's resume.pt
KIND_SEGMENTATION, SEGMENTATION_VERSION = "segmentation", 1  # a fine-tuned model's checkpoint.pt
KIND_SERVER, SERVER_CHECKPOINT_VERSION = "server", 1  # a federation's server_checkpoint.pt
KIND_SITE_STATE, SITE_STATE_VERSION = "site-state", 1  # a site's state between rounds
KIND_RESULTS, RESULTS_VERSION = "results", 1  # a federation's results/rounds.json


def check_record(meta: Mapping[str, Any], path: str | Path, kind: str, version: int) -> None:
    """Refuse a record that is not of ``kind`` at ``version``.

    Raises:
        CheckpointError: naming the file, what it is and what was expected.
    """
    require_meta(meta, path, kind=kind)
    have = meta.get("version", 1)
    if have != version:
        newer = "a newer fedamlp made it" if isinstance(have, int) and have > version else "an older layout"
        raise CheckpointError(
            f"{kind} record {path} is version {have!r}, this fedamlp reads version {version} ({newer})"
        )


@dataclass
class ServerCheckpoint:
    """The server's state after a finished round: enough to resume the run where it stopped.

    ``arrays`` are the global weights (flat state dict), ``strategy`` the strategy's own state (FedAdam's
    moments), ``rows`` the results so far, ``accountant`` server DP's accountant (JSON), ``digest`` the
    hash of every setting that decides the run's result (a resume with other settings is refused).
    """

    phase: str
    round: int
    digest: str
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    class_names: dict[str, str] = field(default_factory=dict)
    accountant: str | None = None
    plan: str | None = None  # the run's plan (JSON, amlp_core.data.plan.plan_text): a resumed run keeps it

    KIND: ClassVar[str] = KIND_SERVER

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path``."""
        meta = {
            "kind": self.KIND,
            "version": SERVER_CHECKPOINT_VERSION,
            "phase": self.phase,
            "round": self.round,
            "digest": self.digest,
            "rows": self.rows,
            "class_names": self.class_names,
            "accountant": self.accountant,
            "plan": self.plan,
        }
        return save_checkpoint(path, {"arrays": self.arrays, "strategy": self.strategy}, meta)

    @classmethod
    def load(cls, path: str | Path) -> ServerCheckpoint:
        """Read and check a server checkpoint.

        Raises:
            CheckpointError: unreadable, not a server checkpoint, of another version, or incomplete.
        """
        state, meta = load_checkpoint(path)
        check_record(meta, path, cls.KIND, SERVER_CHECKPOINT_VERSION)
        try:
            return cls(
                phase=str(meta["phase"]),
                round=int(meta["round"]),
                digest=str(meta["digest"]),
                arrays=_saved_weights(state, "arrays", path),
                strategy=dict(state.get("strategy") or {}),
                rows=list(meta.get("rows", [])),
                class_names=dict(meta.get("class_names", {})),
                plan=str(meta["plan"]) if meta.get("plan") else None,
                accountant=meta.get("accountant"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"server checkpoint {path} is incomplete ({type(err).__name__}: {err})") from None


def save_site_state(path: str | Path, phase: str, round_: int, state: Mapping[str, Any]) -> Path:
    """A site's local state after ``phase`` round ``round_`` (decoder, optimiser, running statistics):
    named state dicts, written atomically."""
    meta = {"kind": KIND_SITE_STATE, "version": SITE_STATE_VERSION, "phase": phase, "round": round_}
    return save_checkpoint(path, state, meta)


def load_site_state(path: str | Path, phase: str) -> dict[str, Any]:
    """A site's state saved by :func:`save_site_state` for ``phase``.

    Raises:
        CheckpointError: unreadable, not a site state of ``phase``, or of another version.
    """
    state, meta = load_checkpoint(path)
    check_record({"kind": KIND_SITE_STATE, **meta}, path, KIND_SITE_STATE, SITE_STATE_VERSION)  # (v1: kindless)
    if meta.get("phase", phase) != phase:
        raise CheckpointError(f"site state {path} is of phase {meta['phase']!r}, not {phase!r}")
    return state


def append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def pretrained_meta(cfg: Config, epoch: int) -> dict[str, Any]:
    """The metadata of a pretraining checkpoint (kind ``pretrain``), as :func:`load_pretrained_encoder` reads it."""
    return {
        "kind": KIND_PRETRAIN,
        "version": PRETRAIN_VERSION,
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
        "kind": KIND_SEGMENTATION,
        "version": SEGMENTATION_VERSION,
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


def export_encoder(folder: Path, cfg: Config, method_state: dict[str, torch.Tensor], epoch: int, **extra: Any) -> Path:
    """A pretraining run folder (``checkpoint.pt`` of kind ``pretrain`` and ``config.yaml``) holding
    ``method_state``, which ``fedamlp finetune --init`` and ``federation.init_encoder`` accept; ``extra``
    goes into the metadata (e.g. how a federation made it)."""
    save_checkpoint(folder / CHECKPOINT, {"method": method_state}, {**pretrained_meta(cfg, epoch), **extra})
    save_config(cfg, folder / CONFIG)
    return folder


def export_segmentation(folder: Path, cfg: Config, model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """A segmentation model folder (``checkpoint.pt`` with :func:`segmentation_meta` metadata and
    ``config.yaml``) that ``fedamlp predict`` and ``evaluate`` load."""
    save_checkpoint(folder / CHECKPOINT, {"model": model_state}, meta)
    save_config(cfg, folder / CONFIG)
    return folder


def saved_config(meta: Mapping[str, Any], path: str | Path) -> Config:
    """The configuration a checkpoint's metadata holds, checked like any other.

    Raises:
        CheckpointError: naming the file, when there is none or it is not a valid configuration.
    """
    raw = meta.get("config")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("model"), Mapping):
        raise CheckpointError(f"checkpoint {path} holds no run configuration")
    try:
        return build_config(dict(raw))
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} holds an invalid configuration: {err}") from None


def _saved_weights(state: Mapping[str, Any], key: str, path: str | Path) -> dict[str, torch.Tensor]:
    weights = state.get(key)
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path} holds no {key} weights")
    return dict(weights)


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


def checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    return run / CHECKPOINT if run.is_dir() else run


def _read_pretraining(run: str | Path, model_cfg: ModelConfig) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A pretraining run's checkpoint (folder or file), read once and checked: ``(path, method state, meta)``.

    Raises:
        CheckpointError: not a pretraining checkpoint, or made for another model configuration.
    """
    path = checkpoint_path(run)
    state, meta = load_checkpoint(path)
    check_record(meta, path, KIND_PRETRAIN, PRETRAIN_VERSION)
    require_architecture(meta, path)
    have = saved_config(meta, path).model
    if have != model_cfg:
        raise CheckpointError(f"checkpoint {path} was made for model {have}, not {model_cfg}")
    return path, _saved_weights(state, "method", path), meta


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


def load_pretrained_shared(
    run: str | Path, model_cfg: ModelConfig, decoder: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """What a federation starts fine-tuning from in a pretraining run (folder or checkpoint file), under the
    method's keys: the encoder (``encoder.``), and with ``decoder`` (``train.init_decoder``) SparK's U-Net decoder;
    and the run's metadata.

    Raises:
        CheckpointError: not a pretraining checkpoint, made for another model configuration, or (``decoder``)
            one without a U-Net decoder.
    """
    path, method_state, meta = _read_pretraining(run, model_cfg)
    shared = {f"encoder.{k}": v for k, v in _encoder_of(path, method_state).items()}
    if decoder:
        unet = {k: v for k, v in method_state.items() if k.startswith(PRETRAIN_UNET_PREFIX)}
        if not unet:
            raise CheckpointError(f"checkpoint {path} holds no U-Net pretraining decoder to start the decoder from")
        shared.update(unet)
    return shared, meta


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
    _, meta = load_checkpoint(checkpoint_path(run))
    return str(meta.get("method", "unknown"))


def model_config_of(run: str | Path) -> ModelConfig:
    """The model configuration a run's checkpoint was made with."""
    path = checkpoint_path(run)
    _, meta = load_checkpoint(path)
    return saved_config(meta, path).model


def load_segmentation(
    run: str | Path, device: torch.device | None = None, allow_unfinished: bool = False
) -> tuple[torch.nn.Module, dict]:
    """A fine-tuned segmentation model (the architecture its saved config names) and its checkpoint metadata.

    Raises:
        CheckpointError: not a segmentation checkpoint of this version, weights that do not fit or are not
            finite, or (unless ``allow_unfinished``) a fine-tuning that stopped before its last step.
    """
    path = checkpoint_path(run)
    state, meta = load_checkpoint(path)
    check_record(meta, path, KIND_SEGMENTATION, SEGMENTATION_VERSION)
    require_architecture(meta, path)
    if meta.get("finished") is False and not allow_unfinished:  # (models from before the flag: finished)
        raise CheckpointError(
            f"model {run} is unfinished: its fine-tuning stopped at step {meta.get('step')} of {meta.get('steps')} "
            f"(go on with `fedamlp finetune --resume --out {run}`, or pass --allow-unfinished to use it as it is)"
        )
    cfg = saved_config(meta, path)
    weights = _saved_weights(state, "model", path)
    if bad := next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None):
        raise CheckpointError(f"checkpoint {path} holds weights that are not finite ({bad}): it cannot segment")
    model = build_segmentation_model(cfg.model)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit its own model configuration: {e}") from None
    model.to(device or torch.device("cpu")).eval()
    return model, meta
