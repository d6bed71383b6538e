"""One geometry for every case: reoriented to RAS and resampled to one spacing, and mapped back exactly.

A grid is a voxel shape and the ``(4, 4)`` affine that maps voxel indices to world millimetres (RAS+, as
in NIfTI; :mod:`amlp_core.data.dicom` converts DICOM's LPS). :func:`planned_grid` gives the grid a case is
trained on; :func:`to_grid` moves an array from one grid onto another. When the two grids differ only by
axis order and direction (a reorientation), the move is an exact index permutation; otherwise it is an
interpolation (scipy's ``affine_transform``: nearest for labels, linear or cubic B-spline for images,
linear for class probabilities), in world coordinates, so an oblique scan keeps its tilt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: The spline order each ``plan.interpolation`` gives to images.
SPLINE_ORDER = {"linear": 1, "bspline": 3}
#: Two spacings closer than this (relative) are the same: no resampling.
SPACING_TOLERANCE = 1e-3
#: A grid whose coarsest spacing is more than this many times its finest is anisotropic (thick slices):
#: nnU-Net's threshold, for its target spacing (amlp_core/data/plan.py) and its separate-z resampling.
ANISOTROPY = 3.0


def low_resolution_axis(*spacings: Sequence[float] | np.ndarray) -> int | None:
    """The axis of the thick slices where any of ``spacings`` (mm per axis) is anisotropic (its coarsest
    side more than :data:`ANISOTROPY` times its finest), else None: that axis is resampled on its own
    (nnU-Net's separate z), so that slices far apart are not blended into each other."""
    for spacing in spacings:
        s = np.asarray(spacing, dtype=np.float64)
        if len(s) == 3 and s.max() > ANISOTROPY * s.min():
            return int(s.argmax())
    return None


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel sides in mm of a ``(4, 4)`` affine: float64 ``[3]``."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def orientation_of(affine: np.ndarray) -> str:
    """The axis codes of ``affine`` (e.g. ``"RAS"``, ``"LPS"``), with ``" oblique"`` when its axes are tilted."""
    codes = "".join(nib.orientations.aff2axcodes(affine))
    directions = np.asarray(affine, dtype=np.float64)[:3, :3] / spacing_of(affine)
    tilted = not np.allclose(np.abs(directions).max(axis=0), 1.0, atol=1e-3)
    return codes + (" oblique" if tilted else "")


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """The same voxels with the axes reordered and flipped to lie closest to R, A, S (no interpolation).

    Args:
        shape: ``(X, Y, Z)``; affine: ``(4, 4)``.

    Returns:
        ``(shape, affine)`` of the reoriented grid; an oblique grid stays oblique (its axes are only
        permuted and flipped).
    """
    ornt = nib.orientations.io_orientation(affine)
    new_shape = tuple(int(shape[int(axis)]) for axis in ornt[:, 0].argsort())
    # inv_ornt_aff: voxel indices of the reoriented grid -> indices of the original one.
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, tuple(shape))
    return new_shape, new_affine


def planned_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] | None
) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid a case of this ``shape`` and ``affine`` is trained on: reoriented to RAS, then with voxel
    sides ``spacing`` (mm, in the RAS axis order; None keeps the case's own).

    The planned grid keeps the case's field of view: ``round(size * old / new)`` voxels per axis (at
    least one), centred where the case's grid is centred, its axes along the case's (reoriented) axes.
    """
    shape, affine = canonical_grid(shape, affine)
    old = spacing_of(affine)
    if spacing is None or np.allclose(old, spacing, rtol=SPACING_TOLERANCE, atol=0):
        return shape, affine
    new = np.asarray(spacing, dtype=np.float64)
    new_shape = tuple(max(1, int(round(n * o / s))) for n, o, s in zip(shape, old, new))
    directions = affine[:3, :3] / old
    out = np.eye(4)
    out[:3, :3] = directions * new
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    out[:3, 3] = centre - out[:3, :3] @ ((np.asarray(new_shape) - 1) / 2)
    return new_shape, out


def _index_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """``(4, 4)``: voxel indices of the destination grid -> indices of the source grid."""
    return np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)


def _as_permutation(matrix: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int]):
    """``(axes, flips)`` when ``matrix`` maps destination indices onto source indices by a permutation and
    flips of whole axes (a pure reorientation of the same voxels), else None."""
    linear, offset = matrix[:3, :3], matrix[:3, 3]
    if not np.allclose(np.abs(linear), np.round(np.abs(linear)), atol=1e-6) or not np.allclose(
        np.abs(linear).sum(axis=0), 1, atol=1e-6
    ):
        return None
    axes = [int(np.abs(linear[:, d]).argmax()) for d in range(3)]  # source axis of destination axis d
    if sorted(axes) != [0, 1, 2] or [int(src_shape[a]) for a in axes] != [int(n) for n in dst_shape]:
        return None
    flips = [bool(linear[axes[d], d] < 0) for d in range(3)]
    for d, (a, flip) in enumerate(zip(axes, flips)):
        expected = (int(src_shape[a]) - 1) if flip else 0
        if abs(offset[a] - expected) > 1e-4:
            return None
    return axes, flips


def to_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    order: int,
    fill: float | None = None,
    separate_axis: int | None = None,
) -> np.ndarray:
    """Move a channel-first array from its grid onto another grid of the same world.

    Args:
        array: ``[C, X, Y, Z]`` on the grid of ``src_affine``.
        dst_shape, dst_affine: the destination grid.
        order: spline order (0 nearest, for labels; 1 linear; 3 cubic B-spline).
        fill: the value outside the source grid (None: the nearest edge voxel, for images and probabilities).
        separate_axis: the destination's thick-slice axis (:func:`low_resolution_axis`), resampled on its
            own by nearest neighbour after the in-plane axes with ``order`` (nnU-Net's separate z), where the
            two grids' axes are parallel (a planned grid's are); None: every axis together with ``order``.

    Returns:
        ``[C, *dst_shape]`` of ``array``'s dtype (rounded for integer arrays). A pure reorientation is an
        exact permutation of the voxels, whatever ``order``.
    """
    matrix = _index_map(src_affine, dst_affine)
    exact = _as_permutation(matrix, array.shape[1:], dst_shape)
    if exact is not None:
        axes, flips = exact
        out = np.transpose(array, (0, *(a + 1 for a in axes)))
        out = np.flip(out, axis=tuple(d + 1 for d, flip in enumerate(flips) if flip))
        return np.ascontiguousarray(out)
    if separate_axis is not None and order > 0:
        shape, affine = canonical_grid(array.shape[1:], src_affine)
        canonical = to_grid(array, src_affine, shape, affine, order)  # (an exact permutation)
        linear = _index_map(affine, dst_affine)[:3, :3]
        if np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6):  # parallel axes: one scale per axis
            return _separate(canonical, _index_map(affine, dst_affine), dst_shape, order, separate_axis, fill)
    out = _resample(array, matrix, dst_shape, order, fill)
    if np.issubdtype(array.dtype, np.integer):
        out = np.rint(out).astype(array.dtype)
    return out.astype(array.dtype, copy=False)


def _separate(
    array: np.ndarray, matrix: np.ndarray, dst_shape: Sequence[int], order: int, axis: int, fill: float | None
) -> np.ndarray:
    """Resampling by a diagonal index map ``matrix`` in two passes: the axes but ``axis`` with ``order``,
    then ``axis`` with order 0. ``array`` ``[C, *S]`` -> ``[C, *dst_shape]``, its dtype."""
    scale, offset = np.diag(matrix[:3, :3]), matrix[:3, 3]
    plane, along = np.eye(4), np.eye(4)
    for a in range(3):
        target = along if a == axis else plane
        target[a, a], target[a, 3] = scale[a], offset[a]
    middle = [int(n) if a != axis else array.shape[1 + a] for a, n in enumerate(dst_shape)]
    out = _resample(_resample(array, plane, middle, order, fill), along, dst_shape, 0, fill)
    return out.astype(array.dtype, copy=False)


def _resample(
    array: np.ndarray, matrix: np.ndarray, dst_shape: Sequence[int], order: int, fill: float | None
) -> np.ndarray:
    """``scipy.ndimage.affine_transform`` of each channel of ``array`` ``[C, *S]`` by the index map ``matrix``."""
    mode, cval = ("nearest", 0.0) if fill is None else ("constant", float(fill))
    channels = [
        ndimage.affine_transform(
            channel.astype(np.float32 if order else channel.dtype, copy=False),
            matrix[:3, :3],
            matrix[:3, 3],
            output_shape=tuple(int(n) for n in dst_shape),
            order=order,
            mode=mode,
            cval=cval,
            prefilter=order > 1,
        )
        for channel in array
    ]
    return np.stack(channels)
