"""Masks for masked image modelling: tube masks (Alice) and block masks (MAE).

:func:`block_mask` (MAE, nnssl): the volume is cut into a grid of ``bx × by × bz`` blocks (``⌈X / bx⌉ ·
⌈Y / by⌉ · ⌈Z / bz⌉``; partial blocks at the far edges), and exactly ``n = round(ratio · n_blocks)`` blocks
(half rounded up) are masked per sample: with sizes that are multiples of the block the masked voxel fraction is
exactly ``n / n_blocks`` (32³ crops, 16³ blocks, 6 of 8 → 75 %; nnssl: 160³, 16³, 750 of 1000).

:func:`tube_mask` (Alice): in-plane blocks extruded through the slice axis.

The plane spanned by the two axes other than ``slice_axis`` is cut into a grid of ``bh × bw`` blocks
(``gh = ⌈H / bh⌉`` by ``gw = ⌈W / bw⌉``; the last row/column of blocks may be partial and then masks only the
voxels it covers). Every sample draws exactly ``n = round(ratio · gh · gw)`` blocks (half rounded up) at random
and each chosen block is masked along the whole slice axis, a ``bh × bw × S`` "tube"::

    mask[b, i, j, s] = chosen[b, ⌊i / bh⌋, ⌊j / bw⌋]          (slice_axis = 2; True = masked)

When ``H`` and ``W`` are multiples of the block the masked voxel fraction is exactly ``n / (gh · gw)``
(Alice: 64³ crops, 16×16 blocks, 12 of 16 → 75 %). With two spatial axes the blocks tile the image and
there is no extrusion. The masked input is :func:`apply_mask` (voxels set to 0, as in the Alice code); the
reconstruction loss is :func:`masked_mse`, on masked voxels (MAE-style) or on all voxels (Alice code).

Example::

    mask = tube_mask(x.shape[0], x.shape[2:], ratio=0.75, block=16, slice_axis=2, device=x.device)
    pred = model(apply_mask(x, mask))                                  # student sees the masked crop
    loss = masked_mse(pred, x, mask)                                   # masked voxels only
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["apply_mask", "block_mask", "masked_mse", "tube_mask"]


def _check_args(batch: int, spatial_shape: Sequence[int], ratio: float) -> tuple[int, ...]:
    """The spatial shape as ints, after checking the arguments every mask takes."""
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"spatial_shape must be 2 or 3 positive sizes, got {tuple(spatial_shape)}")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return shape


def _pair(block: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(block, int):
        block = (block, block)
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be one size or two in-plane sizes, each >= 1, got {block}")
    return block  # type: ignore[return-value]


def tube_mask(
    batch: int,
    spatial_shape: Sequence[int],
    ratio: float = 0.75,
    block: int | Sequence[int] = (16, 16),
    slice_axis: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random tube masks, an independent draw per sample.

    Args:
        batch: number of samples ``B`` (>= 0).
        spatial_shape: ``(X, Y, Z)`` for volumes or ``(H, W)`` for images.
        ratio: fraction of in-plane blocks to mask, in ``[0, 1)``.
        block: in-plane block size, one int or ``(size along the first, size along the second)`` of the two
            in-plane axes, in axis order (for 2D: the two axes of the image).
        slice_axis: spatial axis (0, 1, 2, or negative) the blocks are extruded through; ignored in 2D.
        generator: random source for ``torch.randperm`` (CPU, or on the generator's device); seeded → the same
            masks.
        device: device of the returned mask (default CPU).

    Returns:
        bool ``(B, *spatial_shape)``, True = masked.
    """
    shape = _check_args(batch, spatial_shape, ratio)
    bh, bw = _pair(block)
    if len(shape) == 3:
        if not -3 <= slice_axis <= 2:
            raise ValueError(f"slice_axis must be 0, 1 or 2 (or -3..-1) for 3D shapes, got {slice_axis}")
        axis = slice_axis % 3
        plane = tuple(s for i, s in enumerate(shape) if i != axis)
    else:
        axis = None
        plane = shape
    h, w = plane
    gh, gw = math.ceil(h / bh), math.ceil(w / bw)
    n_blocks = gh * gw
    n_masked = min(n_blocks, math.floor(ratio * n_blocks + 0.5))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.zeros(batch, n_blocks, dtype=torch.bool, device=gen_device)
    for b in range(batch):
        idx = torch.randperm(n_blocks, generator=generator, device=gen_device)[:n_masked]
        chosen[b, idx] = True
    grid = chosen.to(device if device is not None else "cpu").view(batch, gh, gw)
    in_plane = grid.repeat_interleave(bh, dim=1).repeat_interleave(bw, dim=2)[:, :h, :w]  # (B, H, W)
    if axis is None:
        return in_plane.contiguous()
    return in_plane.unsqueeze(axis + 1).expand(batch, *shape).contiguous()


def block_mask(
    batch: int,
    spatial_shape: Sequence[int],
    ratio: float = 0.75,
    block: int | Sequence[int] = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random block masks (MAE), an independent draw per sample.

    Args:
        batch: number of samples ``B`` (>= 0).
        spatial_shape: ``(X, Y, Z)`` (or ``(H, W)``).
        ratio: fraction of blocks to mask, in ``[0, 1)``.
        block: block size, one int or one per axis.
        generator: random source (seeded → the same masks).
        device: device of the returned mask (default CPU).

    Returns:
        bool ``(B, *spatial_shape)``, True = masked.
    """
    shape = _check_args(batch, spatial_shape, ratio)
    sizes = (int(block),) * len(shape) if isinstance(block, int) else tuple(int(b) for b in block)
    if len(sizes) != len(shape) or min(sizes) < 1:
        raise ValueError(f"block must be one size or {len(shape)} sizes, each >= 1, got {block}")
    grid = tuple(math.ceil(s / b) for s, b in zip(shape, sizes))
    n_blocks = math.prod(grid)
    n_masked = min(n_blocks, math.floor(ratio * n_blocks + 0.5))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand(batch, n_blocks, generator=generator, device=gen_device).argsort(dim=1)
    chosen = order < n_masked  # ranks of a random permutation: exactly n_masked True per row
    mask = chosen.to(device if device is not None else "cpu").view(batch, *grid)
    for axis, b in enumerate(sizes):
        mask = mask.repeat_interleave(b, dim=axis + 1)
    index = (slice(None), *(slice(0, s) for s in shape))
    return mask[index].contiguous()


def _check_mask(x: Tensor, mask: Tensor, name: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked), got {mask.dtype}")
    if x.dim() < 3 or tuple(mask.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"mask must be (B, *spatial) = {(x.shape[0], *x.shape[2:])} for {name} (B, C, *spatial) "
            f"{tuple(x.shape)}, got {tuple(mask.shape)}"
        )


def apply_mask(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """Set the masked voxels of every channel to ``value`` (a new tensor; gradients flow to the visible voxels).

    Shapes:
        x ``(B, C, *spatial)``, mask bool ``(B, *spatial)`` → ``(B, C, *spatial)``.
    """
    _check_mask(x, mask, "x")
    return x.masked_fill(mask.unsqueeze(1).to(x.device), value)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None, masked_only: bool = True) -> Tensor:
    """Mean squared error over the masked voxels (MAE-style), or over all voxels.

    Args:
        pred: ``(B, C, *spatial)`` reconstruction.
        target: same shape (the unmasked input).
        mask: bool ``(B, *spatial)``, True = masked; ``None`` means all voxels.
        masked_only: False averages over all voxels (the Alice code), whatever the mask.

    Returns:
        0-dim float32 (float64 for float64 input): ``Σ_masked Σ_c (pred − target)² / (n_masked · C)``, or
        ``F.mse_loss(pred, target)``. With no masked voxel it is 0, still connected to ``pred``'s graph.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p, t = pred.to(dtype), target.to(dtype)
        if mask is None or not masked_only:
            return F.mse_loss(p, t)
        _check_mask(pred, mask, "pred")
        m = mask.unsqueeze(1).to(p.device).expand_as(p)
        sq = torch.where(m, (p - t) ** 2, torch.zeros((), dtype=dtype, device=p.device))
        return sq.sum() / m.sum().clamp_min(1).to(dtype)
