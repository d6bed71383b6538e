"""The run's record read back through its one loader: typed rows, selections, and refusals that name the file."""

from __future__ import annotations

import json

import pytest

from amlp_core import protocol as P
from server.results import RECORD_FILE, RecordError, RunRecord, RunResults


def _written(tmp_path):
    results = RunResults(tmp_path / "run" / "results")
    results.info = {"pretraining": "amlp", "finetune rounds": 2}
    for rnd in (1, 2):
        for site, loss in (("site0", 0.5), ("site1", 0.7)):
            results.add(phase=P.FINETUNE, round=rnd, kind=P.TRAIN, site=site, status=P.OK, loss=loss, bytes_up=10)
        results.add(phase=P.FINETUNE, round=rnd, kind=P.TRAIN, site=P.ALL_SITES, status=P.OK, loss=0.6, seconds=2.5)
        results.add(phase=P.FINETUNE, round=rnd, kind=P.EVALUATE, site=P.ALL_SITES, status=P.OK, dice_mean=0.1 * rnd)
    results.add(phase=P.FINETUNE, round=2, kind=P.TRAIN, site="site2", status=P.MISSING, error="no reply")
    results.write()
    return tmp_path / "run"


def test_the_record_reads_back_as_typed_rows_in_order(tmp_path):
    run = _written(tmp_path)
    record = RunRecord.read(run)
    assert record.info["pretraining"] == "amlp" and len(record.rows) == 9
    assert record.rows[0].phase is P.Phase.FINETUNE and record.rows[0].round == 1 and record.rows[0].site == "site0"
    assert record.final_evaluation().round == 2 and record.final_evaluation().number("dice_mean") == pytest.approx(0.2)
    assert [r.site for r in record.select(kind=P.TRAIN, aggregate=False, status=P.OK, phase=P.FINETUNE)] == [
        "site0",
        "site1",
        "site0",
        "site1",
    ]
    assert record.select(status=P.MISSING)[0].get("error") == "no reply"
    assert record.round_seconds(P.FINETUNE) == 5.0 and record.round_seconds(P.PRETRAIN) == 0
    stored = json.loads((run / RECORD_FILE).read_text())["rows"]
    assert record.dict_rows() == stored  # nothing lost or renamed on the way


@pytest.mark.parametrize(
    "content, says",
    [
        (None, "is not a federated run folder"),
        ("{", "cannot be read"),
        ('{"kind": "pretrain", "rows": []}', "is not a run record of this product"),
        ('{"kind": "results", "version": 7, "rows": []}', "version 7"),
        ('{"kind": "results", "version": 1, "rows": [{"phase": "train", "round": 1}]}', "not a round"),
    ],
)
def test_a_record_that_is_not_one_is_refused_naming_the_file(tmp_path, content, says):
    if content is not None:
        (tmp_path / "results").mkdir()
        (tmp_path / RECORD_FILE).write_text(content)
    with pytest.raises(RecordError, match=says) as e:
        RunRecord.read(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_the_results_read_back_give_the_summary_and_the_consoles_part_of_it(tmp_path):
    run = _written(tmp_path)
    results = RunResults.read(run)
    assert results.summary() == (run / "results" / "summary.md").read_text()  # the same text, read back
    console = results.console_summary()
    assert console.startswith("## Dice after fine-tuning round 2") and "| ALL |  | 0.2000 |" in console
    assert "## Site failures" in console and "site2: missing: no reply" in console
    assert "Training rounds" not in console and "pretraining: amlp" not in console  # the rounds and what ran: not here


def test_the_comparison_reads_the_largest_epsilon_a_site_spent(tmp_path):
    from simulations.benchmarks.comparison.plan import spent_epsilon

    run = _written(tmp_path)
    assert spent_epsilon(RunRecord.read(run)) is None  # no site DP
    results = RunResults(run / "results")
    for rnd, eps in ((1, (1.5, 2.0)), (2, (3.1, 2.9))):
        for site, e in zip(("site0", "site1"), eps, strict=True):
            results.add(phase=P.FINETUNE, round=rnd, kind=P.TRAIN, site=site, status=P.OK, epsilon=e)
    results.write()
    assert spent_epsilon(RunRecord.read(run)) == 3.1
