"""2D lesion data as a hospital brings it (the BUSI layout): categories, several masks, masks that do not
match, near-duplicates kept on one side of every split, the resizing 2D plan."""

import dataclasses

import numpy as np
import pytest

from amlp_core.config import Config, PlanConfig
from amlp_core.data import check_dataset, discover, label_subset, partition_names, read_case_label, split_names
from amlp_core.data.cases import Sample
from amlp_core.data.duplicates import duplicate_groups, find_near_duplicates, group_names, thumbnail
from amlp_core.data.plan import decide_plan, fingerprint, prepare, restore
from amlp_core.engine.split import data_defaults, read_split
from amlp_core.errors import DataError

from .helpers import save_png


def _scan(seed: int, shape=(60, 80)) -> np.ndarray:
    """An ultrasound-like 8-bit image: smooth random texture, a dark blob somewhere."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 200, size=(6, 8))
    image = np.kron(coarse, np.ones((10, 10)))[: shape[0], : shape[1]]
    image += rng.normal(0, 6, size=shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _lesion(shape=(60, 80), centre=(30, 40), radius=8) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2).astype(np.uint8) * 255


def write_busi(root, n_per_class=4, duplicate_of=None):
    """A BUSI-like folder: benign/, malignant/, normal/ with names with spaces and parentheses; every
    image with ``name_mask.png`` (empty for normal ones); benign (1) with a second mask; ``duplicate_of``
    (a ``(category, number)``) gets a near-copy ``benign (99)``: brighter, resized, noisier."""
    seed = 0
    for category in ("benign", "malignant", "normal"):
        for i in range(1, n_per_class + 1):
            seed += 1
            save_png(root / category / f"{category} ({i}).png", _scan(seed))
            mask = _lesion(centre=(20 + 3 * i, 30 + 4 * i)) if category != "normal" else np.zeros((60, 80), np.uint8)
            save_png(root / category / f"{category} ({i})_mask.png", mask)
    save_png(root / "benign" / "benign (1)_mask_1.png", _lesion(centre=(50, 70), radius=4))
    if duplicate_of is not None:
        category, number = duplicate_of
        original = np.asarray(_scan(1 + ["benign", "malignant", "normal"].index(category) * n_per_class + number - 1))
        from PIL import Image

        copy = Image.fromarray(np.clip(original * 1.1 + 8, 0, 255).astype(np.uint8)).resize((96, 72))
        copy = np.clip(np.asarray(copy, np.float64) + np.random.default_rng(7).normal(0, 4, (72, 96)), 0, 255)
        save_png(root / "benign" / "benign (99).png", copy.astype(np.uint8))
        save_png(
            root / "benign" / "benign (99)_mask.png",
            np.asarray(Image.fromarray(_lesion()).resize((96, 72), Image.NEAREST)),
        )
    return root


def test_busi_layout_is_read_as_it_arrives(tmp_path):
    root = write_busi(tmp_path / "Dataset_BUSI_with_GT")
    index = discover(root)
    assert index.fmt == "png" and len(index.cases) == 12 and all(c.label is not None for c in index.cases)
    by_name = {c.name: c for c in index.cases}
    assert by_name["benign/benign (1)"].category == "benign" and by_name["normal/normal (3)"].category == "normal"
    assert [p.name for p in by_name["benign/benign (1)"].extra_labels] == ["benign (1)_mask_1.png"]
    assert read_case_label(by_name["normal/normal (1)"]).sum() == 0  # a labelled case without a lesion

    report = check_dataset(root)
    assert report.ok, report.render()
    c = report.contents
    assert c.categories == {"benign": 4, "malignant": 4, "normal": 4}
    assert c.empty_labels == 4 and c.several_masks == ["benign/benign (1)"]
    assert c.size_min == [60, 80] and c.size_max == [60, 80]
    text = report.render()
    assert "Categories: benign 4, malignant 4, normal 4" in text and "Near-duplicates: 0 groups" in text
    assert "Cases with several masks (joined into one label): 1 (benign/benign (1))" in text


def test_lesion_images_get_their_presets(tmp_path):
    root = write_busi(tmp_path / "busi")
    defaults = data_defaults(str(root))
    assert defaults["model.spatial_dims"] == 2 and defaults["model.img_size"] == (128, 128)
    assert defaults["model.post_keep_largest"] is False and defaults["model.post_min_share"] == 0.005
    assert defaults["model.post_min_confidence"] == 0.9
    assert "model.tta_flips" not in defaults  # (an ultrasound image's top is the skin: no mirrored inference)


def test_scans_get_mirrored_inference_and_their_slices_do_not(tmp_path):
    from tests.data.helpers import write_msd

    root = write_msd(tmp_path / "msd")
    scans = data_defaults(str(root))
    assert scans["model.tta_flips"] is True and scans["train.batch_size"] == 4
    slices = data_defaults(str(root), as_slices=True)
    assert "model.tta_flips" not in slices and "train.batch_size" not in slices


def test_union_of_several_masks(tmp_path):
    root = write_busi(tmp_path / "busi")
    case = next(c for c in discover(root).cases if c.name == "benign/benign (1)")
    first = _lesion(centre=(23, 34)) > 0
    second = _lesion(centre=(50, 70), radius=4) > 0
    assert np.array_equal(read_case_label(case).astype(bool), first | second)


@pytest.mark.parametrize(
    "mask, words",
    [
        (np.full((60, 80), 128, np.uint8), "values other than 0 and 255 (128)"),
        (np.zeros((30, 80), np.uint8), "does not match image"),
    ],
    ids=["grey mask", "wrong size"],
)
def test_a_mask_that_does_not_match_is_named(tmp_path, mask, words):
    root = write_busi(tmp_path / "busi")
    bad = root / "malignant" / "malignant (2)_mask.png"
    save_png(bad, mask)
    report = check_dataset(root)
    assert not report.ok
    assert [(p.file, words in p.message) for p in report.errors] == [(str(bad), True)]


def test_rgb_image_with_grey_content_and_binary_masks(tmp_path):
    root = write_busi(tmp_path / "busi")
    grey = _scan(3)
    save_png(root / "benign" / "benign (3).png", np.repeat(grey[..., None], 3, axis=2))  # RGB, grey content
    save_png(root / "benign" / "benign (2)_mask.png", (_lesion() > 0).astype(np.uint8))  # 0/1 values
    report = check_dataset(root)
    assert report.ok, report.render()
    case = next(c for c in discover(root).cases if c.name == "benign/benign (2)")
    assert read_case_label(case).max() == 1


def test_a_built_near_duplicate_pair_is_found(tmp_path):
    root = write_busi(tmp_path / "busi", duplicate_of=("malignant", 2))
    groups = find_near_duplicates(discover(root), 0.95)
    assert groups == [["benign/benign (99)", "malignant/malignant (2)"]]
    report = check_dataset(root)
    assert report.contents.duplicate_groups == groups
    assert "DUPLICATES benign/benign (99), malignant/malignant (2)" in report.render()
    assert check_dataset(root, near_duplicates=1.0).contents.duplicate_threshold is None  # not looked for


def test_thumbnail_correlation():
    a = _scan(1).astype(np.float32)[None]
    assert thumbnail(a) @ thumbnail(a * 2 + 30) == pytest.approx(1.0, abs=1e-5)  # brightness and contrast
    assert thumbnail(a) @ thumbnail(_scan(2).astype(np.float32)[None]) < 0.9
    assert not thumbnail(np.ones((1, 20, 20), np.float32)).any()  # a constant image correlates with nothing
    thumbs = np.stack([thumbnail(x) for x in (a, a + 1, _scan(2)[None].astype(np.float32), a * 3)])
    assert duplicate_groups(["d", "b", "c", "a"], thumbs, 0.95) == [["a", "b", "d"]]


def _old_split(names, test_fraction, seed):
    """The split before groups existed: the reference a split without groups must still equal."""
    ordered = sorted(set(names))
    n_test = min(max(round(test_fraction * len(ordered)), 1), len(ordered) - 1)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    test = {ordered[j] for j in perm[:n_test]}
    return [n for n in ordered if n not in test], [n for n in ordered if n in test]


@pytest.mark.parametrize("seed", range(5))
def test_split_without_groups_is_unchanged(seed):
    names = [f"case_{i:03d}" for i in range(37)]
    assert split_names(names, 0.2, seed) == _old_split(names, 0.2, seed)
    assert split_names(names, 0.2, seed, groups={}) == _old_split(names, 0.2, seed)


@pytest.mark.parametrize("seed", range(20))
def test_groups_stay_on_one_side_of_the_split_and_the_labelled_subset(seed):
    names = [f"img_{i:02d}" for i in range(40)]
    groups = group_names([["img_00", "img_01", "img_02"], ["img_10", "img_11"], ["img_20", "img_30", "img_39"]])
    strata = {n: ("normal" if int(n[-2:]) % 4 == 0 else "benign") for n in names}
    train, test = split_names(names, 0.25, seed, groups, strata)
    assert sorted(train + test) == names and 7 <= len(test) <= 11
    for group in set(groups.values()):
        members = {n for n, g in groups.items() if g == group}
        assert members <= set(train) or members <= set(test)
    assert abs(sum(strata[n] == "normal" for n in test) - 0.25 * 10) <= 2  # each category gives its share

    samples = [
        Sample(n, np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.int64), np.eye(4), group=groups.get(n, ""))
        for n in train
    ]
    chosen = {s.name for s in label_subset(samples, 0.3, seed)}
    assert chosen and len(chosen) <= round(0.3 * len(train))
    for group in set(groups.values()):
        members = {n for n, g in groups.items() if g == group} & set(train)
        assert members <= chosen or not members & chosen


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "category"])
def test_partition_keeps_groups_whole(scheme):
    names = [f"img_{i:02d}" for i in range(40)]
    groups = group_names([["img_00", "img_01", "img_02", "img_03"], ["img_10", "img_11"]])
    categories = {n: ("benign", "malignant", "normal")[i % 3] for i, n in enumerate(names)}
    sites = partition_names(names, 4, scheme, alpha=0.5, seed=3, groups=groups, categories=categories)
    assert sorted(n for s in sites for n in s) == names and all(sites)
    for group in (["img_00", "img_01", "img_02", "img_03"], ["img_10", "img_11"]):
        assert sum(bool(set(group) & set(s)) for s in sites) == 1


def test_category_partition_skews_the_classes():
    names = [f"img_{i:03d}" for i in range(300)]
    categories = {n: ("benign", "malignant", "normal")[i % 3] for i, n in enumerate(names)}
    iid = partition_names(names, 4, "iid", seed=1)
    skew = partition_names(names, 4, "category", alpha=0.3, seed=1, categories=categories)

    def spread(sites):  # the largest gap between two sites' shares of one category
        shares = [
            [sum(categories[n] == c for n in s) / len(s) for c in ("benign", "malignant", "normal")] for s in sites
        ]
        return max(max(col) - min(col) for col in zip(*shares))

    assert spread(iid) < 0.25 < 0.5 < spread(skew)
    assert partition_names(list(reversed(names)), 4, "category", alpha=0.3, seed=1, categories=categories) == skew


def test_the_run_splits_by_group_and_stratifies_by_category(tmp_path):
    root = write_busi(tmp_path / "busi", n_per_class=8, duplicate_of=("malignant", 2))
    cfg = Config().replace(
        data={"path": str(root), "test_fraction": 0.25},
        model={"spatial_dims": 2, "img_size": (32, 32), "num_classes": 2},
    )
    for seed in range(6):
        split = read_split(cfg.replace(data={"split_seed": seed}))
        train, test = {s.name for s in split.train}, {s.name for s in split.test}
        pair = {"benign/benign (99)", "malignant/malignant (2)"}
        assert pair <= train or pair <= test
        assert {s.category for s in split.test} == {"benign", "malignant", "normal"}
        assert {s.group for s in split.train + split.test if s.name in pair} == {"benign/benign (99)"}


def test_the_2d_plan_resizes_and_maps_back():
    image = np.random.default_rng(0).uniform(0, 255, (1, 90, 120)).astype(np.float32)
    label = np.zeros((90, 120), np.int64)
    label[30:60, 40:90] = 1
    sample = Sample("x", image, label, np.eye(4))
    plan = decide_plan({"site": fingerprint([sample], "unknown")}, PlanConfig(), (64, 64), 8)
    assert plan.image_fit == "resize" and plan.resizes and plan.input_size == (64, 64)
    prepared = prepare(sample, plan)
    assert prepared.image.shape == (1, 64, 64) and prepared.label.shape == (64, 64)
    assert set(np.unique(prepared.label)) == {0, 1}
    assert abs(prepared.label.mean() - label.mean()) < 0.02
    centre = prepared.affine @ np.array([31.5, 31.5, 0, 1])  # the resized image's centre is the original's
    assert centre[:2] == pytest.approx([44.5, 59.5])
    probs = np.stack([1.0 - prepared.label, prepared.label]).astype(np.float32)  # [2, 64, 64]
    back = restore(probs, prepared.affine, (90, 120), sample.affine).argmax(0)
    assert back.shape == (90, 120) and (back == label).mean() > 0.98
    window = dataclasses.replace(plan, image_fit="window")
    assert prepare(sample, window).image.shape == (1, 90, 120)  # window keeps the pixels


def test_3d_plans_do_not_resize():
    with pytest.raises(Exception, match="plan.image_fit"):
        PlanConfig(target_spacing=(1.0, 1.0, 1.0), image_fit="resize")


def test_a_bad_mask_refuses_training_data_naming_the_file(tmp_path):
    root = write_busi(tmp_path / "busi")
    bad = save_png(root / "normal" / "normal (2)_mask.png", np.full((60, 80), 7, np.uint8))
    cfg = Config().replace(data={"path": str(root)}, model={"spatial_dims": 2, "img_size": (32, 32), "num_classes": 2})
    with pytest.raises(DataError, match="values other than 0 and 255") as exc_info:
        read_split(cfg)
    assert str(bad) in str(exc_info.value)
