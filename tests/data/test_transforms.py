import numpy as np
import pytest

from amlp_core.data import fit_to_roi, normalize_intensity, random_flip, transforms
from amlp_core.data.transforms import strong_augment

SPATIAL = ("P_ROTATE", "P_SCALE")
INTENSITY = ("P_NOISE", "P_BRIGHTNESS", "P_CONTRAST", "P_GAMMA")


def test_normalize_per_channel():
    image = np.stack([np.arange(24.0).reshape(4, 6) * 3 + 7, np.full((4, 6), 2.0)])
    out = normalize_intensity(image)
    assert out.dtype == np.float32 and out.shape == (2, 4, 6)
    assert abs(out[0].mean()) < 1e-6 and abs(out[0].std() - 1) < 1e-5
    assert np.array_equal(out[1], np.zeros((4, 6))) and np.isfinite(out).all()


def test_fit_to_roi_pads_then_center_crops():
    image = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3) + 1
    label = np.ones((5, 3), np.int64)
    out, out_label = fit_to_roi(image, label, (4, 6))
    assert out.shape == (2, 4, 6) and out_label.shape == (4, 6)
    assert out[0, :, 0].min() == image[0].min() and out[1, :, 0].min() == image[1].min()  # padded with min
    assert out_label[:, 0].sum() == 0 and out_label[:, 1:4].all()
    assert np.array_equal(out[:, :, 1:4], image[:, :4])  # center crop of 5 -> 4 starts at 0


def test_fit_to_roi_random_crop_3d_without_label():
    image = np.random.default_rng(0).standard_normal((1, 10, 9, 8)).astype(np.float32)
    a, none = fit_to_roi(image, None, (4, 4, 4), np.random.default_rng(1))
    b, _ = fit_to_roi(image, None, (4, 4, 4), np.random.default_rng(1))
    assert a.shape == (1, 4, 4, 4) and none is None and np.array_equal(a, b)
    assert a.flags.c_contiguous


def test_random_flip_keeps_image_and_label_aligned():
    image = np.random.default_rng(0).standard_normal((1, 6, 7, 5)).astype(np.float32)
    label = (image[0] > 0).astype(np.int64)
    for seed in range(4):
        out, out_label = random_flip(image, label, np.random.default_rng(seed))
        assert out.shape == image.shape and out.flags.c_contiguous and out_label.flags.c_contiguous
        assert np.array_equal(out_label, (out[0] > 0).astype(np.int64))


def _force(monkeypatch, on=(), off=()):
    """Make the named augmentations of strong_augment always (on) or never (off) apply."""
    for name in on:
        monkeypatch.setattr(transforms, name, 1.0)
    for name in off:
        monkeypatch.setattr(transforms, name, 0.0)


def _blob(shape, channels=1):
    """Background -2, an off-centre bright box of 3 labelled 1 with a class-2 core."""
    image = np.full((channels, *shape), -2.0, np.float32)
    box = tuple(slice(s // 5, s // 2) for s in shape)
    core = tuple(slice(s // 5 + 2, s // 2 - 2) for s in shape)
    image[(slice(None), *box)] = 3.0
    label = np.zeros(shape, np.int64)
    label[box], label[core] = 1, 2
    return image, label


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("shape", [(24, 32, 24), (40, 36)])
def test_strong_augment_keeps_shapes_dtypes_and_label_values(monkeypatch, shape):
    _force(monkeypatch, on=SPATIAL + INTENSITY)
    image, label = _blob(shape, channels=2)
    for seed in range(4):
        out, out_label = strong_augment(image, label, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32 and out.flags.c_contiguous
        assert out_label.shape == label.shape and out_label.dtype == np.int64 and out_label.flags.c_contiguous
        assert set(np.unique(out_label)) <= {0, 1, 2} and np.isfinite(out).all()
        assert not np.array_equal(out, image)
        unlabelled, none = strong_augment(image, None, np.random.default_rng(seed))
        assert none is None and unlabelled.shape == image.shape and unlabelled.dtype == np.float32
        assert np.array_equal(unlabelled, out)  # the same draws with or without a label


@pytest.mark.parametrize("shape", [(16, 20, 12), (30, 26)])
def test_strong_augment_label_takes_no_new_values(monkeypatch, shape):
    _force(monkeypatch, on=SPATIAL)
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    label = np.random.default_rng(1).choice([0, 5], size=shape).astype(np.int64)  # interpolating would make 1..4
    for seed in range(3):
        _, out_label = strong_augment(image, label, np.random.default_rng(seed))
        assert set(np.unique(out_label)) == {0, 5}


@pytest.mark.parametrize("shape", [(24, 32, 24), (40, 36)])
def test_strong_augment_moves_image_and_label_together(monkeypatch, shape):
    _force(monkeypatch, on=SPATIAL, off=INTENSITY)
    image, label = _blob(shape)
    for seed in range(4):
        out, out_label = strong_augment(image, label, np.random.default_rng(seed))
        bright, foreground = out[0] > 0.5, out_label > 0
        assert foreground.any() and not np.array_equal(foreground, label > 0)  # it did move
        assert _dice(bright, foreground) > 0.95 > _dice(bright, label > 0)


def test_strong_augment_pads_image_with_its_minimum_and_label_with_zero(monkeypatch):
    _force(monkeypatch, on=["P_SCALE"], off=["P_ROTATE", *INTENSITY])
    monkeypatch.setattr(transforms, "_around_one", lambda rng, low, high: high)  # the largest zoom-out
    image = np.random.default_rng(0).uniform(1, 2, (1, 20, 24, 16)).astype(np.float32)
    label = np.ones((20, 24, 16), np.int64)
    out, out_label = strong_augment(image, label, np.random.default_rng(0))
    assert out.min() >= image.min() - 1e-6 and out.max() <= image.max() + 1e-6
    assert np.allclose(out[0, 0], image.min()) and out_label[0].sum() == 0  # border: padding
    assert out_label[10, 12, 8] == 1 and (out_label == 0).mean() > 0.2


def test_strong_augment_is_deterministic_per_generator():
    image, label = _blob((16, 20, 12))
    runs = [strong_augment(image, label, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    outputs = [strong_augment(image, label, np.random.default_rng(seed))[0] for seed in range(20)]
    assert any(not np.array_equal(out, image) for out in outputs)  # some draws apply something
    assert any(np.array_equal(out, image) for out in outputs)  # and some apply nothing (p ~ 0.2)


def test_strong_augment_intensity_ranges(monkeypatch):
    image = np.random.default_rng(0).standard_normal((1, 12, 10, 8)).astype(np.float32)
    _force(monkeypatch, on=["P_GAMMA"], off=[*SPATIAL, "P_NOISE", "P_BRIGHTNESS", "P_CONTRAST"])
    out, _ = strong_augment(image, None, np.random.default_rng(0))
    assert not np.allclose(out, image) and abs(out.mean() - image.mean()) < 1e-4 and abs(out.std() - image.std()) < 1e-3
    _force(monkeypatch, on=["P_CONTRAST"], off=["P_GAMMA"])
    out, _ = strong_augment(image, None, np.random.default_rng(0))
    assert not np.allclose(out, image) and out.min() >= image.min() and out.max() <= image.max()
    _force(monkeypatch, on=["P_BRIGHTNESS"], off=["P_CONTRAST"])
    out, _ = strong_augment(image, None, np.random.default_rng(0))
    ratio = out / image
    assert np.allclose(ratio, ratio.flat[0]) and 0.75 <= ratio.flat[0] <= 1.25 and ratio.flat[0] != 1
    _force(monkeypatch, on=["P_NOISE"], off=["P_BRIGHTNESS"])
    out, _ = strong_augment(image, None, np.random.default_rng(0))
    assert 0 < np.abs(out - image).std() < 0.1


@pytest.mark.parametrize("shape, radians", [((12, 16, 10), [0.2, -0.15, 0.25]), ((14, 20), [0.25])])
def test_rotate_scale_matches_monai_affine(shape, radians):
    from monai.transforms import Affine

    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    image -= image.min()  # _rotate_scale pads with the minimum, Affine with 0
    out, _ = transforms._rotate_scale(image, None, np.array(radians), 1.2)
    reference = Affine(
        rotate_params=radians if len(shape) == 3 else radians[0],
        scale_params=[1.2] * len(shape),
        padding_mode="zeros",
        image_only=True,
    )(image, mode="bilinear")
    assert np.allclose(out, np.asarray(reference.as_tensor()), atol=1e-4)


def test_crops_of_a_larger_image_centre_on_foreground_with_the_given_share():
    image = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    label = np.zeros((40, 40, 40), np.int64)
    label[37, 2, 30] = 1  # one lesion voxel near a corner

    def hits(share: float) -> int:
        rng = np.random.default_rng(1)
        return sum(int(fit_to_roi(image, label, (16, 16, 16), rng, share)[1].sum()) for _ in range(200))

    assert hits(1.0) == 200  # every crop holds the lesion
    assert hits(0.0) < 40  # a random crop rarely does (about 1 in 170 here)
    assert 40 < hits(0.33) < 120
    # An image that fits the box draws nothing more: crops and the random stream are as without the option.
    small, small_label = image[:, :12, :12, :12], label[:12, :12, :12]
    a, b = np.random.default_rng(2), np.random.default_rng(2)
    out_a = fit_to_roi(small, small_label, (16, 16, 16), a, 1.0)
    out_b = fit_to_roi(small, small_label, (16, 16, 16), b, 0.0)
    assert np.array_equal(out_a[0], out_b[0]) and a.random() == b.random()
