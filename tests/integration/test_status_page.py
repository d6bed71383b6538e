"""The live status page in a real headless Chromium, while a real simulation runs and after it ends."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fedamlp.cli import main
from server.status import serve_in_background
from simulations.simulate import simulate
from tests.integration.helpers import sim_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")]


def _browser(url: str, *extra: str) -> str:
    """What the page shows once its script has run: the DOM after a few seconds of the page's own time."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return done.stdout


def test_the_status_page_follows_a_simulation_in_a_real_browser(tmp_path):
    """The page of a run stopped after 2 of its 4 rounds, then of the same run resumed to its end."""
    run = tmp_path / "run"
    plan = {"federation.pretrain_rounds": 1, "federation.finetune_rounds": 3}
    simulate(sim_config(run, **plan, **{"federation.stop_after_rounds": 2}), timeout=600)
    server, url = serve_in_background(run)
    try:
        during = _browser(url, "--dump-dom")
        simulate(sim_config(run, **plan, **{"federation.resume": True}), timeout=600)
        after = _browser(url, "--dump-dom")
        shot = tmp_path / "status.png"  # the test's artefact: what an operator sees
        _browser(url, f"--screenshot={shot}", "--window-size=1100,700")
    finally:
        server.shutdown()
    assert 'id="outcome" class="in progress">in progress<' in during, during[:1500]
    assert 'id="done">2<' in during and 'id="planned">4<' in during
    assert re.search(r'id="pace">[0-9.]+ s per round, about [0-9]+ s left<', during), during[:1500]
    assert 'id="outcome" class="finished">finished<' in after, after[:1500]
    assert 'id="done">4<' in after and 'id="round">3<' in after
    assert re.search(r'id="pace">[0-9.]+ s per round<', after)  # nothing left to estimate
    assert after.count('<td class="ok">ok</td>') == 2  # each site's last reply
    assert shot.is_file() and shot.stat().st_size > 5000 and shot.read_bytes()[:4] == b"\x89PNG"


def test_the_status_command_refuses_a_folder_that_is_no_run_and_a_port_in_use(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a federated run folder" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("{}")
    server, url = serve_in_background(tmp_path)
    try:
        port = url.rsplit(":", 1)[1].strip("/")
        assert main(["status", str(tmp_path), "--port", port]) == 2
        assert f"cannot serve the status page on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        server.shutdown()
