"""Faults injected into a simulated site, for tests and demonstrations (``federation.inject``).

A spec is a comma-separated list of ``SITE:KIND[=VALUE][@WHEN[:ROUND]]``, for example
``site1:crash@finetune:2,site2:poison``:

- ``SITE``: the simulated site's name (``site0``, ``site1``, ...);
- ``WHEN``: ``pretrain``, ``finetune`` (training rounds) or ``evaluate``; every kind of message when
  left out. ``ROUND``: that round only; every round when left out.
- ``KIND``: what the site does.

=========  ==========================================================================
crash      answers with an error instead of working
offline    answers only after the round's deadline (``federation.round_timeout``)
slow       answers ``VALUE`` seconds late (default 2)
nan        sends its weights with one value set to NaN
poison     sends ``global + VALUE x (local - global)`` (default 100: a scaled update)
flip       sends ``global - (local - global)`` (a sign-flipped update)
inflate    reports ``num-examples`` = ``VALUE`` (default 1e9)
shape      sends its first array reshaped to ``(1,)``
=========  ==========================================================================

Only a simulated site obeys the spec: a deployed site (one with a site file) ignores it, so a
server cannot order a hospital to misbehave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from amlp_core.errors import ConfigError

KINDS = {
    "crash": 0.0,
    "offline": 0.0,
    "slow": 2.0,
    "nan": 0.0,
    "poison": 100.0,
    "flip": 0.0,
    "inflate": 1e9,
    "shape": 0.0,
}
WHEN = ("pretrain", "finetune", "evaluate")
WEIGHT_FAULTS = ("nan", "poison", "flip", "shape")  # change the weights of a training reply


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``site`` does ``kind`` (with ``value``) at ``when`` (all if empty), ``round`` (all if 0)."""

    site: str
    kind: str
    value: float
    when: str = ""
    round: int = 0

    def applies(self, site: str, when: str, round_: int) -> bool:
        return self.site == site and self.when in ("", when) and self.round in (0, round_)


def parse_faults(spec: str) -> list[Fault]:
    """The faults of a ``federation.inject`` spec; ConfigError naming the bad entry."""
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        faults.append(_parse_entry(entry))
    return faults


def _parse_entry(entry: str) -> Fault:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid federation.inject entry {entry!r}: {why} (SITE:KIND[=VALUE][@WHEN[:ROUND]])")

    head, _, when = entry.partition("@")
    site, sep, kind = head.partition(":")
    if not sep or not site or not kind:
        raise bad("expected SITE:KIND")
    kind, has_value, raw = kind.partition("=")
    if kind not in KINDS:
        raise bad(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    try:
        value = float(raw) if has_value else KINDS[kind]
    except ValueError:
        raise bad(f"value {raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise bad(f"value {raw!r} must be a finite number >= 0")
    when, _, round_text = when.partition(":")
    if when and when not in WHEN:
        raise bad(f"unknown round kind {when!r}; one of {', '.join(WHEN)}")
    if round_text and not (round_text.isdigit() and int(round_text) >= 1):
        raise bad(f"round {round_text!r} must be a whole number >= 1")
    return Fault(site, kind, value, when, int(round_text) if round_text else 0)


def corrupt(
    fault: Fault, global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The weights a site with a weight fault sends instead of ``local_state``.

    Args:
        global_state / local_state: ``{name: tensor}``, the round's global and the site's own weights.
    """
    out = dict(local_state)
    first = next(k for k, v in local_state.items() if v.is_floating_point())
    if fault.kind == "nan":
        out[first] = local_state[first].clone().flatten()
        out[first][0] = float("nan")
        out[first] = out[first].reshape(local_state[first].shape)
    elif fault.kind in ("poison", "flip"):
        scale = -1.0 if fault.kind == "flip" else fault.value
        for k, v in local_state.items():
            if v.is_floating_point():
                out[k] = global_state[k] + scale * (v - global_state[k])
    elif fault.kind == "shape":
        out[first] = local_state[first].flatten()[:1].clone()
    return out
