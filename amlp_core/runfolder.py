"""A run folder belongs to one run: a lock while it runs, and no silent reuse of a finished one.

- :func:`hold` takes an exclusive ``flock`` on the folder itself for as long as the run lasts (the
  kernel releases it when the process ends, even by SIGKILL); a second run, or ``--resume``, while
  one is alive is refused. Nothing is written into the folder for it.
- :func:`check_new_run` refuses a folder that already holds a run unless the user resumes it or
  asks to overwrite it; :func:`clear_run` then removes only what a run writes there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amlp_core.errors import AMLPError

log = logging.getLogger(__name__)

#: What a run (federated or single-site) writes into its folder; a folder holding one of these holds a run.
RUN_ENTRIES = (
    "config.yaml",
    "server_checkpoint.pt",
    "checkpoint.pt",
    "metrics.jsonl",
    "resume.pt",
    "evaluation.json",
    "results",
    "model",
    "encoder",
    "sites",
    "FAILED",
    "tensorboard",
    "report",
    "superlink.log",
    "run_config.toml",
    ".flwr",
)
#: Environment variable set for every process of a simulation (``fedamlp simulate`` holds the lock there).
SIMULATION_ENV = "FEDAMLP_SIMULATION_ID"


class RunFolderError(AMLPError):
    """The run folder is in use, or already holds a run that was neither resumed nor overwritten."""


@contextmanager
def hold(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this run; RunFolderError when another run holds it. A folder
    created here and still empty at the end (a refused start) is removed again: a refusal leaves no trace."""
    path = Path(folder)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)  # not inherited by children (Python opens non-inheritable)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(
            f"run folder {path} is in use by another run that is still going; wait for it to end, or use another folder"
        ) from None
    try:
        yield path
    finally:
        os.close(fd)
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def holds_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds anything a run writes."""
    path = Path(folder)
    return path.is_dir() and any((path / entry).exists() for entry in RUN_ENTRIES)


def check_new_run(folder: str | Path, resume: bool, overwrite: bool) -> None:
    """RunFolderError when ``folder`` already holds a run and the user neither resumes nor overwrites it."""
    if resume and overwrite:
        raise RunFolderError(f"--resume and --overwrite contradict each other (run folder {folder})")
    if holds_run(folder) and not (resume or overwrite):
        raise RunFolderError(
            f"run folder {folder} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or choose another folder"
        )


def clear_run(folder: str | Path) -> None:
    """Remove what a run wrote into ``folder`` (:data:`RUN_ENTRIES`), nothing else."""
    path = Path(folder)
    for entry in RUN_ENTRIES:
        target = path / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    log.info("overwriting the run in %s", path)
