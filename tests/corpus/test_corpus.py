"""Every command against every entry of the bad-input corpus (tests/corpus/build.py) that is of a sort
it takes: exit code 2, one ``fedamlp: error:`` line that names the culprit, no traceback, and nothing
lost (no run left in the output folder, the good model and scan unchanged, nothing written in place of
an output). The commands run in this process (``fedamlp.cli.main``), as a shell would run them but
without a Python start-up each; tests/core/test_cli.py runs some of them as real processes."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest

from amlp_core.runfolder import holds_run
from fedamlp.cli import main

from .build import SORTS, TINY_MODEL, Entry, build_corpus, write_good_dataset

TINY = [arg for setting in TINY_MODEL for arg in ("--set", setting)]
SIM = ["--sites", "2", "--pretrain-rounds", "0", "--finetune-rounds", "1", "--timeout", "120"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    model = root / "good_model"
    data = write_good_dataset(root / "train_data")
    assert main(["finetune", "--data", str(data), "--out", str(model), *TINY]) == 0
    return (root, *build_corpus(root / "entries", good_model=model))


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


def test_every_command_refuses_every_bad_input(corpus, capsys):
    root, entries, good = corpus
    assert len(entries) >= 30 and {e.sort for e in entries} == set(SORTS)
    before = {name: _digest(good[name] if good[name].is_dir() else good[name].parent) for name in good}
    failures, runs = [], 0
    for n, entry in enumerate(entries):
        for name in _commands(entry, good, root).keys():
            out = root / "outs" / f"{n}-{name.replace(' ', '-')}"
            out.mkdir(parents=True)
            argv = _commands(entry, good, out)[name]
            existed = Path(entry.value).exists() if entry.sort == "output" else None
            code = main(argv)
            captured = capsys.readouterr()
            runs += 1
            errors = [line for line in captured.err.splitlines() if line.startswith("fedamlp: error:")]
            problems = []
            if code != 2:
                problems.append(f"exit {code}")
            if len(errors) != 1 or entry.culprit not in errors[0]:
                problems.append(f"error lines {errors!r} do not name {entry.culprit!r}")
            if "Traceback" in captured.out + captured.err:
                problems.append("a traceback")
            if holds_run(out / "run"):
                problems.append("a run was written")
            if existed is False and Path(entry.value).exists():
                problems.append("the refused output was written")
            if problems:
                failures.append(f"{entry.kind} x {name}: {'; '.join(problems)}")
    after = {name: _digest(good[name] if good[name].is_dir() else good[name].parent) for name in good}
    assert after == before, "a good input was changed"
    assert not failures, f"{len(failures)} of {runs} runs misbehaved:\n" + "\n".join(failures)
    assert runs >= 100


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
