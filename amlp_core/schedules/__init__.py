"""Schedules as pure functions of training progress."""

from amlp_core.schedules.amr import amr_ratio, federated_progress
from amlp_core.schedules.lr import warmup_cosine

__all__ = ["amr_ratio", "federated_progress", "warmup_cosine"]
