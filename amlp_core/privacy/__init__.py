"""Differential privacy at a site: Opacus DP-SGD and the site's privacy ledger (no Flower here)."""

from amlp_core.privacy.dp import (
    PrivateTraining,
    charged_training,
    check_private,
    noise_only_step,
    poisson_loader,
    sample_rate,
    steps_per_epoch,
)
from amlp_core.privacy.ledger import (
    LEDGER_FILE,
    PrivacyBudgetExceeded,
    PrivacyError,
    PrivacyLedger,
    calibrate_noise,
    epsilon_of,
)
from amlp_core.privacy.plan import PrivatePhase, coverage, ready_ledger

__all__ = [
    "LEDGER_FILE",
    "PrivacyBudgetExceeded",
    "PrivacyError",
    "PrivacyLedger",
    "PrivatePhase",
    "PrivateTraining",
    "calibrate_noise",
    "coverage",
    "charged_training",
    "check_private",
    "epsilon_of",
    "noise_only_step",
    "poisson_loader",
    "ready_ledger",
    "sample_rate",
    "steps_per_epoch",
]
