"""Memory is bounded by what is stored, not by what a header or a checkpoint claims: under a 2.5 GB address
space limit, inputs that would need far more are refused with one line, before anything is allocated."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedamlp.cli import main

from .build import TINY_MODEL, _forged_config, _resampling_bomb, write_good_dataset

TINY = [arg for setting in TINY_MODEL for arg in ("--set", setting)]
LIMIT_KB = 2_500_000  # what the interpreter, torch and MONAI need to start, and not much more


def _limited(argv: list[str]) -> subprocess.CompletedProcess:
    """``fedamlp ARGV`` in a process whose address space is limited to :data:`LIMIT_KB`."""
    command = f"ulimit -v {LIMIT_KB}; exec {sys.executable} -m fedamlp.cli " + " ".join(f"'{a}'" for a in argv)
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)


def _refused(run: subprocess.CompletedProcess, needle: str) -> None:
    errors = [line for line in run.stderr.splitlines() if line.startswith("fedamlp: error:")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(errors) == 1 and needle in errors[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "MemoryError" not in run.stderr


@pytest.mark.slow
def test_claims_of_huge_grids_are_refused_under_a_memory_limit(tmp_path):
    data = write_good_dataset(tmp_path / "data")
    model = tmp_path / "model"
    assert main(["finetune", "--data", str(data), "--out", str(model), *TINY]) == 0
    # A case whose header claims 64 mm voxels: 1024^3 voxels (4 GiB of float32) on the others' 1 mm grid.
    bomb = _resampling_bomb(tmp_path, data, np.diag([64.0, 64.0, 64.0, 1.0]))
    _refused(_limited(["finetune", "--data", bomb.value, "--out", str(tmp_path / "run"), *TINY]), "case_002")
    assert not (tmp_path / "run").exists()
    # A model whose plan says 0.01 mm: the 16^3 scan would become 1600^3 (16 GiB).
    forged = _forged_config(tmp_path, model, "forged", ("plan", "target_spacing"), [0.01] * 3, "", ())
    scan = data / "imagesTr" / "case_000.nii.gz"
    out = tmp_path / "seg.nii.gz"
    _refused(_limited(["predict", "--model", forged.value, "--input", str(scan), "--output", str(out)]), "max_voxels")
    assert not out.exists()
    # A model whose network would take a 1024^3 input: refused before it is built.
    huge = _forged_config(tmp_path, model, "huge", ("model", "img_size"), [1024] * 3, "", ())
    _refused(_limited(["predict", "--model", huge.value, "--input", str(scan), "--output", str(out)]), "model.img_size")
