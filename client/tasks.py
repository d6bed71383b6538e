"""One round of work at a site: the translation between round instructions and amlp_core.

Every function here takes the site, the global weights as a state dict and the server's
instructions, and returns what may leave the site: weights and aggregate numbers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from amlp_core import protocol as P
from amlp_core.config import PlanConfig
from amlp_core.data import label_subset
from amlp_core.data.dataset import record_count
from amlp_core.data.plan import read_plan_text
from amlp_core.data.transforms import fit_to_roi
from amlp_core.engine import local
from amlp_core.engine.board import mask_picture, prediction_picture
from amlp_core.engine.device import resolve_device
from amlp_core.engine.lesions import inference_args
from amlp_core.engine.local import Epoch
from amlp_core.engine.loops import evaluate_segmentation, finetune_budget, predict_volume
from amlp_core.errors import ConfigError
from amlp_core.methods import build_method, mask_ratio_at
from amlp_core.privacy import PrivatePhase, ready_ledger
from amlp_core.schedules import federated_progress
from client.site import RoundRefused, Site

log = logging.getLogger(__name__)
RATIO_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Instructions:
    """The server's instructions for one round, read from the message's ConfigRecord."""

    phase: str
    round: int
    total_rounds: int
    local_epochs: int
    expected_ratio: float
    digest: str
    proximal_mu: float
    local_steps: int = 0  # fine-tuning: federation.finetune_local_steps (0: local epochs over all labelled cases)
    semi: str = ""  # fine-tuning: the server's semi-supervised settings (protocol.semi_settings)
    plan: PlanConfig | None = None  # the run's plan (every round message carries it)

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> Instructions:
        try:
            phase = str(record[P.PHASE])
            return cls(
                phase=phase,
                round=int(record[P.GLOBAL_ROUND]),
                total_rounds=int(record[P.TOTAL_ROUNDS]),
                local_epochs=int(record[P.LOCAL_EPOCHS]),
                expected_ratio=float(record.get(P.EXPECTED_RATIO, -1.0)),
                digest=str(record[P.CONFIG_DIGEST]),
                proximal_mu=float(record.get(P.PROXIMAL_MU, 0.0)),
                local_steps=int(record[P.LOCAL_STEPS]) if phase == P.FINETUNE else 0,
                semi=str(record[P.SEMI]) if phase == P.FINETUNE else "",
                plan=server_plan(record),
            )
        except KeyError as e:
            raise RoundRefused(f"the server's message lacks {e.args[0]!r}: server and site versions differ") from None


def server_plan(record: Mapping[str, Any]) -> PlanConfig:
    """The run's plan in a message of the server.

    Raises:
        RoundRefused: no plan, or one that is not a valid decided plan.
    """
    if P.PLAN not in record:
        raise RoundRefused(f"the server's message lacks {P.PLAN!r}: server and site versions differ")
    try:
        return read_plan_text(record[P.PLAN], "the server")
    except ConfigError as e:
        raise RoundRefused(str(e)) from None


def round_seed(seed: int, site: int, phase: str, round_: int) -> int:
    """A seed per (run seed, site, phase, round): a re-run round repeats exactly."""
    key = f"{seed}/{site}/{phase}/{round_}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def _check(site: Site, ins: Instructions) -> None:
    if ins.plan is not None:
        site.use_plan(ins.plan)  # (before reading site.cfg: the plan sets the network's input size)
    cfg, fed = site.cfg, site.cfg.federation
    if ins.digest != P.config_digest(cfg):
        raise RoundRefused(
            f"model/method configuration differs from the server's (digest {ins.digest} at the "
            f"server, {P.config_digest(cfg)} here): update the site or the run config"
        )
    planned = fed.pretrain_rounds if ins.phase == P.PRETRAIN else fed.finetune_rounds
    if (ins.total_rounds, ins.local_epochs) != (planned, fed.local_epochs):
        raise RoundRefused(
            f"the server plans {ins.total_rounds} {ins.phase} rounds of {ins.local_epochs} local "
            f"epochs, this site {planned} of {fed.local_epochs}"
        )
    if ins.phase == P.FINETUNE and ins.local_steps != fed.finetune_local_steps:
        raise RoundRefused(
            f"the server plans {_steps_plan(ins.local_steps)} per fine-tuning round "
            f"(federation.finetune_local_steps={ins.local_steps}), this site "
            f"{_steps_plan(fed.finetune_local_steps)} (federation.finetune_local_steps="
            f"{fed.finetune_local_steps}): update the site or the run config"
        )
    if ins.phase == P.FINETUNE and ins.semi != P.semi_settings(cfg):
        raise RoundRefused(
            f"the server fine-tunes with the semi-supervised settings {ins.semi}, this site with "
            f"{P.semi_settings(cfg)}: update the site or the run config"
        )


def _steps_plan(steps: int) -> str:
    return f"{steps} local steps" if steps else "local epochs over all labelled cases"


def local_finetune_steps(site: Site) -> int:
    """This site's optimiser steps per fine-tuning round: ``federation.finetune_local_steps``, or
    ``local_epochs`` epochs over all its labelled training cases (before ``train.label_fraction``)."""
    cfg = site.cfg
    labelled = sum(s.label is not None for s in site.split.train)
    return finetune_budget(
        cfg.federation.finetune_local_steps, cfg.federation.local_epochs, labelled, cfg.train.batch_size
    )


def site_mask_ratio(site: Site, round_: int, local_epoch: int = 0) -> float:
    """The masking ratio this site computes for a pretraining round, from the round counter alone."""
    fed = site.cfg.federation
    t = federated_progress(round_, local_epoch, fed.local_epochs, fed.pretrain_rounds)
    return mask_ratio_at(site.cfg.method, t)


def pretrain_round(
    site: Site, global_state: dict[str, torch.Tensor], ins: Instructions
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local pretraining for ``local_epochs`` epochs from the global encoder.

    The masking ratio is the AMR value of the federated progress
    ``t = (round - 1 + epoch / local_epochs) / total_rounds``, constant within a local epoch, so
    every site masks alike in the same round. The site refuses the round when the ratio the
    server expects differs from its own.
    """
    _check(site, ins)
    own = site_mask_ratio(site, ins.round)
    if abs(own - ins.expected_ratio) > RATIO_TOLERANCE:
        raise RoundRefused(
            f"masking ratio mismatch in pretraining round {ins.round}: the server expects "
            f"{ins.expected_ratio:.6f}, this site computes {own:.6f} (AMR schedule or version skew)"
        )
    epochs = [
        Epoch(
            (ins.round - 1) * ins.local_epochs + e,
            federated_progress(ins.round, e, ins.local_epochs, ins.total_rounds),
            federated_progress(ins.round, e + 1, ins.local_epochs, ins.total_rounds),
        )
        for e in range(ins.local_epochs)
    ]
    try:
        shared, kept, metrics = local.pretrain_round(
            site.cfg,
            site.split.train,
            global_state,
            site.state.load_before(P.PRETRAIN, ins.round),
            epochs,
            _round(site, ins, f"{site.name} pretrain r{ins.round}"),
        )
    except local.WeightsMismatch as e:
        raise RoundRefused(str(e)) from None
    site.state.save(P.PRETRAIN, ins.round, kept)
    site.board.scalars("pretrain", metrics, ins.round)
    _mask_picture(site, kept, federated_progress(ins.round, 0, ins.local_epochs, ins.total_rounds), ins.round)
    return shared, {
        P.NUM_EXAMPLES: len(site.split.train),
        P.UNIT_WEIGHT: 1,
        P.LOSS: metrics.get("loss", float("nan")),
        P.MASK_RATIO: metrics.get("ratio", own),
        **_privacy_reply(metrics),
    }


def _round(site: Site, ins: Instructions, desc: str) -> local.Round:
    """The engine's view of this round: its number, seed, ledger (when private) and FedProx term."""
    p = site.cfg.privacy
    ledger = None
    if p.site_dp and p.private(ins.phase):
        now, later = _private_phases(site, ins)
        ledger = ready_ledger(
            site.state.root,
            p,
            site.cfg.train.batch_size,
            now,
            later,
            f"site {site.name}: {ins.phase} round {ins.round}",
        )
    return local.Round(
        number=ins.round,
        total=ins.total_rounds,
        seed=round_seed(site.cfg.train.seed, site.index, ins.phase, ins.round),
        ledger=ledger,
        proximal_mu=ins.proximal_mu,
        desc=desc,
    )


def _privacy_reply(metrics: dict[str, float]) -> dict[str, float]:
    """The round's cumulative epsilon, when it was private: the one privacy figure that leaves the site."""
    return {P.EPSILON: metrics["epsilon"]} if "epsilon" in metrics else {}


def finetune_round(
    site: Site, global_state: dict[str, torch.Tensor], ins: Instructions
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Local segmentation training from the global model, for this site's local steps
    (:func:`local_finetune_steps`), cycling over its labelled subset.

    The rate follows the steps over the whole run: step ``k`` of round ``r`` is at the federated progress
    ``(r - 1 + (k + 1/2) / steps) / total_rounds``, linear warm-up over ``train.finetune_warmup`` of it,
    then cosine to 0.
    """
    _check(site, ins)
    subset = _labelled_subset(site)
    if not subset:
        raise RoundRefused(f"site {site.name} has no labelled training cases for fine-tuning")
    try:
        weights, kept, metrics = local.finetune_round(
            site.cfg,
            subset,
            global_state,
            site.state.load_before(P.FINETUNE, ins.round),
            local_finetune_steps(site),
            _round(site, ins, f"{site.name} finetune r{ins.round}"),
            pretrained=site.cfg.federation.encoder_pretrained,
            train=site.split.train,
        )
    except local.WeightsMismatch as e:
        raise RoundRefused(str(e)) from None
    site.state.save(P.FINETUNE, ins.round, kept)
    site.board.scalars("finetune", metrics, ins.round)
    pool = metrics["semi_unlabelled"]  # the unlabelled cases the round learnt from (0: supervised)
    return weights, {
        P.NUM_EXAMPLES: len(subset) + (pool if site.cfg.train.semi_site_weight == "all" else 0),
        P.UNIT_WEIGHT: 1,
        P.LOSS: metrics.get("loss", float("nan")),
        P.SEMI_UNLABELLED: pool,
        **_privacy_reply(metrics),
    }


def declaration(site: Site) -> dict[str, int]:
    """The numbers of cases behind this site's pretraining, fine-tuning and evaluation replies."""
    return {
        P.DECLARED_TRAIN: len(site.split.train),
        P.DECLARED_LABELLED: len(_labelled_subset(site)),
        P.DECLARED_TEST: len(site.split.test),
    }


def _labelled_subset(site: Site) -> list:
    """The site's fine-tuning cases: ``train.label_fraction`` of its labelled training cases (may be empty)."""
    labelled = [s for s in site.split.train if s.label is not None]
    return label_subset(labelled, site.cfg.train.label_fraction, site.cfg.train.seed) if labelled else []


def _private_phases(site: Site, ins: Instructions) -> tuple[PrivatePhase, list[PrivatePhase]]:
    """This round's phase (its rounds from this one on) and the private phases after it, in this site's numbers."""
    cfg, fed = site.cfg, site.cfg.federation

    def phase(name: str, rounds: int) -> PrivatePhase:
        if name == P.PRETRAIN:
            return PrivatePhase(rounds, record_count(site.split.train), epochs=fed.local_epochs, name=name)
        records = local.finetune_records(cfg, site.split.train, _labelled_subset(site))
        return PrivatePhase(rounds, records, steps=local_finetune_steps(site), name=name)

    total = fed.pretrain_rounds if ins.phase == P.PRETRAIN else fed.finetune_rounds
    now = phase(ins.phase, total - ins.round + 1)
    later = (
        [phase(P.FINETUNE, fed.finetune_rounds)] if ins.phase == P.PRETRAIN and cfg.privacy.private(P.FINETUNE) else []
    )
    return now, later


def _mask_picture(site: Site, kept: dict, progress: float, round_: int) -> None:
    """Where this round's mask falls on the site's first training case, beside its label, into the site's own
    TensorBoard (never sent). A method without a patch mask (ACE) draws nothing."""
    cfg = site.cfg
    case = min(site.split.train, key=lambda s: s.name)
    image, label = fit_to_roi(case.image, case.label, cfg.model.img_size, None)  # the centre crop
    method = build_method(cfg.model, cfg.method)
    method.load_state_dict(kept["method"])
    method.eval()
    with torch.no_grad():
        out = method.training_step(torch.from_numpy(image)[None], progress, torch.Generator().manual_seed(round_))
    if out.mask is not None:
        picture = mask_picture(image, label, out.mask.masked[0], cfg.model.grid_size)
        site.board.image(f"pretrain/mask over {case.name}", picture, round_)


def evaluate_round(site: Site, global_state: dict[str, torch.Tensor], round_: int = 0) -> dict[str, float]:
    """Dice per class of the global model on the site's test cases (their mean over cases only); with the
    server's ``round_``, also into the site's own TensorBoard, with the prediction on its first test case."""
    cfg, device = site.cfg, resolve_device(site.cfg.train.device)
    if not site.split.test:
        raise RoundRefused(f"site {site.name} has no test cases to evaluate on")
    try:
        model = local.segmentation_model(cfg, global_state).to(device)
    except local.WeightsMismatch as e:
        raise RoundRefused(str(e)) from None
    result = evaluate_segmentation(
        model,
        site.split.test,
        cfg.model.img_size,
        cfg.model.num_classes,
        device,
        cfg.train.amp,
        desc=f"{site.name} evaluate",
        slice_axis=cfg.data.slice_axis,
        **inference_args(cfg.model),
    )
    result[P.NUM_EXAMPLES] = result.pop("num_examples")
    if round_:
        site.board.scalars("evaluate", result, round_)
        case = min(site.split.test, key=lambda s: s.name)
        probs = predict_volume(
            model, case.image, cfg.model.img_size, device, cfg.train.amp, slice_axis=cfg.data.slice_axis
        )
        picture = prediction_picture(case.image, case.label, probs.argmax(0).numpy())
        site.board.image(f"evaluate/prediction on {case.name}", picture, round_)
    return result
