"""Every command against every entry of the bad-input corpus (tests/corpus/build.py) that is of a sort
it takes: exit code 2, one ``fedamlp: error:`` line that names the culprit, no traceback, and nothing
lost (no run left in the output folder, the good model and scan unchanged, nothing written in place of
an output). The commands run in this process (``fedamlp.cli.main``), as a shell would run them but
without a Python start-up each; tests/core/test_cli.py runs some of them as real processes."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import itertools
import shutil
import tempfile
from pathlib import Path

import pytest

from amlp_core.runfolder import holds_run
from fedamlp.cli import main

from .build import SORTS, TINY_MODEL, Entry, build_corpus, write_good_dataset

TINY = [arg for setting in TINY_MODEL for arg in ("--set", setting)]
SIM = ["--sites", "2", "--pretrain-rounds", "0", "--finetune-rounds", "1", "--timeout", "120"]


def _build_corpus() -> tuple[Path, list[Entry], dict[str, Path]]:
    """The corpus, built once when this module is collected (so that each case is a test of its own, to run
    with ``-k``) in a temporary folder removed at exit: a good model fine-tuned on the good dataset, and the
    bad entries beside them."""
    root = Path(tempfile.mkdtemp(prefix="fedamlp-corpus-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    model = root / "good_model"
    data = write_good_dataset(root / "train_data")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = main(["finetune", "--data", str(data), "--out", str(model), "-q", *TINY])
    if code != 0:
        raise RuntimeError(f"the corpus's good model could not be trained (exit {code})")
    return (root, *build_corpus(root / "entries", good_model=model))


ROOT, ENTRIES, GOOD = _build_corpus()


@pytest.fixture(scope="module")
def corpus():
    return ROOT, ENTRIES, GOOD


def _commands(entry: Entry, good: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """The command lines of every command that takes an input of ``entry``'s sort, with ``entry`` in it."""
    v, data, model, scan = entry.value, str(good["dataset"]), str(good["model"]), str(good["scan"])
    run, seg, report = str(out / "run"), str(out / "seg.nii.gz"), str(out / "report.json")
    by_sort = {
        "dataset": {
            "data check": ["data", "check", v],
            "pretrain": ["pretrain", "--data", v, "--out", run, *TINY],
            "finetune": ["finetune", "--data", v, "--out", run, *TINY],
            "evaluate": ["evaluate", "--model", model, "--data", v, "--json", report],
            "simulate": ["simulate", "--data", v, "--out", run, *SIM, *TINY],
        },
        "setting": {
            "pretrain": ["pretrain", "--data", data, "--out", run, *TINY, "--set", v],
            "finetune": ["finetune", "--data", data, "--out", run, *TINY, "--set", v],
            "simulate": ["simulate", "--out", run, *SIM, "--set", v],
        },
        "config_file": {
            "pretrain": ["pretrain", "--data", data, "--out", run, "--config", v],
            "finetune": ["finetune", "--data", data, "--out", run, "--config", v],
            "simulate": ["simulate", "--out", run, *SIM, "--config", v],
        },
        "model": {
            "evaluate": ["evaluate", "--model", v, "--json", report],
            "predict": ["predict", "--model", v, "--input", scan, "--output", seg],
            "finetune": ["finetune", "--data", data, "--init", v, "--out", run, *TINY],
            "simulate": [
                "simulate",
                "--data",
                data,
                "--out",
                run,
                *SIM,
                *TINY,
                "--set",
                f"federation.init_encoder={v}",
            ],
        },
        "scan": {"predict": ["predict", "--model", model, "--input", v, "--output", seg]},
        "output": {
            "predict": ["predict", "--model", model, "--input", scan, "--output", v],
            "evaluate": ["evaluate", "--model", model, "--json", v],
            "data check": ["data", "check", data, "--json", v],
        },
    }
    commands = by_sort[entry.sort]
    return {name: argv for name, argv in commands.items() if not entry.only or name in entry.only}


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


#: Every (entry, command) pair: the command run with the entry in it.
CASES = [(entry, name) for entry in ENTRIES for name in _commands(entry, GOOD, ROOT)]


def test_the_corpus_is_large_and_holds_every_sort():
    assert len(ENTRIES) >= 30 and {e.sort for e in ENTRIES} == set(SORTS)
    assert len(CASES) >= 100


@pytest.mark.parametrize(("entry", "command"), CASES, ids=[f"{e.kind}-{name.replace(' ', '-')}" for e, name in CASES])
def test_a_command_refuses_a_bad_input(entry, command, tmp_path, capsys):
    """Exit code 2, one error line naming the culprit, no traceback, no run written, no refused output
    written, every good input unchanged."""
    before = {name: _digest(path if path.is_dir() else path.parent) for name, path in GOOD.items()}
    existed = Path(entry.value).exists() if entry.sort == "output" else None
    code = main(_commands(entry, GOOD, tmp_path)[command])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("fedamlp: error:")]
    assert code == 2, captured.err[-2000:]
    assert len(errors) == 1 and entry.culprit in errors[0], f"error lines {errors!r} do not name {entry.culprit!r}"
    assert "Traceback" not in captured.out + captured.err
    assert not holds_run(tmp_path / "run"), "a run was written"
    if existed is False:
        assert not Path(entry.value).exists(), "the refused output was written"
    after = {name: _digest(path if path.is_dir() else path.parent) for name, path in GOOD.items()}
    assert after == before, "a good input was changed"


def test_corpus_covers_every_sort_and_kind_once(tmp_path):
    entries, good = build_corpus(tmp_path)
    kinds = [e.kind for e in entries]
    assert len(kinds) == len(set(kinds)) and {e.sort for e in entries} == set(SORTS) - {"model"}
    assert all(Path(p).exists() for p in good.values())
    assert not list(itertools.filterfalse(lambda e: e.culprit, entries))


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "train.device=cudaXYZ"],
        ["--set", "train.lr=1e308"],
        ["--set", "model.img_size=1024,1024,1024"],
        ["--set", "data.max_voxels=10"],
        ["--data", "LABELS_0_2"],
    ],
    ids=["device", "lr", "img_size", "max_voxels", "labels"],
)
def test_a_refused_overwrite_keeps_the_old_run(corpus, tmp_path, bad):
    """--overwrite removes the old run only once every check of the new start has passed."""
    root, _, good = corpus
    data = str(good["dataset"])
    if "LABELS_0_2" in bad:
        copy = write_good_dataset(tmp_path / "labels_0_2")
        meta = (copy / "dataset.json").read_text().replace('"1": "a", "2": "b"', '"2": "b"')
        (copy / "dataset.json").write_text(meta)
        bad = ["--data", str(copy)]
    run = tmp_path / "run"
    assert main(["finetune", "--data", data, "--out", str(run), *TINY]) == 0
    before = _digest(run)
    argv = ["finetune", "--data", data, "--out", str(run), "--overwrite", *TINY]
    if bad[0] == "--data":
        argv[2] = bad[1]
    else:
        argv += bad
    assert main(argv) == 2
    assert _digest(run) == before
