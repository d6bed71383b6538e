"""Cutting one dataset into sites for a simulated federation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from amlp_core.config import PARTITIONS
from amlp_core.errors import ConfigError

_CATEGORY_TRIES = 100  # Dirichlet draws of the category partition before it gives up on min_per_site


def partition_names(
    names: Sequence[str],
    num_sites: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_per_site: int = 1,
    groups: Mapping[str, str] | None = None,
    categories: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Deal case names to ``num_sites`` sites.

    ``iid``: shuffled, then dealt round robin (sizes differ by at most one). ``dirichlet``:
    quantity skew, site shares drawn from Dirichlet(alpha) (smaller alpha, more skew), every
    site keeping at least ``min_per_site`` cases. ``category``: class skew, as Hsu et al. (2019) cut
    by label: each category's cases (``categories``, e.g. BUSI's benign / malignant / normal) are
    shared among the sites by its own Dirichlet(alpha) draw, so one site holds mostly benign images
    and another mostly malignant ones. Deterministic for the same names (in any order), sites and seed.

    ``groups`` (``{name: group key}``, near-duplicates) deal a group to one site as a whole; without
    groups each name is its own and the deal is as described above.

    Raises:
        ConfigError: too few names for the sites, or an unknown scheme.
    """
    names = sorted(names)
    if num_sites < 1 or len(names) < num_sites * min_per_site:
        raise ConfigError(f"cannot cut {len(names)} cases into {num_sites} sites of at least {min_per_site}")
    if scheme not in PARTITIONS:
        raise ConfigError(f"unknown partition scheme {scheme!r}: expected one of {', '.join(PARTITIONS)}")
    units = group_units(names, groups)
    rng = np.random.default_rng(seed)
    order = [units[i] for i in rng.permutation(len(units))]
    if scheme == "iid":
        return _deal(order, num_sites)
    if scheme == "category":
        return _by_category(order, num_sites, alpha, rng, min_per_site, categories or {})
    spare = len(names) - num_sites * min_per_site
    shares = rng.dirichlet(np.full(num_sites, alpha))
    extra = np.floor(shares * spare).astype(int)
    extra[np.argsort(-shares)[: spare - extra.sum()]] += 1  # hand out the rounding remainder
    counts = extra + min_per_site
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    _cut(order, np.cumsum(counts), sites)
    return sites


def group_units(names: Sequence[str], groups: Mapping[str, str] | None) -> list[list[str]]:
    """``names`` gathered by group (``groups``: name -> group key; a name without one is its own group),
    sorted by key, each unit sorted: what a split or a partition deals as a whole."""
    units: dict[str, list[str]] = {}
    for name in sorted(names):
        units.setdefault((groups or {}).get(name, name), []).append(name)
    return [units[key] for key in sorted(units)]


def _cut(units: list[list[str]], bounds: np.ndarray, sites: list[list[str]]) -> None:
    """Append ``units``, in order, to ``sites``: the flat order of their cases cut at the cumulative
    ``bounds``; a unit stays whole on the site its first case falls to."""
    site, dealt = 0, 0
    for unit in units:
        while site < len(sites) - 1 and dealt >= bounds[site]:
            site += 1
        sites[site] += unit
        dealt += len(unit)


def _deal(units: list[list[str]], num_sites: int) -> list[list[str]]:
    """Each unit in turn to the site holding fewest cases (the first such site): round robin for singletons."""
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for unit in units:
        min(sites, key=len).extend(unit)
    return sites


def _by_category(
    units: list[list[str]],
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_per_site: int,
    categories: Mapping[str, str],
) -> list[list[str]]:
    """Each category's units (in the given order) cut among the sites by a Dirichlet(alpha) draw of its
    own; redrawn until every site holds at least ``min_per_site`` cases."""
    by_category: dict[str, list[list[str]]] = {}
    for unit in units:
        by_category.setdefault(categories.get(unit[0], ""), []).append(unit)
    for _ in range(_CATEGORY_TRIES):
        sites: list[list[str]] = [[] for _ in range(num_sites)]
        for category in sorted(by_category):
            these = by_category[category]
            total = sum(map(len, these))
            _cut(these, np.cumsum(rng.dirichlet(np.full(num_sites, alpha))) * total, sites)
        if min(map(len, sites)) >= min_per_site:
            return sites
    raise ConfigError(
        f"cannot cut {sum(map(len, units))} cases by category into {num_sites} sites of at least "
        f"{min_per_site} with federation.dirichlet_alpha={alpha}: raise the alpha or use fewer sites"
    )
