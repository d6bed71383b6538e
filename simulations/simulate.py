"""Run the whole federation on one machine with Flower's simulation engine.

``fedamlp simulate`` starts a private ``flower-superlink --simulation`` on a free loopback
port (its own process session), submits this project with ``flwr run`` and streams the
run's log until the run ends: all of it into ``RUN_DIR/simulation.log``, and to the console one line per
round, the warnings and the errors (:func:`console_line`; everything with ``console="verbose"``). Whatever happens (success, error, Ctrl-C, SIGTERM), every
process it started is stopped afterwards: the SuperLink's session and any process that carries this
simulation's marker in its environment (the ServerApp, the simulation engine, Ray). If this process
is killed outright (SIGKILL), Linux sends the SuperLink SIGTERM, and the SuperLink stops the rest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import tomli_w

from amlp_core.config import Config, flat_dict
from amlp_core.data import check_dataset, discover
from amlp_core.data.validate import refuse_or_skip
from amlp_core.engine.artefacts import load_pretrained_shared
from amlp_core.engine.split import near_duplicate_groups, site_case_names
from amlp_core.errors import ConfigError
from amlp_core.runfolder import check_new_run, clear_run, hold
from server.federation import FAILED, MODEL_DIR, check_resumable
from simulations.processes import (
    MARKER,
    SimulationError,
    dies_with_parent,
    free_port,
    sigterm_exits,
    start_watchdog,
    stop_processes,
    wait_for_port,
)

log = logging.getLogger(__name__)


REPO = Path(__file__).resolve().parents[1]

#: How much of the federation's output the console shows (all of it is in ``RUN_DIR/simulation.log``).
CONSOLE_LEVELS = ("quiet", "normal", "verbose")
#: The loggers whose INFO lines the console shows: one line per round, the run's start and end.
CONSOLE_LOGGERS = ("server.progress", "simulations.simulate")
SIMULATION_LOG = "simulation.log"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\)\s*")  # Ray's "(ClientAppActor pid=123) "
_OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): ")


def console_line(line: str, console: str) -> bool:
    """Whether one line of the federation's output is shown on the console.

    ``verbose`` shows every line; ``normal`` our packages' warnings and errors, Flower's and Ray's errors, and
    the INFO lines of :data:`CONSOLE_LOGGERS`; ``quiet`` the warnings and errors only.
    """
    if console == "verbose":
        return True
    plain = _RAY_PREFIX.sub("", _ANSI.sub("", line))
    ours = _OUR_LINE.match(plain)
    if ours:
        severity, name = ours.groups()
        return severity in ("WARNING", "ERROR", "CRITICAL") or (console == "normal" and name in CONSOLE_LOGGERS)
    return plain.startswith(("ERROR", "CRITICAL", "Traceback"))


def _tee(source, log_file: Path, console: str, out) -> threading.Thread:
    """A thread that copies ``source`` (the runner's output) into ``log_file`` whole, and the lines
    :func:`console_line` keeps to ``out``."""

    def copy() -> None:
        with open(log_file, "a", encoding="utf-8") as f:
            for line in iter(source.readline, ""):
                f.write(line)
                f.flush()
                if console_line(line, console):
                    out.write(line)
                    out.flush()

    thread = threading.Thread(target=copy, name="simulation-log", daemon=True)
    thread.start()
    return thread


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
    overwrite: bool = False,
    console: str = "normal",
) -> Path:
    """Run ``cfg``'s federation with ``cfg.federation.sites`` simulated sites; returns the run folder.

    Each site's ClientApp gets ``cpus_per_site`` CPUs and, when positive, ``gpus_per_site`` of a
    GPU (a share: 0.25 lets four sites train on one GPU at once).

    The federation's output goes whole to ``stream_to`` when given (an open file); otherwise into
    ``RUN_DIR/simulation.log``, with the lines :func:`console_line` keeps at ``console`` (one of
    :data:`CONSOLE_LEVELS`) on standard output.

    The run folder is held for the whole run (:func:`amlp_core.runfolder.hold`). A folder that already
    holds a run is refused unless ``federation.resume`` (whose checkpoint must match this
    configuration) or ``overwrite``; a refused start changes nothing in it.

    Raises:
        ConfigError: a configuration no federation can run (:meth:`Config.check_federation`).
        RunFolderError: the run folder is in use, or holds a run neither resumed nor overwritten.
        CheckpointError: ``federation.resume`` with a checkpoint made by another configuration.
        SimulationError: Flower could not start, the run failed or exceeded ``timeout`` seconds.
    """
    _check_simulation(cfg)
    run_dir = Path(cfg.federation.run_dir).resolve()
    overwrite = overwrite or cfg.federation.overwrite
    check_new_run(run_dir, cfg.federation.resume, overwrite)
    with hold(run_dir):
        check_resumable(cfg.replace(federation={"run_dir": str(run_dir)}))
        if overwrite:
            clear_run(run_dir)
        return _simulate(cfg, run_dir, project, timeout, stream_to, cpus_per_site, gpus_per_site, console)


def _check_simulation(cfg: Config) -> None:
    """What would make the simulation fail only once started: ConfigError or CheckpointError naming it."""
    cfg.check_federation()
    f = cfg.federation
    if f.min_sites > f.sites:
        raise ConfigError(
            f"invalid federation.min_sites={f.min_sites}: more than the simulation's federation.sites={f.sites} "
            "(no round could ever succeed)"
        )
    if f.init_encoder:
        load_pretrained_shared(f.init_encoder, cfg.model, cfg.train.init_decoder)  # the server would refuse it later


def check_data(cfg: Config) -> None:
    """Every case of the simulation's data, checked as ``fedamlp data check`` does, before anything starts;
    a bad case refuses the run (DataError naming the file) or, with ``data.on_bad_case=skip``, is logged.

    ``fedamlp simulate`` calls it: the data are all on this machine, so the user hears of a bad file at once
    rather than from a site's redacted error after Flower started. :func:`simulate` itself leaves the checks
    to the sites, as in a deployment (a site with a bad case fails alone, or skips it).
    """
    d = cfg.data
    if not d.synthetic:
        report = check_dataset(d.path, d.format, cfg.model.num_classes, max_voxels=d.max_voxels)
        refuse_or_skip(report.problems, d.on_bad_case, d.path)
        # Each site's share, dealt as the sites will deal it: too many sites for the cases is said here, not
        # by every site after Flower started (whose errors the server sees redacted).
        index = discover(d.path, d.format)
        site_case_names(cfg, index, near_duplicate_groups(index, cfg), cfg.federation.sites)


def _environment(run_dir: Path, project: Path, marker: str, ray_tmp: str) -> dict[str, str]:
    """The environment of every process of the simulation: its marker, its own Flower home and Ray folder."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        MARKER: marker,
        "FLWR_HOME": str(run_dir / ".flwr"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # (Ray's FutureWarning at every worker start: the behaviour it announces)
        "RAY_TMPDIR": ray_tmp,  # Ray's session folder, removed with the run's processes (not left in /tmp)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH", "")])),
    }


def _superlink_command(port: int) -> list[str]:
    return [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
        "--port", str(port), "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def _flwr_run_command(cfg: Config, project: Path, run_dir: Path, cpus_per_site: int, gpus_per_site: float) -> list[str]:
    run_config = _run_config_file(cfg, run_dir / "run_config.toml")
    command = ["flwr", "run", str(project), "fedamlp", "--run-config", str(run_config), "--stream"]
    fed_config = [f"num-supernodes={cfg.federation.sites}", f"client-resources-num-cpus={cpus_per_site}"]
    if gpus_per_site > 0:
        fed_config.append(f"client-resources-num-gpus={gpus_per_site:g}")
    for item in fed_config:
        command += ["--federation-config", item]
    return command


def _check_finished(cfg: Config, run_dir: Path, code: int, superlink_log: Path) -> None:
    """SimulationError unless the run ended well: no FAILED, exit code 0, a final model (or a planned stop)."""
    failed = run_dir / FAILED
    if failed.exists():
        raise SimulationError(f"the federation failed: {failed.read_text().strip()}")
    if code != 0:
        whole = run_dir / SIMULATION_LOG
        raise SimulationError(f"flwr run exited with code {code}; see {whole if whole.exists() else superlink_log}")
    if not (run_dir / MODEL_DIR / "checkpoint.pt").exists() and not cfg.federation.stop_after_rounds:
        raise SimulationError(
            f"the run ended without a final model in {run_dir}: see {run_dir / 'results'} and {superlink_log}"
        )


def _simulate(
    cfg: Config,
    run_dir: Path,
    project: Path,
    timeout: float | None,
    stream_to,
    cpus_per_site: int,
    gpus_per_site: float,
    console: str,
) -> Path:
    """:func:`simulate` once the run folder is held and checked."""
    init = cfg.federation.init_encoder  # the ServerApp and the sites run elsewhere: paths must be absolute
    cfg = cfg.replace(federation={"run_dir": str(run_dir), "init_encoder": str(Path(init).resolve()) if init else ""})
    if not cfg.data.synthetic:
        cfg = cfg.replace(data={"path": str(Path(cfg.data.path).resolve())})
    (run_dir / ".flwr").mkdir(exist_ok=True)
    marker, port = uuid.uuid4().hex, free_port()
    ray_tmp = tempfile.mkdtemp(prefix="fedamlp-ray-")  # short: Ray's socket paths must fit 107 bytes
    env = _environment(run_dir, project, marker, ray_tmp)
    (run_dir / ".flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedamlp"\n\n[superlink.fedamlp]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink_log = run_dir / "superlink.log"
    sessions: list[subprocess.Popen] = []
    watchdog = start_watchdog(marker, ray_tmp)  # kills what is left should this process be killed outright
    started = time.monotonic()
    tee: threading.Thread | None = None
    with sigterm_exits():  # a SIGTERM ends the run through the finally below, like Ctrl-C
        try:
            with open(superlink_log, "wb") as out:
                superlink = dies_with_parent(_superlink_command(port))
                sessions.append(
                    subprocess.Popen(
                        superlink, env=env, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            wait_for_port(port, sessions[0], 60, superlink_log)
            log.info(
                "simulating %d sites; run folder %s%s",
                cfg.federation.sites,
                run_dir,
                "" if stream_to else f" (the whole log: {run_dir / SIMULATION_LOG})",
            )
            command = dies_with_parent(_flwr_run_command(cfg, project, run_dir, cpus_per_site, gpus_per_site))
            runner = subprocess.Popen(
                command,
                env=env,
                cwd=project,
                stdout=stream_to or subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                text=True,
                errors="replace",
            )
            sessions.append(runner)
            if stream_to is None:
                tee = _tee(runner.stdout, run_dir / SIMULATION_LOG, console, sys.stdout)
            try:
                code = runner.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise SimulationError(
                    f"the simulation did not finish within {timeout:.0f} s; log: {superlink_log}"
                ) from None
            if tee is not None:
                tee.join(timeout=30)  # the rest of the output, once the runner has exited
            _check_finished(cfg, run_dir, code, superlink_log)
            log.info("simulation finished in %.0f s", time.monotonic() - started)
            return run_dir
        finally:
            stop_processes(marker, sessions)
            watchdog.kill()  # its work is done: everything it watched has been stopped
            watchdog.wait()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def default_run_config(project: Path = REPO) -> dict[str, Any]:
    """The app's run configuration from ``pyproject.toml`` (flat keys): the embedded default."""
    import tomllib

    from flwr.common.config import flatten_dict

    with open(project / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
