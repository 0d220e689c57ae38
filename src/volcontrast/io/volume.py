"""The canonical in-memory form of a scan: a RAS+ array with the affine that places it in the world.

Every reader in :mod:`volcontrast.io` returns a :class:`Volume` whose array axes point (as closely as the
scan allows) to Right, Anterior, Superior. The original orientation is kept so a result can be written
back in the scan's own geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel import orientations as ornts

RAS_ORNT = ornts.axcodes2ornt(("R", "A", "S"))


@dataclass
class Volume:
    """A scan in canonical RAS+ orientation.

    Attributes:
        array: image ``(X, Y, Z)`` float32 (or ``(C, X, Y, Z)`` for several channels), or a label map
            ``(X, Y, Z)`` of unsigned integers. Axis 0 runs towards Right, 1 towards Anterior, 2 towards
            Superior.
        affine: ``(4, 4)`` voxel index -> RAS world position in mm, for ``array``.
        original_affine: ``(4, 4)`` RAS affine of the array as it was stored on disk.
        original_shape: spatial shape as stored on disk.
        path: where it came from (``None`` when built in memory).
    """

    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray = field(default=None)  # type: ignore[assignment]
    original_shape: tuple[int, ...] = field(default=None)  # type: ignore[assignment]
    path: str | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.original_affine is None:
            self.original_affine = self.affine.copy()
        if self.original_shape is None:
            self.original_shape = tuple(int(s) for s in self.shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)`` (channels excluded)."""
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes."""
        return affine_spacing(self.affine)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    @property
    def original_axcodes(self) -> tuple[str, str, str]:
        return tuple(nib.aff2axcodes(self.original_affine))  # type: ignore[return-value]

    def in_original_orientation(self, array: np.ndarray | None = None) -> np.ndarray:
        """``array`` (default: this volume's) laid out in the stored orientation and axis order."""
        arr = self.array if array is None else array
        return reorient_array(arr, self.affine, self.original_affine)


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm: lengths of the affine's first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def canonical_transform(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The axis permutation/flip that brings an array to RAS+, and the resulting affine.

    Returns ``(ornt, canonical_affine)`` where ``ornt`` is nibabel's ``(3, 2)`` orientation array to pass
    to :func:`nibabel.orientations.apply_orientation`.
    """
    ornt = ornts.io_orientation(np.asarray(affine, dtype=np.float64))
    canonical_affine = np.asarray(affine, dtype=np.float64) @ ornts.inv_ornt_aff(ornt, tuple(shape[:3]))
    return ornt, canonical_affine


def _apply_spatial_orientation(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply ``ornt`` to the last three axes of ``array`` (leading channel axis kept)."""
    if array.ndim == 3:
        return np.ascontiguousarray(ornts.apply_orientation(array, ornt))
    moved = np.moveaxis(array, 0, -1)  # (X, Y, Z, C): apply_orientation acts on the first axes
    return np.ascontiguousarray(np.moveaxis(ornts.apply_orientation(moved, ornt), -1, 0))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``array`` (spatial axes last three, or exactly three) to RAS+; returns ``(array, affine)``."""
    ornt, canonical_affine = canonical_transform(affine, array.shape[-3:])
    return _apply_spatial_orientation(array, ornt), canonical_affine


def reorient_array(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """Permute/flip ``array`` (with ``affine``) to the axis layout of ``target_affine``.

    Both affines must describe the same grid up to axis order and direction (as a canonical volume and
    its original do).
    """
    src = ornts.io_orientation(np.asarray(affine, dtype=np.float64))
    dst = ornts.io_orientation(np.asarray(target_affine, dtype=np.float64))
    return _apply_spatial_orientation(array, ornts.ornt_transform(src, dst))


def reorient_affine(affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray) -> np.ndarray:
    """Affine of ``reorient_array(array, affine, target_affine)`` for an array of spatial ``shape``."""
    src = ornts.io_orientation(np.asarray(affine, dtype=np.float64))
    dst = ornts.io_orientation(np.asarray(target_affine, dtype=np.float64))
    transform = ornts.ornt_transform(src, dst)
    return np.asarray(affine, dtype=np.float64) @ ornts.inv_ornt_aff(transform, tuple(shape[-3:]))


def orientation_affine(axcodes: str | tuple[str, ...]) -> np.ndarray:
    """A unit-spacing affine whose axes point along ``axcodes`` (e.g. ``"LPS"``, ``"PSL"``)."""
    ornt = ornts.axcodes2ornt(tuple(axcodes))
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for i, (axis, flip) in enumerate(ornt):
        aff[int(axis), i] = flip
    return aff
