"""Per-volume preprocessing steps: resampling with an exact affine, body mask and box, intensity normalisation.

Every step keeps the world geometry exact: a resampled or cropped array comes with the affine that maps its
voxel indices to the same RAS millimetres as the input's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# ------------------------------------------------------------------------------------------- resampling


@dataclass(frozen=True)
class ResampleGrid:
    """How a resampled grid relates to its source grid.

    ``old_index = scale * new_index + offset`` per axis; ``affine`` is the new voxel -> world map.
    """

    shape: tuple[int, int, int]
    scale: np.ndarray  # (3,) = target spacing / source spacing
    offset: np.ndarray  # (3,)
    affine: np.ndarray  # (4, 4)

    @property
    def index_map(self) -> np.ndarray:
        """(4, 4) new voxel index -> old voxel index."""
        m = np.eye(4)
        m[:3, :3] = np.diag(self.scale)
        m[:3, 3] = self.offset
        return m

    def is_identity(self) -> bool:
        return bool(np.allclose(self.scale, 1.0, atol=1e-6) and np.allclose(self.offset, 0.0, atol=1e-6))


def resample_grid(
    shape: tuple[int, ...], affine: np.ndarray, target_spacing: tuple[float, float, float]
) -> ResampleGrid:
    """The grid with voxel size ``target_spacing`` (mm) covering the same extent, centred on the source.

    The new shape is ``round(n * spacing / target)``; voxel centres keep the exact target spacing and the grid
    is centred on the source grid's centre, so world positions map exactly through the returned affine.
    """
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    target = np.asarray(target_spacing, dtype=np.float64)
    n_old = np.asarray(shape[-3:], dtype=np.float64)
    n_new = np.maximum(1, np.round(n_old * spacing / target)).astype(int)
    scale = target / spacing
    if np.array_equal(n_new, n_old) and np.allclose(scale, 1.0, rtol=1e-4):
        scale = np.ones(3)
    offset = (n_old - 1) / 2 - scale * (n_new - 1) / 2
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = offset
    return ResampleGrid(tuple(int(v) for v in n_new), scale, offset, np.asarray(affine, dtype=np.float64) @ m)  # type: ignore[arg-type]


def resample_image(array: np.ndarray, grid: ResampleGrid, order: int = 1) -> np.ndarray:
    """Resample (X, Y, Z) or (C, X, Y, Z) float data onto ``grid`` (order 1 linear, 3 cubic; edge values)."""
    if grid.is_identity():
        return np.array(array, dtype=np.float32, copy=True)  # callers normalise the result in place
    if array.ndim == 4:
        return np.stack([resample_image(a, grid, order) for a in array])
    out = ndimage.affine_transform(
        np.asarray(array, dtype=np.float32), grid.scale, offset=grid.offset, output_shape=grid.shape,
        order=order, mode="nearest", prefilter=order > 1,
    )
    return out.astype(np.float32, copy=False)


def resample_label(label: np.ndarray, grid: ResampleGrid, mode: str = "linear") -> np.ndarray:
    """Resample an integer label map: ``"nearest"``, or ``"linear"`` = one-hot linear + argmax (nnU-Net)."""
    if grid.is_identity():
        return label
    if mode == "nearest":
        return ndimage.affine_transform(label, grid.scale, offset=grid.offset, output_shape=grid.shape,
                                        order=0, mode="nearest")
    if mode != "linear":
        raise ValueError(f"label interpolation must be 'nearest' or 'linear', got {mode!r}")
    best = np.full(grid.shape, -1.0, dtype=np.float32)
    out = np.zeros(grid.shape, dtype=label.dtype)
    for value in np.unique(label):
        p = ndimage.affine_transform((label == value).astype(np.float32), grid.scale, offset=grid.offset,
                                     output_shape=grid.shape, order=1, mode="nearest")
        better = p > best
        out[better] = value
        best[better] = p[better]
    return out


# ---------------------------------------------------------------------------------------- body mask / box


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(image: np.ndarray, modality: str, *, ct_threshold: float = -500.0) -> np.ndarray:
    """Boolean (X, Y, Z) body mask: CT ``HU > ct_threshold``, MR Otsu; largest component, holes filled.

    ``image`` is one channel in raw units (HU for CT). An empty result falls back to the whole array.
    """
    if modality == "ct":
        mask = image > ct_threshold
    else:
        lo, hi = np.percentile(image, [0.5, 99.5])  # robust to a few extreme voxels
        itk = sitk.GetImageFromArray(np.ascontiguousarray(np.clip(image, lo, hi), dtype=np.float32))
        otsu = sitk.OtsuThreshold(itk, 0, 1, 128)
        mask = sitk.GetArrayFromImage(otsu).astype(bool)
    if not mask.any():
        return np.ones(image.shape, dtype=bool)
    mask = largest_component(mask)
    return ndimage.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """Half-open voxel box ``((x0, x1), (y0, y1), (z0, z1))`` of the True voxels, grown by ``margin``."""
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(hit[0]) - margin, int(hit[-1]) + 1 + margin
        box.append((max(lo, 0), min(hi, int(mask.shape[axis]))))
    return tuple(box)


def crop_affine(affine: np.ndarray, lower: tuple[int, int, int]) -> np.ndarray:
    """Affine of ``array[x0:, y0:, z0:]`` given the affine of ``array``."""
    shift = np.eye(4)
    shift[:3, 3] = lower
    return np.asarray(affine, dtype=np.float64) @ shift


# --------------------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class CTStats:
    """Dataset-level CT intensity statistics (nnU-Net's CT scheme)."""

    clip_low: float
    clip_high: float
    mean: float
    std: float


def ct_stats(samples: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> CTStats:
    """Percentile clip window from foreground samples, then mean/std of the clipped samples."""
    if samples.size == 0:
        raise ValueError("no foreground samples to compute CT statistics")
    lo, hi = np.percentile(samples, percentiles)
    clipped = np.clip(samples, lo, hi)
    return CTStats(float(lo), float(hi), float(clipped.mean()), float(max(clipped.std(), 1e-8)))


def normalize_ct(image: np.ndarray, stats: CTStats) -> np.ndarray:
    return ((np.clip(image, stats.clip_low, stats.clip_high) - stats.mean) / stats.std).astype(np.float32)


def normalize_zscore(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-volume z-score with mean/std over ``mask`` voxels; returns (normalised, mean, std)."""
    values = image[mask] if mask.any() else image.ravel()
    mean, std = float(values.mean()), float(max(values.std(), 1e-8))
    return ((image - mean) / std).astype(np.float32), mean, std


def sample_voxels(image: np.ndarray, mask: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` values of ``image`` inside ``mask``, drawn reproducibly."""
    values = image[mask]
    if values.size <= n:
        return values.astype(np.float32)
    idx = np.random.default_rng(seed).choice(values.size, size=n, replace=False)
    return values[np.sort(idx)].astype(np.float32)
