"""What a site's DP training still has to do, and the ledger made ready for its next stretch.

A federated site trains in rounds of two phases; a local run is one stretch. Either way the noise is
fixed once for everything still to come (so that the whole run spends the budget), and the next
stretch is checked against the budget before any step: :func:`ready_ledger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amlp_core.privacy.dp import sample_rate, steps_per_epoch
from amlp_core.privacy.ledger import PrivacyLedger

if TYPE_CHECKING:
    from amlp_core.config import Config, PrivacyConfig


@dataclass(frozen=True)
class PrivatePhase:
    """Private training still to come in one phase: ``rounds`` rounds (stretches) over ``cases`` cases,
    each ``epochs`` Poisson passes (pretraining) or, when ``steps`` > 0, that many optimiser steps."""

    rounds: int
    cases: int
    epochs: int = 0
    steps: int = 0
    name: str = ""  # the phase: pretrain | finetune ("": a local run's one phase)

    def rate(self, batch_size: int) -> float:
        """Poisson sampling rate of ``batch_size`` cases per batch on average."""
        return sample_rate(self.cases, batch_size)

    def round_steps(self, batch_size: int) -> int:
        """Optimiser steps (Poisson draws) of one round."""
        return self.steps if self.steps > 0 else self.epochs * steps_per_epoch(self.rate(batch_size))


def ready_ledger(
    folder: str | Path,
    privacy: PrivacyConfig,
    batch_size: int,
    now: PrivatePhase,
    later: Sequence[PrivatePhase],
    what: str,
) -> PrivacyLedger:
    """The ledger in ``folder`` for one round of ``now``: the noise fixed for ``now``'s rounds (this one
    included) and all of ``later``, and this round's steps checked against ``privacy.budget``.

    Raises:
        PrivacyError: an unreadable ledger, or one of another delta.
        PrivacyBudgetExceeded: this round would spend more than the budget (``what`` names it).
    """
    phases = [phase for phase in (now, *later) if phase.cases > 0 and phase.rounds > 0]
    plan = [(phase.rate(batch_size), phase.rounds * phase.round_steps(batch_size)) for phase in phases]
    names = [phase.name for phase in phases]
    split = None
    if privacy.pretrain_share > 0 and "pretrain" in names and "finetune" in names:  # (pretraining's first)
        split = (privacy.pretrain_share, plan[: names.index("finetune")])
    return PrivacyLedger.planned(
        folder,
        privacy.budget,
        privacy.delta,
        privacy.noise_multiplier,
        plan,
        now.rate(batch_size),
        now.round_steps(batch_size),
        what,
        now.name,
        split,
    )


def coverage(cfg: Config) -> str:
    """What a run's site-DP epsilon covers and what it does not, in a sentence for its summary (next to the
    epsilon): the phases under DP, an encoder pretrained without DP or brought from elsewhere, and the
    evaluation messages."""
    p, f = cfg.privacy, cfg.federation
    pretrained = f.pretrain_rounds > 0 and cfg.model.seg_arch != "unet"
    if p.phases == "both" and p.pretrain_share > 0:
        parts = [
            f"pretraining and fine-tuning: pretraining's noise spends {p.pretrain_share:.0%} of the budget by "
            "itself (privacy.pretrain_share), fine-tuning's the rest of it, composed"
        ]
    elif p.phases == "both":
        parts = [
            "pretraining and fine-tuning: one noise level, fixed at the first private round for every planned step "
            "of both phases, so each phase spends the budget in proportion to its steps"
        ]
    else:
        parts = ["fine-tuning only"]
        if pretrained:
            parts.append(
                "the encoder was pretrained on the sites' own scans WITHOUT DP (privacy.phases=finetune): what it "
                "learnt from them is not covered"
            )
    if f.init_encoder:
        parts.append(f"the initial encoder ({f.init_encoder}) was made outside this run and is outside the budget")
    if cfg.train.semi_supervised != "none":
        parts.append("the unlabelled cases fine-tuning learns from are records too")
    parts.append("one record is one patient; evaluation replies are not covered")
    return "; ".join(parts)
