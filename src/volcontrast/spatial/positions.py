"""Normalised positions of slices and crops: the pseudo-labels of PCL/GCL.

Two conventions (METHODS.md §1):

- :func:`index_position` — ``p = (i + 1) / n`` for slice ``i`` of ``n`` along the scan axis, exactly as the
  PCL paper and code do; in ``(0, 1]``. It ignores where the body is, so two scans with different fields of
  view give different positions for the same anatomy.
- :func:`body_position` — the voxel centre's coordinate inside the body bounding box, ``[0, 1]`` from the
  box's lower to its upper face. This is the default: a scan cropped to the abdomen and one covering
  neck-to-pelvis agree on where the liver sits as long as their body boxes cover the same anatomy.

When the body box fills the whole scan (``lo = 0``, ``hi = n``), the two differ only by a constant half
slice: ``body = (i + 0.5) / n`` (voxel-centre convention, symmetric in ``[0, 1]``) versus the paper's
``(i + 1) / n``.

All functions take Python numbers, NumPy arrays or torch tensors and return the same kind.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["body_position", "index_position", "partition_index"]

ArrayLike = TypeVar("ArrayLike", float, np.ndarray, Tensor)


def index_position(slice_index: ArrayLike, n_slices: int | ArrayLike) -> ArrayLike:
    """Paper-parity slice position ``(i + 1) / n`` in ``(0, 1]``.

    Args:
        slice_index: slice index ``i`` (0-based) along the scan axis; any shape.
        n_slices: number of slices ``n`` of the volume along that axis (broadcasts with ``slice_index``).

    Returns:
        positions, same shape (float; a float tensor for tensor input).
    """
    if isinstance(slice_index, Tensor):
        return (slice_index.to(torch.get_default_dtype()) + 1) / n_slices  # type: ignore[return-value]
    if isinstance(n_slices, Tensor):
        return (torch.as_tensor(slice_index, dtype=torch.get_default_dtype()) + 1) / n_slices  # type: ignore[return-value]
    if np.isscalar(slice_index) and np.isscalar(n_slices):
        return (float(slice_index) + 1.0) / float(n_slices)  # type: ignore[return-value]
    return (np.asarray(slice_index, dtype=np.float64) + 1.0) / np.asarray(n_slices, dtype=np.float64)  # type: ignore[return-value]


def body_position(voxel_coord: ArrayLike, body_lo: ArrayLike, body_hi: ArrayLike) -> ArrayLike:
    """Normalised body-box coordinate ``((v + 0.5) - lo) / (hi - lo)`` of a voxel (per axis).

    The body box is half-open in voxel indices: it holds voxels ``lo .. hi - 1``, i.e. it spans
    ``[lo, hi)`` in corner coordinates, where voxel ``v`` covers ``[v, v + 1)`` and has its centre at
    ``v + 0.5``. So voxels inside the box map into ``(0, 1)``; positions outside the box fall outside
    ``[0, 1]`` (they are not clipped).

    For a crop spanning voxels ``a .. b - 1`` along an axis, its centre is the (fractional) voxel
    coordinate ``(a + b - 1) / 2``.

    Args:
        voxel_coord: voxel index (may be fractional), shape ``(..., k)`` or ``(...)``; ``k`` axes in array
            order.
        body_lo: body-box lower corner (inclusive voxel index), broadcasting with ``voxel_coord``
            (e.g. ``(k,)``).
        body_hi: body-box upper corner (exclusive voxel index), same shape as ``body_lo``.

    Returns:
        positions, the broadcast shape; 0 at the box's lower face, 1 at its upper face.

    Raises:
        ValueError: if the box is empty along some axis (``hi <= lo``).
    """
    if isinstance(voxel_coord, Tensor) or isinstance(body_lo, Tensor) or isinstance(body_hi, Tensor):
        ref = next(t for t in (voxel_coord, body_lo, body_hi) if isinstance(t, Tensor))
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        v, lo, hi = (torch.as_tensor(t, dtype=dtype, device=ref.device) for t in (voxel_coord, body_lo, body_hi))
        if bool((hi <= lo).any()):
            raise ValueError(f"empty body box: lo={lo.tolist()} hi={hi.tolist()} (need hi > lo on every axis)")
        return ((v + 0.5) - lo) / (hi - lo)  # type: ignore[return-value]
    v, lo, hi = (np.asarray(t, dtype=np.float64) for t in (voxel_coord, body_lo, body_hi))
    if np.any(hi <= lo):
        raise ValueError(f"empty body box: lo={lo.tolist()} hi={hi.tolist()} (need hi > lo on every axis)")
    out = ((v + 0.5) - lo) / (hi - lo)
    return float(out) if out.ndim == 0 else out  # type: ignore[return-value]


def partition_index(positions: ArrayLike, partitions: int) -> ArrayLike:
    """GCL partition of a normalised position: ``min(floor(p * S), S - 1)``, clipped below at 0.

    Splits ``[0, 1]`` into ``S`` equal intervals ``[k/S, (k+1)/S)`` (the last one closed), so ``p = 1`` is in
    partition ``S - 1`` and positions slightly outside ``[0, 1]`` go to the nearest end partition.

    This differs from the PCL code's slice-index rule for its GCL baseline (``r = round(n / S)``,
    partition ``= min(floor(i / r), S - 1)``): that rule works on integer slice indices and rounds the
    partition length, so for ``n`` not divisible by ``S`` its partitions are unequal (e.g. ``n = 10, S = 4``
    gives ``r = 3`` and partitions of 3, 3, 3, 1 slices). Ours depends only on the position, so it applies
    to crops and body coordinates too.

    Args:
        positions: normalised positions, any shape.
        partitions: number of partitions ``S >= 1``.

    Returns:
        integer partition ids in ``0 .. S-1`` (``torch.long`` / ``np.int64`` / ``int``), same shape.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if isinstance(positions, Tensor):
        return torch.clamp(torch.floor(positions * partitions), 0, partitions - 1).long()  # type: ignore[return-value]
    out = np.clip(np.floor(np.asarray(positions, dtype=np.float64) * partitions), 0, partitions - 1).astype(np.int64)
    return int(out) if out.ndim == 0 else out  # type: ignore[return-value]
