"""Run the whole federation on one machine with Flower's simulation engine.

``fedamlp simulate`` starts a private ``flower-superlink --simulation`` on a free loopback
port (its own process session), submits this project with ``flwr run`` and streams the
run's log until the run ends. Whatever happens (success, error, Ctrl-C, SIGTERM), every
process it started is stopped afterwards: the SuperLink's session and any process that carries this
simulation's marker in its environment (the ServerApp, the simulation engine, Ray). If this process
is killed outright (SIGKILL), Linux sends the SuperLink SIGTERM, and the SuperLink stops the rest.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from amlp_core.config import Config, flat_dict
from amlp_core.errors import AMLPError
from server.federation import FAILED, MODEL_DIR

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
MARKER = "FEDAMLP_SIMULATION_ID"


class SimulationError(AMLPError):
    """The simulation could not start or did not finish; the message says where to look."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log_file: Path) -> None:
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
def _sigterm_exits() -> Iterator[None]:
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


def _dies_with_parent(command: list[str]) -> list[str]:
    """``command`` wrapped so that it gets SIGTERM when this process dies, even by SIGKILL (Linux only)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIES_WITH_PARENT, str(os.getpid()), *command]


def _run_config_file(cfg: Config, path: Path) -> Path:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat_dict(cfg).items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    path.write_text(tomli_w.dumps(nested))
    return path


def simulate(
    cfg: Config,
    project: Path = REPO,
    timeout: float | None = None,
    stream_to=None,
    cpus_per_site: int = 1,
    gpus_per_site: float = 0.0,
) -> Path:
    """Run ``cfg``'s federation with ``cfg.federation.sites`` simulated sites; returns the run folder.

    Each site's ClientApp gets ``cpus_per_site`` CPUs and, when positive, ``gpus_per_site`` of a
    GPU (a share: 0.25 lets four sites train on one GPU at once).

    Raises:
        ConfigError: a configuration no federation can run (:meth:`Config.check_federation`).
        SimulationError: Flower could not start, the run failed or exceeded ``timeout`` seconds.
    """
    cfg.check_federation()
    run_dir = Path(cfg.federation.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    init = cfg.federation.init_encoder  # the ServerApp runs elsewhere: paths must be absolute
    cfg = cfg.replace(federation={"run_dir": str(run_dir), "init_encoder": str(Path(init).resolve()) if init else ""})
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    marker = uuid.uuid4().hex
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        MARKER: marker,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH", "")])),
    }
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedamlp"\n\n[superlink.fedamlp]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink_log = run_dir / "superlink.log"
    sessions: list[subprocess.Popen] = []
    started = time.monotonic()
    with _sigterm_exits():  # a SIGTERM ends the run through the finally below, like Ctrl-C
        try:
            with open(superlink_log, "wb") as out:
                sessions.append(
                    subprocess.Popen(
                        _dies_with_parent(
                            [
                                "flower-superlink",
                                "--insecure",
                                "--simulation",
                                "--isolation",
                                "subprocess",
                                "--host",
                                "127.0.0.1",
                                "--port",
                                str(port),
                                "--disable-runtime-dependency-installation",
                            ]
                        ),
                        env=env,
                        cwd=run_dir,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _wait_for_port(port, sessions[0], 60, superlink_log)
            fed_config = [f"num-supernodes={cfg.federation.sites}", f"client-resources-num-cpus={cpus_per_site}"]
            if gpus_per_site > 0:
                fed_config.append(f"client-resources-num-gpus={gpus_per_site:g}")
            command = [
                "flwr",
                "run",
                str(project),
                "fedamlp",
                "--run-config",
                str(_run_config_file(cfg, run_dir / "run_config.toml")),
                "--stream",
            ]
            for item in fed_config:
                command += ["--federation-config", item]
            log.info("simulating %d sites; run folder %s", cfg.federation.sites, run_dir)
            runner = subprocess.Popen(
                _dies_with_parent(command),
                env=env,
                cwd=project,
                stdout=stream_to,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            sessions.append(runner)
            try:
                code = runner.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise SimulationError(
                    f"the simulation did not finish within {timeout:.0f} s; log: {superlink_log}"
                ) from None
            failed = run_dir / FAILED
            if failed.exists():
                raise SimulationError(f"the federation failed: {failed.read_text().strip()}")
            if code != 0:
                raise SimulationError(f"flwr run exited with code {code}; see {superlink_log}")
            model = run_dir / MODEL_DIR / "checkpoint.pt"
            if not model.exists() and not cfg.federation.stop_after_rounds:
                raise SimulationError(
                    f"the run ended without a final model in {run_dir}: see {run_dir / 'results'} and {superlink_log}"
                )
            log.info("simulation finished in %.0f s", time.monotonic() - started)
            return run_dir
        finally:
            stop_processes(marker, sessions)


def default_run_config(project: Path = REPO) -> dict[str, Any]:
    """The app's run configuration from ``pyproject.toml`` (flat keys): the embedded default."""
    import tomllib

    from flwr.common.config import flatten_dict

    with open(project / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
