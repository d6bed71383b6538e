"""The processes of a simulation: free loopback ports, finding a run's processes by the marker in their
environment, and stopping them all (a session's group, then every marked descendant), SIGTERM first.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from amlp_core.errors import AMLPError
from amlp_core.runfolder import SIMULATION_ENV

log = logging.getLogger(__name__)

MARKER = SIMULATION_ENV  # every process of a simulation carries MARKER=<its id> in its environment


class SimulationError(AMLPError):
    """The simulation could not start or did not finish; the message says where to look."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SimulationError(f"flower-superlink did not open port {port} within {timeout:.0f} s; see {log_file}")


def processes_with_env(key: str, value: str) -> list[int]:
    """Processes (not this one) whose environment carries ``key=value`` (Linux /proc)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: state, ppid, ... ([] if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(roots: list[int]) -> set[int]:
    """Every living process below ``roots`` in the process tree (Linux /proc), roots excluded."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited process its parent has not reaped yet)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def _signal_all(sessions: list[subprocess.Popen], pids: list[int], sig: int) -> None:
    targets = [(os.killpg, p.pid) for p in sessions if p.poll() is None] + [(os.kill, pid) for pid in pids]
    for kill, target in targets:
        try:
            kill(target, sig)
        except ProcessLookupError:
            pass


def stop_processes(marker: str, sessions: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s, every started session, every process below them and
    every marked process.

    The tree is read before any signal: once the SuperLink stops, Ray's agents are re-parented and
    their environment, which Ray's process titles overwrite, cannot be relied on to show the marker.
    """
    tree = descendants([p.pid for p in sessions if p.poll() is None])

    def targets() -> list[int]:
        alive = [pid for pid in tree if _running(pid)]
        return sorted(set(alive) | set(processes_with_env(MARKER, marker)))

    _signal_all(sessions, targets(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (targets() or any(p.poll() is None for p in sessions)):
        time.sleep(0.2)
    _signal_all(sessions, targets(), signal.SIGKILL)
    for proc in sessions:
        proc.wait(timeout=grace)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the run lasts, SIGTERM (``kill``, ``timeout``, a service stop) raises ``SystemExit(143)``
    like Ctrl-C raises KeyboardInterrupt, so the cleanup runs before the process ends."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Run as ``python -c _DIES_WITH_PARENT PARENT_PID COMMAND...``: asks Linux to send SIGTERM when the
#: parent dies (``prctl(PR_SET_PDEATHSIG)``, kept across exec), then becomes COMMAND. It covers the
#: one ending the clean-up below cannot: this process killed by SIGKILL (the OOM killer, ``kill -9``).
_DIES_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0); "  # 1 = PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or sys.exit('the simulation ended before this process started'); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def dies_with_parent(command: list[str]) -> list[str]:
    """``command`` wrapped so that it gets SIGTERM when this process dies, even by SIGKILL (Linux only)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIES_WITH_PARENT, str(os.getpid()), *command]


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (``/proc/PID/stat`` field 22): tells a reused pid apart."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def watch(parent: int, marker: str, scratch: str = "", poll: float = 1.0) -> None:
    """Until ``parent`` dies, remember every process below it; then SIGKILL those still running and every
    process carrying ``marker``, and remove the ``scratch`` folder (Ray's). The one ending the parent's own
    clean-up cannot cover: ``kill -9`` of the parent, after which the simulation engine, re-parented,
    would go on running rounds and writing."""
    seen: dict[int, str] = {}
    me = os.getpid()
    while _running(parent):
        for pid in descendants([parent]) - {me}:
            seen.setdefault(pid, _start_time(pid))
        time.sleep(poll)
    leftovers = [pid for pid, started in seen.items() if _running(pid) and _start_time(pid) == started]
    for pid in sorted(set(leftovers) | set(processes_with_env(MARKER, marker)) - {me}):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if scratch:
        time.sleep(poll)  # the killed processes' last writes
        shutil.rmtree(scratch, ignore_errors=True)


def start_watchdog(marker: str, scratch: str = "") -> subprocess.Popen:
    """A detached process running :func:`watch` on this one (its own session: a signal to ours spares it)."""
    code = "import sys; from simulations.processes import watch; watch(int(sys.argv[1]), *sys.argv[2:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(os.getpid()), marker, scratch],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
            ),
        },
    )
