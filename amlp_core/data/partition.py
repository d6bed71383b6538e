"""Cutting one dataset into sites for a simulated federation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amlp_core.errors import ConfigError


def partition_names(
    names: Sequence[str], num_sites: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0, min_per_site: int = 1
) -> list[list[str]]:
    """Deal case names to ``num_sites`` sites.

    ``iid``: shuffled, then dealt round robin (sizes differ by at most one). ``dirichlet``:
    quantity skew, site shares drawn from Dirichlet(alpha) (smaller alpha, more skew), every
    site keeping at least ``min_per_site`` cases. Deterministic for the same names (in any
    order), sites and seed.

    Raises:
        ConfigError: too few names for the sites, or an unknown scheme.
    """
    names = sorted(names)
    if num_sites < 1 or len(names) < num_sites * min_per_site:
        raise ConfigError(f"cannot cut {len(names)} cases into {num_sites} sites of at least {min_per_site}")
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    if scheme == "iid":
        return [order[s::num_sites] for s in range(num_sites)]
    if scheme != "dirichlet":
        raise ConfigError(f"unknown partition scheme {scheme!r}: expected iid or dirichlet")
    spare = len(names) - num_sites * min_per_site
    shares = rng.dirichlet(np.full(num_sites, alpha))
    extra = np.floor(shares * spare).astype(int)
    extra[np.argsort(-shares)[: spare - extra.sum()]] += 1  # hand out the rounding remainder
    counts = extra + min_per_site
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [order[bounds[s] : bounds[s + 1]] for s in range(num_sites)]
