"""The real federation that several integration tests compare against, simulated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.inbox import ENV as INBOX_ENV
from simulations.simulate import simulate
from tests.integration.helpers import TWO_PHASE_PLAN, sim_config

CONSOLE_FILE = "console.txt"  # what the two-phase run showed on the console, beside its run folder
INBOX_DIR = "inbox"  # the server's audit log of the two-phase run (server/inbox.py), beside its run folder


@pytest.fixture(scope="session")
def two_phase_run(tmp_path_factory) -> tuple[Path, object]:
    """An uninterrupted two-phase federation (:data:`TWO_PHASE_PLAN`, 2 sites): its folder and config.
    Read it, do not write into it: the resume test and the encoder-reuse test both compare against it."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("two_phase") / "run"
    cfg = sim_config(run, **TWO_PHASE_PLAN)
    console = io.StringIO()
    os.environ[INBOX_ENV] = str(run.parent / INBOX_DIR)  # every message and reply, beside the run (test_board)
    try:
        with contextlib.redirect_stdout(console):  # what the console showed: next to the run, for test_board
            simulate(cfg, timeout=600)
    finally:
        del os.environ[INBOX_ENV]
    (run.parent / CONSOLE_FILE).write_text(console.getvalue())
    return run, cfg
