"""Geometry that travels with every view: view voxel -> cached voxel -> world mm, body and index positions.

``CaseTable`` holds per-case facts of the cache (affine, body box, crop offset, resampled shape) as tensors;
``view_geometry`` turns a batch's box positions and augmentation maps into a :class:`ViewGeometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from volcontrast.data.cache import Cache
from volcontrast.spatial.positions import body_position


@dataclass
class CaseTable:
    """Per-case geometry of a case pool, as tensors indexed by the pool's case index."""

    ids: list[str]
    affine: Tensor  # (K, 4, 4) float64 cached voxel -> world mm
    body_lower: Tensor  # (K, 3) body box lower corner (voxel, inclusive)
    body_upper: Tensor  # (K, 3) body box upper corner (voxel, exclusive)
    crop_offset: Tensor  # (K, 3) cached voxel 0 = this voxel of the resampled full volume
    resampled_shape: Tensor  # (K, 3)
    shape: Tensor  # (K, 3) cached array shape
    cache: Cache | None = None  # the cache the table was read from (correspondence providers need it)

    @classmethod
    def from_cache(cls, cache: Cache, ids: list[str]) -> CaseTable:
        metas = [cache.meta(cid) for cid in ids]

        def t(rows) -> Tensor:
            return torch.tensor(np.asarray(rows, dtype=np.float64))

        return cls(
            ids=list(ids),
            affine=t([m.affine for m in metas]),
            body_lower=t([[b[0] for b in m.body_bbox] for m in metas]),
            body_upper=t([[b[1] for b in m.body_bbox] for m in metas]),
            crop_offset=t([m.crop_offset for m in metas]),
            resampled_shape=t([m.resampled_shape for m in metas]),
            shape=t([m.shape for m in metas]),
            cache=cache,
        )


@dataclass
class ViewGeometry:
    """Where each of N views sits. All tensors are float64 on the CPU (cheap, exact)."""

    case_index: Tensor  # (N,) index into the CaseTable
    voxel_to_cached: Tensor  # (N, 4, 4) view voxel (i, j, k[=0 in 2D]) -> cached voxel index
    world_centre: Tensor  # (N, 3) mm, RAS
    body_centre: Tensor  # (N, 3) normalised body-box coordinates of the view centre
    index_position: Tensor  # (N, 3) (i + 0.5) / n per axis of the resampled volume (2D slices: z = (i+1)/n)
    params: dict[str, Tensor] = field(default_factory=dict)
    cached_centre: Tensor | None = None  # (N, 3) cached voxel coordinates of the view centre (computed once here)

    def positions(self, kind: str, axes: str = "z") -> Tensor:
        """Positions for positive masks: ``kind`` "body" or "index"; ``axes`` "z" -> (N,), "xyz" -> (N, 3)."""
        table = {"body": self.body_centre, "index": self.index_position}
        if kind not in table:
            raise ValueError(f"position kind must be 'body' or 'index', got {kind!r}")
        p = table[kind]
        return p[:, 2] if axes == "z" else p


def view_to_cached(box_lower: Tensor, voxel_to_box: Tensor) -> Tensor:
    """Compose box placement and augmentation into (N, 4, 4) view voxel -> cached voxel.

    3D: ``voxel_to_box`` is (N, 4, 4). 2D: (N, 3, 3) on (i, j); the slice index comes from ``box_lower[:, 2]``.
    """
    n = box_lower.shape[0]
    out = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    lower = box_lower.to(torch.float64)
    if voxel_to_box.shape[-1] == 4:
        out[:, :3, :] = voxel_to_box[:, :3, :].to(torch.float64)
        out[:, :3, 3] += lower
    else:
        out[:, :2, :2] = voxel_to_box[:, :2, :2].to(torch.float64)
        out[:, :2, 3] = voxel_to_box[:, :2, 2].to(torch.float64) + lower[:, :2]
        out[:, 2, 2] = 0.0  # k does not move along the slice axis
        out[:, 2, 3] = lower[:, 2]
    return out


def view_geometry(case_index: Tensor, box_lower: Tensor, voxel_to_box: Tensor, crop_size: tuple[int, ...],
                  table: CaseTable, params: dict[str, Tensor] | None = None) -> ViewGeometry:
    """Geometry of N views given their case, box position and augmentation map."""
    case_index = case_index.to(torch.long).cpu()
    m = view_to_cached(box_lower.cpu(), voxel_to_box.cpu())
    centre = torch.tensor([(s - 1) / 2 for s in crop_size] + [0.0] * (3 - len(crop_size)) + [1.0], dtype=torch.float64)
    cached = (m @ centre)[:, :3]  # (N, 3) cached voxel coordinates of the view centre
    homogeneous = torch.cat([cached, torch.ones(len(cached), 1, dtype=torch.float64)], 1)
    world = (table.affine[case_index] @ homogeneous[..., None])[:, :3, 0]
    body = body_position(cached, table.body_lower[case_index], table.body_upper[case_index])
    full = cached + table.crop_offset[case_index]
    index = (full + 0.5) / table.resampled_shape[case_index]
    if len(crop_size) == 2:  # paper parity for slices: (i + 1) / n along the scan axis
        index[:, 2] = (full[:, 2] + 1.0) / table.resampled_shape[case_index, 2]
    return ViewGeometry(case_index, m, world, body, index, dict(params or {}), cached_centre=cached)


def world_boxes(voxel_to_cached: Tensor, crop_size: tuple[int, ...], affine: Tensor) -> tuple[Tensor, Tensor]:
    """Axis-aligned world boxes (mm) of N 3D views: the bounding box of the view's voxel cube (edges at
    ``-0.5`` and ``size - 0.5`` of each view axis) mapped view voxel -> cached voxel -> world.

    With flips (and any axis permutation) the box is exactly the view's footprint; with rotations it is the
    footprint's bounding box.

    Args:
        voxel_to_cached: (N, 4, 4) view voxel -> cached voxel (``ViewGeometry.voxel_to_cached``).
        crop_size: the view's 3 sizes.
        affine: (N, 4, 4) cached voxel -> world mm of each view's case.

    Returns:
        ``(lower, upper)``, each (N, 3) float64 world mm.
    """
    if len(crop_size) != 3:
        raise ValueError(f"world_boxes needs 3D views, got crop size {tuple(crop_size)}")
    lo = [-0.5] * 3
    hi = [s - 0.5 for s in crop_size]
    corners = torch.tensor([[hi[0] if i & 1 else lo[0], hi[1] if i & 2 else lo[1], hi[2] if i & 4 else lo[2], 1.0]
                            for i in range(8)], dtype=torch.float64)  # (8, 4)
    m = affine.to(torch.float64) @ voxel_to_cached.to(torch.float64)  # (N, 4, 4) view voxel -> world
    world = torch.einsum("nij,kj->nki", m, corners)[..., :3]  # (N, 8, 3)
    return world.min(dim=1).values, world.max(dim=1).values


def overlap_fractions(target_lower: Tensor, target_upper: Tensor, base_lower: Tensor, base_upper: Tensor) -> Tensor:
    """Fraction of each target box's volume that lies inside each base box (VoCo's labels).

    ``y[t, k] = Π_a max(0, min(U_t,a, U_k,a) − max(L_t,a, L_k,a)) / Π_a (U_t,a − L_t,a)`` over the box axes.

    Shapes:
        targets (T, A), bases (K, A) -> (T, K) in [0, 1]; ``A`` axes (3 for volumes).
    """
    inter = (torch.minimum(target_upper[:, None], base_upper[None]) -
             torch.maximum(target_lower[:, None], base_lower[None])).clamp_min(0)  # (T, K, A)
    size = (target_upper - target_lower).clamp_min(1e-12)  # (T, A)
    return inter.prod(-1) / size.prod(-1)[:, None]
