"""The fault-injection spec (amlp_core/faults.py): parsed strictly, applied to real weights."""

from __future__ import annotations

import pytest
import torch

from amlp_core.config import FederationConfig
from amlp_core.errors import ConfigError
from amlp_core.faults import Fault, corrupt, parse_faults


def test_a_spec_is_parsed_with_defaults_and_scopes():
    faults = parse_faults("site1:crash@finetune:2, site2:poison, site0:slow=0.5@evaluate")
    assert faults == [
        Fault("site1", "crash", 0.0, "finetune", 2),
        Fault("site2", "poison", 100.0),
        Fault("site0", "slow", 0.5, "evaluate"),
    ]
    assert faults[0].applies("site1", "finetune", 2) and not faults[0].applies("site1", "finetune", 3)
    assert not faults[0].applies("site1", "pretrain", 2) and not faults[0].applies("site2", "finetune", 2)
    assert faults[1].applies("site2", "evaluate", 7)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("site1", "expected SITE:KIND"),
        ("site1:explode", "unknown kind 'explode'"),
        ("site1:slow=fast", "value 'fast' is not a number"),
        ("site1:slow=-1", "must be a finite number >= 0"),
        ("site1:poison=inf", "must be a finite number >= 0"),
        ("site1:crash@train", "unknown round kind 'train'"),
        ("site1:crash@finetune:0", "round '0' must be a whole number >= 1"),
        ("site1:crash@finetune:x", "round 'x'"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_entry(spec, why):
    with pytest.raises(ConfigError, match="federation.inject entry") as e:
        FederationConfig(inject=spec)
    assert why in str(e.value) and spec.split(",")[0] in str(e.value)


def test_weight_faults_change_what_the_site_sends():
    g = {"w": torch.zeros(2, 2), "n": torch.tensor(3)}
    local = {"w": torch.ones(2, 2), "n": torch.tensor(4)}
    assert torch.isnan(corrupt(Fault("s", "nan", 0), g, local)["w"]).sum() == 1
    assert torch.equal(corrupt(Fault("s", "poison", 100), g, local)["w"], torch.full((2, 2), 100.0))
    assert torch.equal(corrupt(Fault("s", "flip", 0), g, local)["w"], -torch.ones(2, 2))
    assert corrupt(Fault("s", "shape", 0), g, local)["w"].shape == (1,)
    assert torch.equal(corrupt(Fault("s", "poison", 100), g, local)["n"], torch.tensor(4))  # counters untouched
    assert torch.equal(local["w"], torch.ones(2, 2))  # the site's own weights are not changed in place
