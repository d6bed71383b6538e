import numpy as np
import pytest

from amlp_core.data import (
    SiteStyle,
    check_dataset,
    discover,
    load_samples,
    make_phantom,
    make_phantom_samples,
    site_style,
    write_phantom_dataset,
)
from amlp_core.data.transforms import normalize_intensity
from amlp_core.errors import ConfigError


@pytest.mark.parametrize("shape", [(48, 40), (24, 28, 20)])
def test_shapes_and_types(shape):
    image, mask = make_phantom(shape, np.random.default_rng(0))
    assert image.shape == mask.shape == shape
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and np.isfinite(image).all()


def test_same_rng_state_same_phantom():
    a = make_phantom((32, 32, 16), np.random.default_rng(5), site_style(2))
    b = make_phantom((32, 32, 16), np.random.default_rng(5), site_style(2))
    c = make_phantom((32, 32, 16), np.random.default_rng(6), site_style(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)])
def test_lesion_fraction(shape):
    rng = np.random.default_rng(1)
    fractions = [make_phantom(shape, rng)[1].mean() for _ in range(12)]
    assert 0.02 <= np.mean(fractions) <= 0.08
    assert 0.003 < min(fractions) and max(fractions) < 0.15


def test_lesions_brighter_and_rougher():
    image, mask = make_phantom((96, 96), np.random.default_rng(2), SiteStyle(noise_std=0.0))
    lesion, inside = mask.astype(bool), np.zeros_like(mask, bool)
    inside[28:68, 28:68] = True  # central organ region
    organ = inside & ~lesion
    assert image[lesion].mean() > image[organ].mean() + 0.2
    roughness = np.abs(np.diff(image, axis=0))  # neighbour differences: high-frequency energy
    assert roughness[lesion[:-1] & lesion[1:]].mean() > 2 * roughness[organ[:-1] & organ[1:]].mean()


def test_site_styles_differ():
    styles = [site_style(s) for s in range(4)]
    assert styles[0] == SiteStyle() and len(set(styles)) == 4
    assert site_style(3) == site_style(3)
    means = [make_phantom((32, 32), np.random.default_rng(0), style)[0].mean() for style in styles]
    assert len({round(float(m), 3) for m in means}) == 4
    with pytest.raises(ConfigError):
        site_style(-1)


def test_phantom_samples():
    samples = make_phantom_samples(3, (20, 24), seed=4, site=1)
    assert [s.name for s in samples] == ["phantom_s1_0000", "phantom_s1_0001", "phantom_s1_0002"]
    first = samples[0]
    assert first.image.shape == (1, 20, 24) and first.image.dtype == np.float32
    assert first.label.dtype == np.int64 and np.array_equal(first.affine, np.eye(4))
    assert abs(first.image.mean()) < 1e-4 and abs(first.image.std() - 1) < 1e-3
    again = make_phantom_samples(3, (20, 24), seed=4, site=1)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(samples, again))
    other_site = make_phantom_samples(1, (20, 24), seed=4, site=2)[0]
    assert not np.array_equal(other_site.label, first.label)


def test_write_phantom_dataset(tmp_path):
    root = write_phantom_dataset(tmp_path / "site0", n=3, shape=(16, 16, 12), seed=0)
    index = discover(root)
    assert index.fmt == "msd" and len(index.cases) == 3
    assert index.class_names == {0: "background", 1: "lesion"}
    assert check_dataset(root).ok
    loaded = load_samples(index, progress=False)
    expected = make_phantom_samples(3, (16, 16, 12), seed=0)
    for got, want in zip(loaded, expected):
        assert got.name == want.name and np.array_equal(got.label, want.label)
        np.testing.assert_allclose(normalize_intensity(got.image), want.image, atol=1e-5)  # read raw


def test_write_2d_phantom_dataset(tmp_path):
    index = discover(write_phantom_dataset(tmp_path / "flat", n=2, shape=(16, 16), seed=0))
    assert index.spatial_dims == 2 and load_samples(index, progress=False)[0].image.shape == (1, 16, 16)
