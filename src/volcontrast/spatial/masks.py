"""Positive masks for the shared InfoNCE core: SimCLR, GCL and PCL differ only here (METHODS.md §1).

Every builder returns a ``(M, M)`` bool mask over the ``M`` rows of a batch (all views of all items,
e.g. ``M = 2N`` with the views stacked ``[view 1 of items 0..N-1, view 2 of items 0..N-1]``), symmetric,
with a False diagonal. ``mask[a, b]`` is True when row ``b`` is a positive for anchor ``a``.

``item_ids`` (``(M,)`` integers, equal for the views of one item) makes the views of an item positives of
each other whatever the rule says; build them with :func:`view_item_ids`. Under DDP with gathered rows the
ids must be unique across ranks (e.g. ``view_item_ids(N, offset=rank * N)`` before gathering).

Example::

    p = torch.rand(N)                                      # one position per item
    ids = view_item_ids(N)                                 # (2N,)
    mask = pcl_positive_mask(p.repeat(2), 0.1, item_ids=ids)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from volcontrast.spatial.positions import partition_index

__all__ = ["friend_enemy_masks", "gcl_positive_mask", "pcl_positive_mask", "simclr_positive_mask", "view_item_ids"]


def view_item_ids(
    n_items: int, n_views: int = 2, *, offset: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Item id of every row when ``n_views`` views of ``n_items`` items are stacked view-major.

    Args:
        n_items: items ``N`` in the (local) batch.
        n_views: views per item.
        offset: added to every id (make ids unique across DDP ranks: ``offset = rank * N``).
        device: device of the result.

    Returns:
        ``(n_views * N,)`` long: ``[offset .. offset+N-1] * n_views``.
    """
    return (torch.arange(n_items, device=device) + offset).repeat(n_views)


def _finish(mask: Tensor, item_ids: Tensor | None) -> Tensor:
    """OR in the same-item pairs and clear the diagonal."""
    if item_ids is not None:
        item_ids = torch.as_tensor(item_ids, device=mask.device)
        if item_ids.shape != (mask.shape[0],):
            raise ValueError(f"item_ids must have shape ({mask.shape[0]},), got {tuple(item_ids.shape)}")
        mask = mask | (item_ids[:, None] == item_ids[None, :])
    return mask.fill_diagonal_(False)


def simclr_positive_mask(item_ids: Tensor) -> Tensor:
    """SimCLR/NT-Xent: the other views of the same item are the only positives.

    Args:
        item_ids: ``(M,)`` integer id of each row's item.

    Returns:
        ``(M, M)`` bool, True where the ids match, diagonal False.
    """
    item_ids = torch.as_tensor(item_ids)
    if item_ids.dim() != 1:
        raise ValueError(f"item_ids must be 1-D (M,), got shape {tuple(item_ids.shape)}")
    return _finish(item_ids[:, None] == item_ids[None, :], None)


def _positions_2d(positions: Tensor) -> Tensor:
    """``(M,)`` or ``(M, k)`` positions as a floating ``(M, k)`` tensor."""
    positions = torch.as_tensor(positions)
    if not positions.is_floating_point():
        positions = positions.to(torch.get_default_dtype())
    if positions.dim() == 1:
        return positions[:, None]
    if positions.dim() != 2:
        raise ValueError(f"positions must be (M,) or (M, k), got shape {tuple(positions.shape)}")
    return positions


def gcl_positive_mask(
    positions: Tensor, partitions: int = 4, item_ids: Tensor | None = None, *, axis: int = -1
) -> Tensor:
    """GCL (PCL's G^D-like baseline): positive iff same partition along the body axis, from any volume.

    The partition of a position is ``min(floor(p * S), S - 1)`` (:func:`partition_index`), not the PCL code's
    slice-index rule; see there for the difference.

    Args:
        positions: ``(M,)`` normalised positions along the body axis, or ``(M, k)`` per-axis positions of
            which column ``axis`` is used (default the last: superior in RAS+ order).
        partitions: ``S``, equal partitions of ``[0, 1]``.
        item_ids: ``(M,)`` optional; views of one item are always positive.
        axis: the body-axis column for ``(M, k)`` positions.

    Returns:
        ``(M, M)`` bool, symmetric, diagonal False.
    """
    p = _positions_2d(positions)[:, axis]
    part = partition_index(p, partitions)
    return _finish(part[:, None] == part[None, :], item_ids)


def pcl_positive_mask(positions: Tensor, threshold: float | Sequence[float], item_ids: Tensor | None = None) -> Tensor:
    """PCL: positive iff ``|p_a - p_b| < λ`` (strict), from any volume, same volume included.

    For ``(M, k)`` positions (3D crops, e.g. per-axis body coordinates) the pair is positive iff
    ``|p_a,j - p_b,j| < λ_j`` on every axis ``j`` (a box, not a ball). With ``λ = 0`` nothing but the
    ``item_ids`` pairs is positive, i.e. the mask equals :func:`simclr_positive_mask`.

    Args:
        positions: ``(M,)`` or ``(M, k)`` normalised positions.
        threshold: ``λ`` — one value for all axes, or ``k`` per-axis values.
        item_ids: ``(M,)`` optional; views of one item are always positive (needed for ``λ = 0``).

    Returns:
        ``(M, M)`` bool, symmetric, diagonal False.
    """
    p = _positions_2d(positions)
    lam = torch.as_tensor(threshold, dtype=p.dtype, device=p.device).reshape(-1)
    if lam.numel() not in (1, p.shape[1]):
        raise ValueError(f"threshold has {lam.numel()} values for positions with {p.shape[1]} axes")
    if bool((lam < 0).any()):
        raise ValueError(f"threshold must be >= 0, got {lam.tolist()}")
    close = ((p[:, None, :] - p[None, :, :]).abs() < lam).all(dim=-1)
    return _finish(close, item_ids)


def friend_enemy_masks(anchor_ref: Tensor, key_ref: Tensor, r_friend: float, r_enemy: float,
                       sigma: float = 0.0) -> tuple[Tensor, Tensor]:
    """Spade's spatial debiasing of keys by reference-frame distance ``d = ‖c_a − c_k‖`` (METHODS.md §2).

    - ``d < r_friend``: soft positive ("friend close"), weight ``exp(−d² / 2σ²)`` (σ = r_friend / 2 if 0);
    - ``r_friend <= d < r_enemy``: excluded — neither positive nor negative;
    - ``d >= r_enemy``: negative ("enemy farther"), weight 0 and not excluded.

    With ``r_friend = r_enemy = 0`` every key is a negative (plain InfoNCE).

    Args:
        anchor_ref: (A, k) reference coordinates of the anchors.
        key_ref: (K, k) reference coordinates of the keys.

    Returns:
        ``(weights (A, K) float in [0, 1], exclude (A, K) bool)``.
    """
    d = torch.cdist(anchor_ref.double(), key_ref.double())
    friend = d < r_friend
    s = sigma if sigma > 0 else r_friend / 2
    weights = torch.where(friend, torch.exp(-(d**2) / (2 * s * s)) if s > 0 else torch.ones_like(d),
                          torch.zeros_like(d))
    exclude = (d >= r_friend) & (d < r_enemy)
    return weights.to(torch.float32), exclude
