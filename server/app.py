"""The central server's Flower ServerApp: one run, two phases (see :mod:`server.federation`)."""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from amlp_core.atomic import atomic_write_text
from amlp_core.config import FederationConfig, build_config
from amlp_core.errors import AMLPError
from amlp_core.logs import setup_logging
from amlp_core.runfolder import SIMULATION_ENV, check_new_run, clear_run, hold
from server.federation import FAILED, Federation
from server.inbox import maybe_record

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the configuration once from the run config and run the federation.

    A failure is also written to ``RUN_DIR/FAILED`` (one line), so that whoever started the
    run can say what went wrong without reading the log.
    """
    setup_logging(own_handlers=True)  # Flower keeps its own handlers
    cfg = build_config(dict(context.run_config)).check_federation()
    failed = Path(cfg.federation.run_dir) / FAILED
    federation = Federation(maybe_record(grid), cfg)  # FEDAMLP_SERVER_INBOX: audit log (server/inbox.py)
    try:
        with _held(cfg.federation.run_dir):
            _claim(cfg.federation)
            federation.run()
    except AMLPError as e:
        log.error("the federation failed: %s", e)
        if federation.started:  # a refused start leaves the run folder as it was
            _write_failed(failed, f"{type(e).__name__}: {e}")
        raise
    except Exception as e:  # a defect, not a refusal: still say why, in one line, then let Flower log it
        log.exception("the federation failed unexpectedly")
        _write_failed(failed, f"unexpected {type(e).__name__}: {e}")
        raise


def _held(run_dir: str) -> AbstractContextManager:
    """The run folder's lock; in a simulation ``fedamlp simulate`` holds it for the whole run."""
    return nullcontext() if os.environ.get(SIMULATION_ENV) else hold(run_dir)


def _claim(fed: FederationConfig) -> None:
    """Refuse a run folder that holds another run unless ``federation.resume`` or ``federation.overwrite``
    (then remove that run). ``fedamlp simulate`` does this itself before it starts anything."""
    if os.environ.get(SIMULATION_ENV):
        return
    check_new_run(fed.run_dir, fed.resume, fed.overwrite)
    if fed.overwrite:
        clear_run(fed.run_dir)


def _write_failed(path: Path, reason: str) -> None:
    """``RUN_DIR/FAILED``: one line, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, " ".join(reason.split()) + "\n")
