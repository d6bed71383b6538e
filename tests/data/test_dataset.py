import numpy as np
import pytest
import torch

from amlp_core.config import TrainConfig, build_config
from amlp_core.data import (
    SegDataset,
    discover,
    label_subset,
    load_samples,
    make_phantom_samples,
    split_names,
    to_slices,
)
from amlp_core.data.dataset import Sample
from amlp_core.data.transforms import fit_to_roi, random_flip
from amlp_core.errors import ConfigError, DataError

from .helpers import label_map, save_nii


def test_load_samples(msd_root):
    samples = load_samples(discover(msd_root), progress=False)
    assert [s.name for s in samples] == ["case_000", "case_001", "case_002"]
    assert samples[0].image.shape == (1, 8, 10, 6) and samples[0].label.dtype == np.int64
    assert samples[0].image.mean() > 1  # as read: the plan normalises (amlp_core/data/plan.py)
    assert all(s.label is None for s in load_samples(discover(msd_root), with_labels=False, progress=False))


def test_load_samples_shape_mismatch_named(msd_root):
    bad = save_nii(msd_root / "labelsTr" / "case_002.nii.gz", label_map(shape=(8, 10, 7)))
    with pytest.raises(DataError, match="does not match") as exc_info:
        load_samples(discover(msd_root), progress=False)
    assert str(bad) in str(exc_info.value)


def test_seg_dataset_shapes():
    samples = make_phantom_samples(3, (20, 14, 10), seed=0)
    item = SegDataset(samples, (16, 16, 8))[1]
    assert item["image"].shape == (1, 16, 16, 8) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 16, 16, 8) and item["label"].dtype == torch.int64
    assert item["index"] == 1
    unlabelled = [Sample(s.name, s.image, None, s.affine) for s in samples]
    assert "label" not in SegDataset(unlabelled, (16, 16, 8))[0]
    batch = next(iter(torch.utils.data.DataLoader(SegDataset(samples, (16, 16, 8)), batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16, 8) and batch["label"].shape == (3, 1, 16, 16, 8)


def test_seg_dataset_augmentation_is_reproducible():
    samples = make_phantom_samples(2, (24, 24), seed=0)
    a = SegDataset(samples, (16, 16), augment=True, seed=3)
    b = SegDataset(samples, (16, 16), augment=True, seed=3)
    assert torch.equal(a[0]["image"], b[0]["image"]) and torch.equal(a[0]["label"], b[0]["label"])
    first = a[0]["image"]
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], first)
    plain = SegDataset(samples, (16, 16))
    assert torch.equal(plain[0]["image"], plain[0]["image"])


@pytest.mark.parametrize("shape, roi", [((35, 50, 35), (48, 64, 48)), ((30, 26), (24, 32))])
def test_seg_dataset_strong_augmentation_deterministic(shape, roi):
    samples = make_phantom_samples(2, shape, seed=0)
    a = SegDataset(samples, roi, augment=True, seed=3, strength="strong")
    b = SegDataset(samples, roi, augment=True, seed=3, strength="strong")
    for i in range(2):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    first = a[1]
    a.set_epoch(1)
    assert not torch.equal(a[1]["image"], first["image"])
    for epoch in range(6):
        a.set_epoch(epoch)
        item = a[1]
        assert item["image"].shape == (1, *roi) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, *roi) and item["label"].dtype == torch.int64
        assert item["image"].is_contiguous() and item["label"].is_contiguous()
        assert set(item["label"].unique().tolist()) <= set(np.unique(samples[1].label).tolist())
    unlabelled = [Sample(s.name, s.image, None, s.affine) for s in samples]
    item = SegDataset(unlabelled, roi, augment=True, seed=3)[1]
    assert "label" not in item and torch.equal(item["image"], first["image"])  # same draws without labels


def test_seg_dataset_flip_is_crop_and_flips_only():
    samples = make_phantom_samples(2, (20, 14, 10), seed=0)
    flip = SegDataset(samples, (16, 16, 8), augment=True, seed=5, strength="flip")
    strong = SegDataset(samples, (16, 16, 8), augment=True, seed=5)
    differs = False
    for epoch in range(10):
        flip.set_epoch(epoch)
        strong.set_epoch(epoch)
        rng = np.random.default_rng((5, epoch, 1))
        image, label = random_flip(*fit_to_roi(samples[1].image, samples[1].label, (16, 16, 8), rng), rng)
        assert np.array_equal(flip[1]["image"].numpy(), image) and np.array_equal(flip[1]["label"][0].numpy(), label)
        differs |= not torch.equal(strong[1]["image"], flip[1]["image"])
    assert differs
    plain = SegDataset(samples, (16, 16, 8), strength="strong")  # augment=False: a center crop, nothing else
    assert np.array_equal(plain[1]["image"].numpy(), fit_to_roi(samples[1].image, None, (16, 16, 8))[0])


def test_seg_dataset_and_config_reject_unknown_augmentation():
    samples = make_phantom_samples(1, (16, 16), seed=0)
    with pytest.raises(ConfigError, match="'heavy'.*strong, flip"):
        SegDataset(samples, (16, 16), augment=True, strength="heavy")
    assert TrainConfig().augment == "strong" and build_config({"train.augment": "flip"}).train.augment == "flip"
    with pytest.raises(ConfigError, match=r"train\.augment='heavy'.*strong, flip"):
        build_config({"train.augment": "heavy"})


def test_make_loader_passes_train_augment():
    from amlp_core.engine.local import make_loader

    cfg = build_config({"model.img_size": "16,16,8", "train.augment": "flip"})
    samples = make_phantom_samples(2, (20, 14, 10), seed=0)
    assert make_loader(samples, cfg, augment=True, labels=True).dataset.strength == "flip"
    assert make_loader(samples, build_config(), augment=True, labels=False).dataset.strength == "strong"


def test_seg_dataset_mixed_labels_rejected():
    samples = make_phantom_samples(2, (16, 16), seed=0)
    samples[1] = Sample(samples[1].name, samples[1].image, None, samples[1].affine)
    with pytest.raises(DataError, match="phantom_s0_0001"):
        SegDataset(samples, (16, 16))


def test_to_slices():
    volume = make_phantom_samples(1, (12, 10, 8), seed=0)[0]
    slices = to_slices([volume])
    assert len(slices) == 8 and slices[3].name == "phantom_s0_0000#z003"
    assert slices[3].image.shape == (1, 12, 10) and slices[3].label.shape == (12, 10)
    assert np.array_equal(slices[3].image, volume.image[..., 3])
    assert np.allclose(slices[3].affine[:3, 3], [0, 0, 3])
    assert len(to_slices([volume], axis=0)) == 12 and to_slices([volume], axis=0)[0].image.shape == (1, 10, 8)
    kept = to_slices([volume], min_foreground=0.01)
    assert 0 < len(kept) < 8 and all((s.label > 0).mean() >= 0.01 for s in kept)
    unlabelled = Sample(volume.name, volume.image, None, volume.affine)
    assert len(to_slices([unlabelled], min_foreground=0.5)) == 8


def test_split_names_deterministic():
    names = [f"case_{i:02d}" for i in range(20)]
    train, test = split_names(names, 0.25, seed=1)
    assert len(test) == 5 and sorted(train + test) == names
    assert split_names(names[::-1], 0.25, seed=1) == (train, test)
    assert split_names(names, 0.25, seed=2) != (train, test)
    assert split_names(["a", "b"], 0.1, seed=0)[1] != []
    with pytest.raises(ValueError, match="1.5"):
        split_names(names, 1.5, seed=0)


def test_label_subset():
    samples = make_phantom_samples(10, (16, 16), seed=0)
    subset = label_subset(samples, 0.3, seed=0)
    assert len(subset) == 3 and subset == label_subset(samples[::-1], 0.3, seed=0)
    assert len(label_subset(samples, 0.01, seed=0)) == 1 and len(label_subset(samples, 1.0, seed=0)) == 10
    for bad in (0, 1.2, -0.5):
        with pytest.raises(ValueError, match=str(bad)):
            label_subset(samples, bad, seed=0)


def test_partition_names_iid_and_dirichlet():
    from amlp_core.data import partition_names

    names = [f"c{i:03d}" for i in range(40)]
    iid = partition_names(names, 4, "iid", seed=1)
    assert sorted(sum(iid, [])) == names and {len(p) for p in iid} == {10}
    assert partition_names(list(reversed(names)), 4, "iid", seed=1) == iid  # order of the input does not matter
    skew = partition_names(names, 4, "dirichlet", alpha=0.3, seed=1, min_per_site=2)
    assert sorted(sum(skew, [])) == names and min(len(p) for p in skew) >= 2
    assert max(len(p) for p in skew) > 14  # quantity skew
    with pytest.raises(Exception, match="cannot cut 3 cases into 4 sites"):
        partition_names(names[:3], 4)


def test_a_bad_case_is_refused_by_default_and_skipped_on_request(tmp_path, caplog):
    import nibabel as nib

    from amlp_core.config import build_config
    from amlp_core.engine.split import load_split
    from tests.corpus.build import TINY_MODEL, write_good_dataset

    data = write_good_dataset(tmp_path / "data", n=6)
    bad = data / "labelsTr" / "case_003.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 7, np.uint8), np.eye(4)), str(bad))  # class 7 of 3
    settings = dict(s.split("=") for s in TINY_MODEL)
    cfg = build_config({**settings, "data.path": str(data), "data.test_fraction": 0.3})
    with pytest.raises(DataError, match="outside the classes") as refused:
        load_split(cfg)
    assert str(bad) in str(refused.value)
    skipped = load_split(cfg.replace(data={"on_bad_case": "skip"}))
    names = [s.name for s in skipped.train + skipped.test]
    assert sorted(names) == ["case_000", "case_001", "case_002", "case_004", "case_005"]
    assert f"skipping a bad case (data.on_bad_case=skip): {bad}" in caplog.text


def test_unlabelled_images_train_and_never_test(tmp_path):
    import json

    import nibabel as nib

    from amlp_core.config import build_config
    from amlp_core.data import discover
    from amlp_core.engine.split import load_split
    from tests.corpus.build import TINY_MODEL, write_good_dataset

    data = write_good_dataset(tmp_path / "data", n=6)
    meta = json.loads((data / "dataset.json").read_text())
    for i in range(3):  # MSD's "test" list: images without labels (both of its forms)
        nib.save(nib.Nifti1Image(np.full((16, 16, 16), 50.0 + i, np.float32), np.eye(4)), str(data / f"u{i}.nii.gz"))
    meta["test"] = ["./u0.nii.gz", {"image": "./u1.nii.gz"}, "./u2.nii.gz"]
    (data / "dataset.json").write_text(json.dumps(meta))
    index = discover(data)
    assert len(index.cases) == 9 and sum(c.label is None for c in index.cases) == 3 and not index.problems
    settings = dict(s.split("=") for s in TINY_MODEL)
    split = load_split(build_config({**settings, "data.path": str(data), "data.test_fraction": 0.5}))
    assert sorted(s.name for s in split.train if s.label is None) == ["u0", "u1", "u2"]
    assert all(s.label is not None for s in split.test) and len(split.test) == 3
    meta["test"].append("./u0.nii.gz")
    (data / "dataset.json").write_text(json.dumps(meta))
    assert "listed again by test entry 3 (first by test entry 0)" in discover(data).problems[0].message
