"""Overlapping view pairs and the warp that brings their features onto the overlap (Spade's local branch).

Two views of one item are resampled from the same box (:func:`volcontrast.views.augment.augment`), each with
its recorded map ``M_v``: view voxel -> box voxel. A point ``o1`` of view 1 is the box point ``M_1 o1`` and
therefore the point ``o2 = M_2⁻¹ M_1 o1`` of view 2 (T_s⁻¹ of the paper's figure). :func:`overlap_points`
draws points of view 1 whose image lies inside view 2; :func:`sample_at` reads a feature map (any decoder
stage) at fractional view-voxel positions by trilinear interpolation, so the two views' features at the same
anatomy line up whatever flips, rotations, zooms and shifts were applied.

:func:`pair_shifts` offsets the two views' centres from the box centre (in opposite directions) so the pair
overlaps only partly: at least ``min_overlap`` of a crop's volume before zoom/rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["apply_maps", "map_view_points", "overlap_points", "pair_shifts", "sample_at"]


def pair_shifts(n: int, crop_size: tuple[int, ...], min_overlap: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Centre offsets (n, dim) float64 for view 1 and view 2 of ``n`` items: ``+d/2`` and ``-d/2``.

    ``d`` is uniform per axis in ``±(1 - min_overlap^(1/dim)) * crop``, so the un-zoomed crops overlap by at
    least ``min_overlap`` of their volume (1.0 -> no shift).
    """
    dim = len(crop_size)
    max_rel = 1.0 - float(min_overlap) ** (1.0 / dim)
    size = torch.tensor(crop_size, dtype=torch.float64)
    d = (torch.rand((n, dim), generator=gen, dtype=torch.float64) * 2 - 1) * max_rel * size
    return d / 2, -d / 2


def apply_maps(maps: Tensor, points: Tensor) -> Tensor:
    """(N, dim+1, dim+1) homogeneous maps applied to (N, ..., dim) points, one map per item; float64."""
    shape, dim = points.shape, points.shape[-1]
    p = points.reshape(shape[0], -1, dim).double()
    m = maps.double()
    return (p @ m[:, :dim, :dim].transpose(1, 2) + m[:, None, :dim, dim]).reshape(shape)


def map_view_points(points: Tensor, src_to_box: Tensor, dst_to_box: Tensor) -> Tensor:
    """(N, K, dim) view voxel points of the source views -> the same box points in the destination views."""
    return apply_maps(torch.linalg.solve(dst_to_box.double(), src_to_box.double()), points)


def overlap_points(src_to_box: Tensor, dst_to_box: Tensor, crop_size: tuple[int, ...], k: int,
                   gen: torch.Generator, oversample: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``k`` points per item in the overlap of two views of the same box.

    Args:
        src_to_box, dst_to_box: (N, dim+1, dim+1) view voxel -> box voxel maps of the two views.
        crop_size: the views' size (both views).
        k: points per item.
        oversample: candidates drawn per kept point (uniform in view 1).

    Returns:
        ``(p_src (N, k, dim), p_dst (N, k, dim), valid (N, k))`` float64 / bool on the CPU: ``p_dst`` is
        ``p_src`` mapped into the second view; ``valid`` is False for slots the overlap could not fill (items
        whose overlap is tiny), never for a point outside either view.
    """
    n, dim = src_to_box.shape[0], len(crop_size)
    hi = torch.tensor([s - 1 for s in crop_size], dtype=torch.float64)
    cand = torch.rand((n, k * oversample, dim), generator=gen, dtype=torch.float64) * hi
    mapped = map_view_points(cand, src_to_box.cpu(), dst_to_box.cpu())
    inside = ((mapped >= 0) & (mapped <= hi)).all(-1)
    # keep the first k inside candidates of each item (candidates are already in random order)
    order = torch.argsort((~inside).to(torch.int8), dim=1, stable=True)[:, :k]
    p_src = torch.gather(cand, 1, order[..., None].expand(-1, -1, dim))
    p_dst = torch.gather(mapped, 1, order[..., None].expand(-1, -1, dim))
    valid = torch.gather(inside, 1, order)
    return p_src, p_dst, valid


def sample_at(features: Tensor, points: Tensor, crop_size: tuple[int, ...]) -> Tensor:
    """Features (N, C, *spatial) at view-voxel points (N, K, dim) -> (N, K, C), trilinear.

    ``features`` may be a down-sampled stage (spatial = crop / s): voxel ``o`` of the view sits at
    ``(o + 0.5) / s - 0.5`` of the map (cell centres), clamped to the map's border.
    """
    n, c = features.shape[:2]
    spatial = features.shape[2:]
    dim = len(spatial)
    stride = [cs / fs for cs, fs in zip(crop_size, spatial)]
    p = points.to(device=features.device, dtype=torch.float32)
    scale = torch.tensor(stride, device=features.device, dtype=torch.float32)
    size = torch.tensor(spatial, device=features.device, dtype=torch.float32)
    f = (p + 0.5) / scale - 0.5
    g = 2.0 * f / (size - 1).clamp_min(1) - 1.0
    grid = g.flip(-1).reshape(n, -1, *([1] * (dim - 1)), dim)  # grid_sample wants (x=W, y=H, z=D) order
    # float32 coordinates and features: bf16 grid coordinates would be off by ~0.2 voxel at 96³
    with torch.autocast(device_type=features.device.type, enabled=False):
        out = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(n, c, -1).transpose(1, 2).to(features.dtype)
