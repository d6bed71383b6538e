"""Reorientation and resampling onto the plan's grid, and the exact way back."""

import nibabel as nib
import numpy as np
import pytest

from amlp_core.data.geometry import canonical_grid, orientation_of, planned_grid, spacing_of, to_grid


def oblique_lps_affine(spacing=(0.8, 0.6, 3.0), degrees=15.0) -> np.ndarray:
    """An LPS-oriented grid (as a DICOM series is stored) tilted about the first axis, anisotropic."""
    t = np.deg2rad(degrees)
    tilt = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    lps = np.diag([-1.0, -1.0, 1.0])  # in RAS world coordinates: x to the left, y to the back
    affine = np.eye(4)
    affine[:3, :3] = tilt @ lps @ np.diag(spacing)
    affine[:3, 3] = (40.0, 25.0, -30.0)
    return affine


def sphere(shape, affine, centre_mm, radius_mm) -> np.ndarray:
    """Label 1 inside a sphere given in world mm, so that any grid of the same world agrees."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(world - np.asarray(centre_mm), axis=-1) <= radius_mm).astype(np.int64)


def dice(a, b) -> float:
    return 2 * float(((a > 0) & (b > 0)).sum()) / max(1, int((a > 0).sum() + (b > 0).sum()))


def test_orientation_codes():
    assert orientation_of(np.eye(4)) == "RAS"
    assert orientation_of(oblique_lps_affine(degrees=0)) == "LPS"
    assert orientation_of(oblique_lps_affine()) == "LPS oblique"


def test_canonical_grid_is_ras_and_keeps_every_voxel_in_place():
    shape, affine = (30, 40, 12), oblique_lps_affine()
    volume = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    new_shape, new_affine = canonical_grid(shape, affine)
    assert nib.aff2axcodes(new_affine) == ("R", "A", "S")
    moved = to_grid(volume, affine, new_shape, new_affine, order=3)
    assert moved.shape == (1, *new_shape)
    # The same voxel values at the same world positions: an exact permutation, not an interpolation.
    i, j, k = 3, 17, 5
    world = affine @ np.array([i, j, k, 1.0])
    ni, nj, nk, _ = np.rint(np.linalg.inv(new_affine) @ world).astype(int)
    assert moved[0, ni, nj, nk] == volume[0, i, j, k]
    back = to_grid(moved, new_affine, shape, affine, order=1)
    np.testing.assert_array_equal(back, volume)


def test_planned_grid_spacing_and_field_of_view():
    shape, affine = (30, 40, 12), oblique_lps_affine()
    new_shape, new_affine = planned_grid(shape, affine, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(spacing_of(new_affine), 1.0)
    canon_shape, canon_affine = canonical_grid(shape, affine)
    extent = np.asarray(canon_shape) * spacing_of(canon_affine)
    assert np.all(np.abs(np.asarray(new_shape) - extent) <= 1)  # the field of view is kept
    assert orientation_of(new_affine) == "RAS oblique"  # resampled along the scan's own (tilted) axes
    # Centres coincide.
    centre = lambda s, a: a[:3, :3] @ ((np.asarray(s) - 1) / 2) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(new_shape, new_affine), centre(shape, affine), atol=1e-9)


def test_round_trip_oblique_anisotropic_lps_volume():
    """A label resampled onto the plan's 1 mm grid and back lands on the input's own grid and overlays it."""
    shape, affine = (40, 48, 14), oblique_lps_affine()
    centre = affine @ np.array([20, 24, 7, 1.0])
    label = sphere(shape, affine, centre[:3], 9.0)
    image = (label * 100 + 20).astype(np.float32)[None]
    planned_shape, planned_affine = planned_grid(shape, affine, (1.0, 1.0, 1.0))
    planned_label = to_grid(label[None], affine, planned_shape, planned_affine, order=0, fill=0)[0]
    planned_image = to_grid(image, affine, planned_shape, planned_affine, order=1)
    # On the planned grid the label is the sphere, as that grid sees it.
    assert dice(planned_label, sphere(planned_shape, planned_affine, centre[:3], 9.0)) > 0.9
    assert planned_image.shape == (1, *planned_shape)
    # Back onto the input's grid: same shape, voxel for voxel close to the original.
    back_label = to_grid(planned_label[None], planned_affine, shape, affine, order=0, fill=0)[0]
    back_image = to_grid(planned_image, planned_affine, shape, affine, order=1)
    assert back_label.shape == shape and back_image.shape == (1, *shape)
    assert back_label.dtype == label.dtype
    assert dice(back_label, label) > 0.9
    assert np.corrcoef(back_image.ravel(), image.ravel())[0, 1] > 0.9


def test_same_spacing_is_exact_both_ways():
    shape, affine = (20, 24, 9), oblique_lps_affine()
    volume = np.random.default_rng(1).integers(0, 3, size=(1, *shape))
    planned_shape, planned_affine = planned_grid(shape, affine, tuple(spacing_of(canonical_grid(shape, affine)[1])))
    forward = to_grid(volume, affine, planned_shape, planned_affine, order=0)
    np.testing.assert_array_equal(to_grid(forward, planned_affine, shape, affine, order=0), volume)


@pytest.mark.parametrize("order", [1, 3])
def test_interpolation_keeps_a_smooth_image(order):
    shape, affine = (24, 24, 8), oblique_lps_affine(spacing=(1.0, 1.0, 2.0), degrees=0)
    x = np.linspace(0, 1, shape[0], dtype=np.float32)
    image = np.broadcast_to(x[:, None, None], shape)[None].copy()
    planned_shape, planned_affine = planned_grid(shape, affine, (1.0, 1.0, 1.0))
    planned = to_grid(image, affine, planned_shape, planned_affine, order=order)
    assert planned_shape[2] == 16 and planned.min() >= -0.05 and planned.max() <= 1.05
