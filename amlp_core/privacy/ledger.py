"""A site's privacy ledger: one RDP accountant for the whole run, kept on the site's disk.

The ledger holds every private training stretch as Opacus' RDP accountant records it,
``(noise_multiplier, sample_rate, steps)``, plus one readable entry per round (phase, round,
cumulative epsilon). It is rewritten atomically after every private round, so a restarted
site goes on from what it has already spent; a damaged ledger is an error, never a reset
(forgetting spent privacy would be a silent overspend).

Before a round, :meth:`PrivacyLedger.check` computes what the epsilon would be after it and
refuses the round when that passes the budget: the site stops training rather than overspend.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from amlp_core.atomic import atomic_write_text
from amlp_core.errors import AMLPError
from amlp_core.reading import read_text

log = logging.getLogger(__name__)
LEDGER_FILE = "privacy_ledger.json"
FORMAT_VERSION = 1
#: One private training stretch as the RDP accountant counts it: (noise multiplier, sample rate, steps).
Stretch = tuple[float, float, int]


class PrivacyError(AMLPError):
    """A privacy ledger cannot be read, or differs from the run's privacy settings."""


class PrivacyBudgetExceeded(AMLPError):
    """A round would take the site's epsilon past its budget; the site does not train."""


def epsilon_of(history: Iterable[Stretch], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``history`` (0 for an empty history)."""
    from opacus.accountants import RDPAccountant  # here, not at import: Opacus costs seconds at every start

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def calibrate_noise(
    budget: float,
    delta: float,
    plan: Sequence[tuple[float, int]],
    spent: Sequence[Stretch] = (),
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier that keeps ``spent`` + ``plan`` within ``budget``.

    Args:
        budget: epsilon the whole run may spend.
        delta: the delta epsilon is reported at.
        plan: the private stretches still to come, ``(sample_rate, steps)`` each, all at the
            one noise multiplier sought.
        spent: stretches already recorded.

    Raises:
        PrivacyBudgetExceeded: when ``spent`` alone already reaches the budget.
    """
    if epsilon_of(spent, delta) >= budget:
        raise PrivacyBudgetExceeded(f"the privacy budget epsilon={budget} is already spent")

    def eps(sigma: float) -> float:
        return epsilon_of([*spent, *((sigma, q, n) for q, n in plan)], delta)

    low, high = 0.05, 1.0
    while eps(high) > budget:
        low, high = high, high * 2
        if high > 1e4:
            steps, rate = sum(n for _, n in plan), max((q for q, _ in plan), default=0.0)
            raise PrivacyBudgetExceeded(
                f"no noise multiplier keeps {steps:,} private steps at sample rate up to {rate:.3g} within "
                f"privacy.budget={budget:g} (privacy.delta={delta:g}): plan fewer steps (train.finetune_steps, "
                "the rounds), a smaller sample rate (train.batch_size, more cases) or a larger budget"
            )
    while high - low > tolerance * high:  # eps falls as sigma grows
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > budget else (low, mid)
    return high


class PrivacyLedger:
    """The privacy spent by one site, at one delta, against one budget.

    Attributes:
        noise: the noise multiplier of each phase (``""``: of every phase), fixed at the first private round
            of the run (calibrated or configured) and kept, so that a restart does not change the plan.
        noise_multiplier: that of the stretch being prepared (:meth:`fix_noise`).
        history: the accountant's stretches.
        rounds: one readable record per private round.
    """

    def __init__(self, path: str | Path, budget: float, delta: float) -> None:
        self.path = Path(path)
        self.budget, self.delta = budget, delta
        self.noise: dict[str, float] = {}
        self.noise_multiplier: float | None = None
        self.history: list[Stretch] = []
        self.rounds: list[dict] = []

    @classmethod
    def open(cls, folder: str | Path, budget: float, delta: float) -> PrivacyLedger:
        """The ledger in ``folder`` (a new, empty one if there is none yet).

        Raises:
            PrivacyError: the file is unreadable, or was written at another delta.
        """
        ledger = cls(Path(folder) / LEDGER_FILE, budget, delta)
        if not ledger.path.exists():
            return ledger
        try:
            raw = json.loads(read_text(ledger.path, "privacy ledger", PrivacyError))
            if raw.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT_VERSION}")
            history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
            rounds, sigma, delta_then = list(raw["rounds"]), raw["noise_multiplier"], float(raw["delta"])
            noise = {str(k): float(v) for k, v in raw.get("phase_noise", {}).items()}
            if sigma is not None:
                noise[""] = float(sigma)
            if any(not (math.isfinite(v) and v > 0) for v in noise.values()):
                raise ValueError(f"noise multipliers {noise} are not all positive")
        except (PrivacyError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise PrivacyError(
                f"privacy ledger {ledger.path} cannot be read ({e}); it is never reset "
                "automatically: restore it from a backup or start a new state directory"
            ) from None
        if not math.isclose(delta_then, delta):
            raise PrivacyError(
                f"privacy ledger {ledger.path} was kept at delta={delta_then}, the run asks "
                f"privacy.delta={delta}: use the same delta for the whole run"
            )
        ledger.history, ledger.rounds, ledger.noise = history, rounds, noise
        ledger.noise_multiplier = noise.get("")
        return ledger

    @classmethod
    def planned(
        cls,
        folder: str | Path,
        budget: float,
        delta: float,
        configured_noise: float,
        plan: Sequence[tuple[float, int]],
        sample_rate: float,
        steps: int,
        what: str,
        phase: str = "",
        split: tuple[float, Sequence[tuple[float, int]]] | None = None,
    ) -> PrivacyLedger:
        """The ledger in ``folder``, ready for ``steps`` Poisson draws at ``sample_rate``: its noise fixed
        for the whole ``plan`` (:meth:`fix_noise`) and those steps checked against the budget (:meth:`check`),
        before any step is taken. One place for what a site's round and a local fine-tuning run both do.

        Raises:
            PrivacyError: an unreadable ledger, or one of another delta.
            PrivacyBudgetExceeded: the steps would spend more than the budget (``what`` names them).
        """
        ledger = cls.open(folder, budget, delta)
        ledger.fix_noise(configured_noise, plan, phase, split)
        ledger.check(sample_rate, steps, what)
        return ledger

    def fix_noise(
        self,
        configured: float,
        plan: Sequence[tuple[float, int]],
        phase: str = "",
        split: tuple[float, Sequence[tuple[float, int]]] | None = None,
    ) -> float:
        """The noise multiplier of ``phase``'s stretches, fixed (and saved) at the run's first private round:
        ``configured``, or, when that is 0, calibrated so that ``plan`` (``(sample_rate, steps)`` stretches
        still to come) spends the rest of the budget, at one noise level.

        ``split`` ``(share, pretraining plan)`` (``privacy.pretrain_share``, at the first private pretraining
        round of a run private in both phases) fixes two: pretraining's, so that its own stretches spend
        ``share`` of the budget, and fine-tuning's, so that both phases together spend all of it (the
        accountant composes them; the rest of ``plan`` is fine-tuning's)."""
        if not self.noise:
            if split is not None and not configured:
                share, pre = split
                finetune = list(plan[len(pre) :])
                sigma_pre = calibrate_noise(self.budget * share, self.delta, pre, self.history)
                spent = [*self.history, *((sigma_pre, q, n) for q, n in pre)]
                self.noise = {
                    "pretrain": sigma_pre,
                    "finetune": calibrate_noise(self.budget, self.delta, finetune, spent),
                }
            else:
                self.noise = {"": configured or calibrate_noise(self.budget, self.delta, plan, self.history)}
            self.save()
            log.info(
                "privacy: noise multiplier %s for a budget of epsilon %g at delta %g",
                self._noise_text(),
                self.budget,
                self.delta,
            )
        self.noise_multiplier = self.noise.get(phase, self.noise.get(""))
        if self.noise_multiplier is None:
            raise PrivacyError(f"privacy ledger {self.path} holds no noise for phase {phase!r} ({self._noise_text()})")
        return self.noise_multiplier

    def _noise_text(self) -> str:
        return ", ".join(f"{k}: {v:.3f}" if k else f"{v:.3f}" for k, v in self.noise.items())

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, at the ledger's delta."""
        return epsilon_of(self.history, self.delta)

    def check(self, sample_rate: float, steps: int, what: str) -> float:
        """Epsilon after ``steps`` more steps at ``sample_rate``; refuses when it passes the budget.

        Raises:
            PrivacyBudgetExceeded: naming ``what``, the epsilon now, after, and the budget.
        """
        if self.noise_multiplier is None:
            raise PrivacyError("the ledger has no noise multiplier yet: set or calibrate it first")
        now = self.epsilon
        after = epsilon_of([*self.history, (self.noise_multiplier, sample_rate, steps)], self.delta)
        if after > self.budget * (1 + 1e-6):
            raise PrivacyBudgetExceeded(
                f"{what} would take epsilon from {now:.3f} to {after:.3f}, past the budget {self.budget:g} "
                f"(delta {self.delta:g}); the site stops training rather than overspend"
            )
        return after

    def record(self, phase: str, round_: int, stretches: Iterable[Stretch]) -> float:
        """Add one round's stretches (as the accountant counted them), save, return the new epsilon."""
        new = [(float(s), float(q), int(n)) for s, q, n in stretches if n > 0]
        self.history.extend(new)
        eps = self.epsilon
        self.rounds.append(
            {"phase": phase, "round": round_, "steps": sum(n for _, _, n in new), "epsilon": round(eps, 6)}
        )
        self.save()
        log.info(
            "privacy: %s round %d spent %d steps, epsilon now %.3f of %.3g (delta %g)",
            phase,
            round_,
            sum(n for _, _, n in new),
            eps,
            self.budget,
            self.delta,
        )
        return eps

    def save(self) -> None:
        payload = {
            "format": FORMAT_VERSION,
            "delta": self.delta,
            "budget": self.budget,
            "noise_multiplier": self.noise.get("") if self.noise else self.noise_multiplier,
            "phase_noise": {k: v for k, v in self.noise.items() if k},
            "history": [list(h) for h in self.history],
            "rounds": self.rounds,
            "epsilon": round(self.epsilon, 6),
        }
        atomic_write_text(self.path, json.dumps(payload, indent=1))
