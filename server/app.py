"""The central server's Flower ServerApp: one run, two phases (see :mod:`server.federation`)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from amlp_core.config import build_config
from server.federation import Federation

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the configuration once from the run config and run the federation."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = build_config(dict(context.run_config))
    Federation(grid, cfg).run()
