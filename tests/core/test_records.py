"""Under DP-SGD the patient is the record: the 2D slices of one volume (and near-duplicate images) are drawn,
clipped and counted as one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amlp_core.data import Sample, write_phantom_dataset
from amlp_core.data.dataset import PatientRecords, SegDataset, as_records, label_subset, record_count, to_slices
from amlp_core.engine.pipeline import finetune
from amlp_core.privacy.ledger import LEDGER_FILE
from tests.conftest import tiny_config


def _volumes(n: int = 3, depth: int = 4) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.normal(size=(1, 8, 8, depth)).astype(np.float32)
        label = (rng.random((8, 8, depth)) > 0.5).astype(np.int64)
        out.append(Sample(f"vol{i}", image, label, np.eye(4)))
    return out


def test_slices_of_a_volume_are_one_record_and_enter_the_labelled_subset_together():
    slices = to_slices(_volumes())
    assert len(slices) == 12 and record_count(slices) == 3
    assert {s.group_key for s in slices if s.name.startswith("vol1#")} == {"vol1"}
    subset = label_subset(slices, 0.34, seed=0)  # about a third: one whole volume, not slices of several
    assert {s.group_key for s in subset} == {subset[0].group_key} and len(subset) == 4


def test_patient_records_draw_one_slice_of_each_patient_per_epoch():
    dataset = SegDataset(to_slices(_volumes()), (8, 8))
    records = as_records(dataset, seed=1)
    assert isinstance(records, PatientRecords) and len(records) == 3
    owner = {i: s.group_key for i, s in enumerate(dataset.samples)}

    def drawn() -> list[int]:
        return [int(records[r]["index"]) for r in range(3)]

    first = drawn()
    assert [owner[i] for i in first] == ["vol0", "vol1", "vol2"] and drawn() == first  # one slice of each, seeded
    picks = set()
    for epoch in range(12):
        records.set_epoch(epoch)
        picks.add(drawn()[0])
    assert len(picks) > 1 and {owner[i] for i in picks} == {"vol0"}  # another slice another epoch, same patient
    whole = SegDataset(_volumes(), (8, 8, 4))
    assert as_records(whole) is whole  # a dataset of one item per patient is its own records


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_private_finetuning_on_slices_samples_and_counts_patients(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", 10, (16, 16, 8), seed=0)  # 8 training volumes of 8 slices
    cfg = tiny_config(
        2,
        **{
            "data.path": str(data),
            "data.as_slices": True,
            "model.img_size": (16, 16),
            "model.num_classes": 2,
            "train.finetune_steps": 3,
            "privacy.site_dp": True,
            "privacy.budget": 8.0,
        },
    )
    finetune(cfg, tmp_path / "run")
    ledger = json.loads((tmp_path / "run" / LEDGER_FILE).read_text())
    assert [(q, n) for _, q, n in ledger["history"]] == [(0.5, 3)]  # batch 4 of the 8 patients, not of 64 slices
