"""What the real-simulation tests share: a tiny two-site federation's config and its results."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from simulations.processes import processes_with_env
from tests.conftest import tiny_config

#: The two-phase plan of the shared uninterrupted run (conftest ``two_phase_run``).
TWO_PHASE_PLAN = {"federation.pretrain_rounds": 2, "federation.finetune_rounds": 1}


def sim_config(run_dir: Path, **overrides):
    base = {
        "data.synthetic_cases": 10,
        "federation.sites": 2,
        "federation.pretrain_rounds": 1,
        "federation.finetune_rounds": 1,
        "federation.run_dir": str(run_dir),
        "federation.connect_timeout": 60,
        "federation.round_timeout": 300,
        "train.device": "cpu",
    }
    return tiny_config(3, **{**base, **overrides})


def round_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results" / "rounds.json").read_text())["rows"]


def assert_no_process_left(run_dir: Path) -> None:
    """No process of the simulation in ``run_dir`` runs, and no Ray session folder of one is left."""
    assert processes_with_env("FLWR_HOME", str(run_dir / ".flwr")) == []
    tmp = Path(tempfile.gettempdir())
    assert not list(tmp.glob("fedamlp-ray-*")) and not list(tmp.glob("ray/session_2*"))


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256 of its bytes): to show a refusal changed nothing."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".flwr" not in p.parts
    }
