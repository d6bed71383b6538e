"""The secure deployment, for real, on loopback: TLS, node authentication, two hospitals.

What runs (no simulation engine, no mocks): ``deploy/pki.py`` makes a CA, the SuperLink's
certificate and three site keys; a ``flower-superlink`` with TLS and
``--enable-supernode-auth``; ``flwr supernode register`` for two of the keys; two
``flower-supernode`` processes, each with its own key, site file and synthetic data; a third
with the unregistered key, which the SuperLink refuses; and ``flwr run <repo> <connection>``
from an operator's own FLWR_HOME, for one pretraining and one fine-tuning round.

Every process is started in its own session, carries a marker in its environment and runs
under ``timeout`` (so it dies by itself even if pytest is killed); the ``finally`` block stops
them all and the test asserts that none is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import tomli_w
import yaml

from amlp_core import protocol as P
from amlp_core.config import flat_dict
from amlp_core.data import write_phantom_dataset
from simulations.processes import processes_with_env
from tests.conftest import tiny_config
from tests.integration.helpers import tree_digest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PKI = REPO / "deploy" / "pki.py"
BIN = str(Path(sys.executable).parent)
SEARCH_PATH = os.pathsep.join([BIN, os.environ.get("PATH", "")])
MARKER = "FEDAMLP_DEPLOY_TEST_ID"
# Seconds: `timeout` ends every process after this, whatever happens to pytest. Generous, so that the test
# passes on a loaded machine (it takes about 3 minutes alone on 2 cores, 5-6 at load average 7).
LIFETIME = 1200
SITES = ("st-anna", "st-bruno")
CT_SITE = "st-clara"  # a hospital whose scans are CT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} missing)"


class Processes:
    """Started processes: own session each, marked environment, logs in files."""

    def __init__(self, root: Path):
        self.marker = uuid.uuid4().hex
        self.root = root
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.base_env = {
            **os.environ,
            MARKER: self.marker,
            "PATH": SEARCH_PATH,
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }

    def env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return {**self.base_env, "FLWR_HOME": str(flwr_home)}

    def start(self, name: str, command: list[str], flwr_home: Path) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["timeout", "-k", "5", str(LIFETIME), *command],
                env=self.env(flwr_home),
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"----- {name} -----\n{_tail(log)}" for name, (_, log) in self.procs.items())

    def _signal(self, sig: int) -> None:
        for proc, _ in self.procs.values():
            try:
                os.killpg(proc.pid, sig)  # the session = the process group of `timeout` and its children
            except ProcessLookupError:
                pass
        for pid in processes_with_env(MARKER, self.marker):  # detached ones (Flower's SuperExec, its apps)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def left(self) -> list[int]:
        return processes_with_env(MARKER, self.marker)

    def stop_all(self, grace: float = 10.0) -> None:
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.left() or any(p.poll() is None for p, _ in self.procs.values())):
            time.sleep(0.2)
        self._signal(signal.SIGKILL)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.left():
            time.sleep(0.2)


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, procs: Processes) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flower-superlink exited with {proc.returncode}\n{procs.logs()}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"flower-superlink did not open port {port} within {timeout} s\n{procs.logs()}")


def _pki(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PKI), *args], capture_output=True, text=True, timeout=60)


def _run_config(run_dir: Path, path: Path, **overrides) -> Path:
    """The tiny two-phase run of the simulation tests (tests/integration/test_simulation.py)."""
    cfg = tiny_config(
        3,
        **{
            "data.synthetic_cases": 10,
            "federation.sites": 2,
            "federation.pretrain_rounds": 1,
            "federation.finetune_rounds": 1,
            "federation.run_dir": str(run_dir),
            "federation.connect_timeout": 60,
            "federation.round_timeout": 600,
            "federation.min_sites": 2,
            "train.device": "cpu",
            **overrides,
        },
    )
    nested: dict[str, dict] = {}
    for key, value in flat_dict(cfg).items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    path.write_text(tomli_w.dumps(nested))
    return path


def _site_file(root: Path, name: str, index: int, modality: str = "auto") -> Path:
    """A hospital's site file and its own synthetic scans (MSD layout, its own scanner style)."""
    data = write_phantom_dataset(root / "data" / name, n=10, shape=(16, 16, 16), seed=100 + index, site=index)
    site = {
        "site": {"name": name, "state_dir": str(root / "state" / name)},
        "data": {"path": str(data), "format": "msd", "test_fraction": 0.2, "modality": modality},
        "train": {"device": "cpu", "batch_size": 4, "num_threads": 1},
    }
    path = root / "etc" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(site))
    return path


def test_pki_script_refuses_to_overwrite_and_protects_private_keys(tmp_path):
    pki = tmp_path / "pki"
    assert _pki("server-cert", "--dir", str(pki), "--host", "x").returncode == 2  # no CA yet
    assert _pki("ca", "--dir", str(pki)).returncode == 0
    again = _pki("ca", "--dir", str(pki))
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr
    bad = _pki("server-cert", "--dir", str(pki), "--host", "https://x:8000")
    assert bad.returncode == 2 and "neither an IP address nor a DNS name" in bad.stderr
    assert _pki("server-cert", "--dir", str(pki), "--host", "fl.example.org", "--host", "10.1.2.3").returncode == 0
    assert _pki("site-key", "--dir", str(pki), "../evil").returncode == 2
    assert _pki("site-key", "--dir", str(pki), "st-anna").returncode == 0
    key = (pki / "sites" / "st-anna.key").read_bytes()
    assert _pki("site-key", "--dir", str(pki), "st-anna").returncode == 2
    assert (pki / "sites" / "st-anna.key").read_bytes() == key
    assert _pki("site-key", "--dir", str(pki), "st-anna", "--force").returncode == 0
    assert (pki / "sites" / "st-anna.key").read_bytes() != key
    for private in ("ca.key", "server.key", "sites/st-anna.key"):
        assert (pki / private).stat().st_mode & 0o777 == 0o600, private

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    # The formats Flower reads: OpenSSH private key (flower-supernode), OpenSSH public key (flwr supernode register).
    private = serialization.load_ssh_private_key(key := (pki / "sites" / "st-anna.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((pki / "sites" / "st-anna.pub").read_bytes())
    assert isinstance(private.curve, ec.SECP384R1) and key.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.public_numbers() == private.public_key().public_numbers()


def _help(command: str) -> str:
    exe = shutil.which(command, path=SEARCH_PATH)
    if exe is None:
        pytest.skip(f"{command} is not on PATH (install flwr into this environment)")
    return subprocess.run(
        [exe, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"},
    ).stdout


def test_service_files_use_only_options_that_flower_has(tmp_path):
    """The systemd units and the compose file pass Flower 1.41 options that exist, TLS and node auth on."""
    deploy = REPO / "deploy"
    units = {
        "flower-superlink": (deploy / "systemd" / "fedamlp-superlink.service").read_text(),
        "flower-supernode": (deploy / "systemd" / "fedamlp-supernode@.service").read_text(),
    }
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]
    for command, unit in units.items():
        known = set(re.findall(r"--[a-z][a-z-]*", _help(command)))
        exec_start = unit.split("ExecStart=", 1)[1].split("\nRestart=", 1)[0]
        cmd = compose["superlink" if command == "flower-superlink" else "supernode"]["command"]
        assert cmd[0] == command
        for flags in (re.findall(r"\s(--[a-z-]+)", exec_start), [a.split("=", 1)[0] for a in cmd[1:]]):
            assert flags and set(flags) <= known, (command, sorted(set(flags) - known))
            assert "--insecure" not in flags
        required = (
            [
                "--ssl-ca-certfile",
                "--ssl-certfile",
                "--ssl-keyfile",
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--database",
            ]
            if command == "flower-superlink"
            else ["--root-certificates", "--auth-supernode-private-key", "--node-config", "--port"]
        )
        assert all(f in exec_start for f in required) and all(any(a.startswith(f) for a in cmd) for f in required)
    # The hospital's data and keys are mounted read-only.
    mounts = compose["supernode"]["volumes"]
    assert all(m.endswith(":ro") for m in mounts if ":/data" in m or ".key:" in m or "site.yaml" in m)
    # systemd itself accepts the units (where systemd-analyze exists): no warning at all.
    analyze = shutil.which("systemd-analyze")
    if analyze:
        for name, unit in {
            "fedamlp-superlink.service": units["flower-superlink"],
            "fedamlp-supernode@st-mary.service": units["flower-supernode"],
        }.items():
            (tmp_path / name).write_text(unit.replace("/opt/fedamlp/.venv/bin", BIN))
        out = subprocess.run(
            [analyze, "verify", "--man=no", *(str(p) for p in tmp_path.glob("*.service"))],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout + out.stderr == "", out.stdout + out.stderr


def test_nginx_fleet_proxy_config_is_valid(tmp_path):
    """deploy/nginx/fedamlp-fleet.conf passes `nginx -t` (paths and port moved into tmp_path)."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed")
    pki = tmp_path / "pki"
    for args in (["ca"], ["server-cert", "--host", "localhost"]):
        assert _pki(*args, "--dir", str(pki)).returncode == 0
    conf = (REPO / "deploy" / "nginx" / "fedamlp-fleet.conf").read_text()
    assert "location /v1/fleet/" in conf and "return 403" in conf
    port = str(_free_port())
    site = (
        conf.replace("/etc/fedamlp/pki", str(pki))
        .replace("listen 8000", f"listen 127.0.0.1:{port}")
        .replace("listen [::]:8000 ssl;", "")
    )
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    out = subprocess.run(
        [nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_secure_deployment_two_hospitals_end_to_end(tmp_path):
    if shutil.which("flower-superlink", path=SEARCH_PATH) is None:
        pytest.skip("flower-superlink is not on PATH (install flwr into this environment)")
    pki = tmp_path / "pki"
    for args in (
        ["ca"],
        ["server-cert", "--host", "127.0.0.1", "--host", "localhost"],
        *[["site-key", name] for name in (*SITES, CT_SITE, "intruder")],
    ):
        done = _pki(*args, "--dir", str(pki))
        assert done.returncode == 0, done.stderr
    port = _free_port()
    address = f"127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    operator_home = tmp_path / "operator" / ".flwr"
    operator_home.mkdir(parents=True)
    (operator_home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "fedamlp",
                    "fedamlp": {"address": address, "root-certificates": str(pki / "ca.crt")},
                }
            }
        )
    )
    procs = Processes(tmp_path)
    try:
        link = procs.start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(pki / "ca.crt"),
                "--ssl-certfile",
                str(pki / "server.crt"),
                "--ssl-keyfile",
                str(pki / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(tmp_path / "superlink" / "state.db"),
            ],
            tmp_path / "superlink" / ".flwr",
        )
        _wait_for_port(port, link, 60, procs)

        for name in (*SITES, CT_SITE):
            reg = subprocess.run(
                ["flwr", "supernode", "register", str(pki / "sites" / f"{name}.pub"), "fedamlp", "--name", name],
                env=procs.env(operator_home),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

        def supernode(name: str, key: str, extra: list[str]) -> subprocess.Popen:
            return procs.start(
                name,
                [
                    "flower-supernode",
                    "--superlink",
                    address,
                    "--root-certificates",
                    str(pki / "ca.crt"),
                    "--auth-supernode-private-key",
                    str(pki / "sites" / f"{key}.key"),
                    "--port",
                    str(_free_port()),
                    *extra,
                ],
                tmp_path / "nodes" / name / ".flwr",
            )

        for i, name in enumerate(SITES):
            supernode(name, name, ["--node-config", f"site-config='{_site_file(tmp_path, name, i)}'"])
        # A third hospital brings CT: the plan the server decides (MR, the modality of most cases) refuses it.
        ct_site = _site_file(tmp_path, CT_SITE, 2, modality="CT")
        supernode(CT_SITE, CT_SITE, ["--node-config", f"site-config='{ct_site}'"])
        intruder = supernode("intruder", "intruder", ["--max-retries", "2", "--max-wait-time", "30"])

        def submit(run_config: Path, timeout: float = 900) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["flwr", "run", str(REPO), "fedamlp", "--run-config", str(run_config), "--stream"],
                env=procs.env(operator_home),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=timeout,
            )

        run = submit(_run_config(run_dir, tmp_path / "run_config.toml"))  # about 115 s alone on 2 cores
        (tmp_path / "flwr-run.log").write_text(run.stdout + run.stderr)
        context = f"flwr run:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}\n{procs.logs()}"
        assert run.returncode == 0, context
        assert not (run_dir / "FAILED").exists(), (run_dir / "FAILED").read_text() + context

        rows = json.loads((run_dir / "results" / "rounds.json").read_text())["rows"]
        for phase in ("pretrain", "finetune"):
            sites = {r["site"]: r["status"] for r in rows if r["phase"] == phase and r["site"] != P.ALL_SITES}
            assert sites == {name: "ok" for name in SITES}, (phase, rows)
        assert (run_dir / "model" / "checkpoint.pt").is_file(), context
        # The CT site was refused, saying why, and sent nothing after its fingerprint.
        summary = (run_dir / "results" / "summary.md").read_text()
        assert f"- refused sites: site {CT_SITE}: its scans are CT, the run's plan is for MR" in summary, summary
        assert not [r for r in rows if r["site"] == CT_SITE]
        assert not (tmp_path / "state" / CT_SITE).exists() or not any((tmp_path / "state" / CT_SITE).rglob("*.pt"))
        for name in SITES:  # each hospital kept its own state in its own folder
            assert any((tmp_path / "state" / name).iterdir()), name

        # The unregistered key was refused and never took part.
        intruder.wait(timeout=60)
        assert intruder.returncode != 0, procs.log("intruder")
        assert "Exit Code: 305" in procs.log("intruder") and "Failed to activate SuperNode" in procs.log("intruder"), (
            procs.log("intruder")
        )
        assert "No SuperNode found with the given public key" in procs.log("superlink")

        # The ServerApp claims its run folder: a second run into it is refused and changes nothing.
        finished = tree_digest(run_dir)
        again = submit(_run_config(run_dir, tmp_path / "again.toml"), timeout=300)
        assert "already holds a run" in again.stdout + again.stderr, again.stdout[-3000:] + again.stderr[-2000:]
        assert tree_digest(run_dir) == finished
        # A run that needs more sites than connect fails within its connect timeout, saying so.
        short = tmp_path / "short"
        plan = {"federation.min_sites": 4, "federation.sites": 4, "federation.connect_timeout": 5}
        submit(_run_config(short, tmp_path / "short.toml", **plan), timeout=300)
        assert "only 3 of the 4 sites needed" in (short / "FAILED").read_text()
        # A run that needs all three: only two fit the plan, and it stops saying which did not and why.
        every = tmp_path / "every"
        plan = {"federation.min_sites": 3, "federation.sites": 3}
        submit(_run_config(every, tmp_path / "every.toml", **plan), timeout=300)
        failed = (every / "FAILED").read_text()
        assert "only 2 of 3 sites fit the run's plan" in failed and f"site {CT_SITE} its scans are CT" in failed, failed
    finally:
        procs.stop_all()
    assert procs.left() == [], procs.logs()
    assert all(p.poll() is not None for p, _ in procs.procs.values())
