"""A run folder belongs to one run (amlp_core/runfolder.py): held while it runs, never silently reused."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from amlp_core.runfolder import SIMULATION_ENV, RunFolderError, check_new_run, clear_run, hold


def test_a_held_folder_is_refused_to_a_second_run_and_freed_after(tmp_path):
    run = tmp_path / "run"
    with hold(run):
        with pytest.raises(RunFolderError, match=f"run folder {run} is in use by another run"):
            with hold(run):
                pass
    assert not run.exists()  # created by the hold and left empty: removed again (a refused start leaves no trace)
    run.mkdir()
    with hold(run):  # released when the first run ended
        pass
    assert list(run.iterdir()) == []  # holding writes nothing into the folder, and keeps one it did not create


def test_the_lock_dies_with_a_killed_process(tmp_path):
    run = tmp_path / "run"
    code = f"import time\nfrom amlp_core.runfolder import hold\nwith hold({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError):
            with hold(run):
                pass
        proc.kill()  # SIGKILL: no clean-up ran, the kernel still releases the lock
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                with hold(run):
                    break
            except RunFolderError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.kill()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    check_new_run(run, resume=False, overwrite=False)  # missing: a new run
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    check_new_run(run, resume=False, overwrite=False)  # a folder with no run in it
    (run / "results").mkdir()
    (run / "config.yaml").write_text("x")
    with pytest.raises(RunFolderError, match="already holds a run: pass --resume to continue it, --overwrite"):
        check_new_run(run, resume=False, overwrite=False)
    check_new_run(run, resume=True, overwrite=False)
    check_new_run(run, resume=False, overwrite=True)
    with pytest.raises(RunFolderError, match="contradict"):
        check_new_run(run, resume=True, overwrite=True)
    clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only what a run writes is removed


def test_the_deployment_server_claims_its_run_dir_like_the_commands(tmp_path, monkeypatch):
    from amlp_core.config import FederationConfig
    from server.app import _claim

    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "config.yaml").write_text("kept: true\n")
    (run / "notes.txt").write_text("the operator's")
    with pytest.raises(RunFolderError, match="already holds a run"):
        _claim(FederationConfig(run_dir=str(run)))
    assert (run / "config.yaml").read_text() == "kept: true\n"
    _claim(FederationConfig(run_dir=str(run), resume=True))  # the federation checks the checkpoint itself
    _claim(FederationConfig(run_dir=str(run), overwrite=True))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    _claim(FederationConfig(run_dir=str(tmp_path / "new")))  # a new folder is simply taken
