"""A site's configuration and data, built once per process from the Flower context.

- Deployment: the node config names a site file (``site-config``, YAML with the keys of
  :data:`amlp_core.config.SITE_KEYS`) that says where the hospital's data and state are (never the
  run's submitter) and what the site requires of a run (client/terms.py). The site keeps
  each run's state (decoder, optimizer, privacy ledger) in ``STATE_DIR/run-<digest>``, the
  digest of the run's configuration: a resumed run finds its state, another run starts clean.
- Simulation: the node config carries ``partition-id`` / ``num-partitions``; the site's share
  of one dataset (or its own synthetic phantoms) follows from the run config.

The data is read and checked at the first message; a problem becomes that site's error
(:class:`~amlp_core.errors.DataError`) and is not cached, so a fixed dataset is picked up. The cases are
kept as read (their fingerprint answers the server's first query) until the server's plan arrives, then
brought onto it once (:meth:`Site.use_plan`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amlp_core.config import Config, PlanConfig, apply_site_file, build_config, read_site_file
from amlp_core.data.plan import PlanMisfit, describe, planned_config
from amlp_core.engine.board import BOARD_DIR, Board
from amlp_core.engine.split import DataSplit, plan_split, read_split
from amlp_core.errors import AMLPError, DataError
from client.state import SiteState
from client.terms import check_terms

log = logging.getLogger(__name__)

SITE_CONFIG = "site-config"  # node config key: path of the site YAML
PARTITION_ID = "partition-id"  # node config keys set by Flower's simulation engine
NUM_PARTITIONS = "num-partitions"


class RoundRefused(AMLPError):
    """The site will not run this round (configuration, plan or version skew); the message says why."""


@dataclass
class Site:
    """Everything one hospital needs to answer messages."""

    cfg: Config  # the run's config; on the server's plan once it has come (use_plan)
    index: int
    num_sites: int
    raw: DataSplit  # the cases as read, and their fingerprint
    state: SiteState
    planned: DataSplit | None = None  # the cases on the run's plan (use_plan)
    _board: Board | None = None

    @property
    def name(self) -> str:
        return self.cfg.site.name

    @property
    def board(self) -> Board:
        """The site's own TensorBoard folder (``STATE/tensorboard``): its scalars and pictures, which stay here."""
        if self._board is None:
            self._board = Board(self.state.root / BOARD_DIR)
        return self._board

    @property
    def split(self) -> DataSplit:
        """The site's cases on the run's plan."""
        if self.planned is None:
            raise RoundRefused(f"site {self.name} has no plan from the server yet: server and site versions differ")
        return self.planned

    def use_plan(self, plan: PlanConfig) -> None:
        """Bring the cases onto the server's plan (once; the same plan again is a no-op).

        Raises:
            RoundRefused: the data do not fit the plan, or the plan changed during the run.
        """
        if self.planned is not None:
            if self.planned.plan != plan:
                assert self.planned.plan is not None
                raise RoundRefused(
                    f"site {self.name}: the server's plan changed during the run "
                    f"(was {describe(self.planned.plan)}, now {describe(plan)})"
                )
            return
        try:
            planned = plan_split(self.raw, plan, self.cfg)
        except PlanMisfit as e:
            raise RoundRefused(
                f"site {self.name}'s data do not fit the run's plan ({describe(plan)}): {e.problem}"
            ) from None
        self.cfg = planned_config(self.cfg, plan)  # the networks take the plan's input size
        self.planned = planned
        log.info("%s: data on the plan: %s", self.name, describe(plan))


def site_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[Config, int, int]:
    """The site's :class:`Config` (run config + site settings), its index and the number of sites."""
    cfg = build_config(dict(run_config))
    if SITE_CONFIG in node_config:
        path = Path(str(node_config[SITE_CONFIG]))
        run = f"run-{cfg.run_digest()}"  # the server's checkpoint digest: same for a resumed run
        cfg = apply_site_file(cfg, path)  # data.path, state_dir and the site's terms: from the site file only
        name = cfg.site.name or path.stem
        return cfg.replace(site={"name": name, "state_dir": str(Path(cfg.site.state_dir) / run)}), 0, 1
    index, count = int(node_config.get(PARTITION_ID, 0)), int(node_config.get(NUM_PARTITIONS, 1))
    name = f"site{index}"
    state_dir = str(Path(cfg.federation.run_dir) / "sites" / name)
    cfg = cfg.replace(site={"name": name, "state_dir": state_dir})
    if fractions := cfg.federation.label_fractions():  # simulated hospitals that labelled different shares
        cfg = cfg.replace(train={"label_fraction": fractions[index]})
    return cfg, index, count


_SITES: dict[tuple[int, int, str], Site] = {}


def get_site(run_id: int, node_id: int, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Site:
    """The site of this node in this run, loading and checking its data on first use."""
    key = (run_id, node_id, json.dumps([dict(run_config), dict(node_config)], sort_keys=True, default=str))
    if key not in _SITES:
        cfg, index, count = site_config(run_config, node_config)
        if SITE_CONFIG in node_config:
            check_terms(cfg, read_site_file(str(node_config[SITE_CONFIG])))
        log.info("%s: loading data from %s", cfg.site.name, cfg.data.path)
        raw = read_split(cfg, site=index, num_sites=count)
        if not raw.train:
            raise DataError(f"site {cfg.site.name} has no training cases in {cfg.data.path}")
        _SITES[key] = Site(cfg, index, count, raw, SiteState(cfg.site.state_dir))
        log.info("%s: %d training and %d test cases", cfg.site.name, len(raw.train), len(raw.test))
    return _SITES[key]
