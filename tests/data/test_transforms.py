import numpy as np

from amlp_core.data import fit_to_roi, normalize_intensity, random_flip


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
