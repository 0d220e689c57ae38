"""The one contrastive loss: masked multi-positive InfoNCE (SupCon "L_out" form), METHODS.md §0.

For anchor row ``a`` with similarity ``s_ab = z_a · k_b / τ`` (L2-normalised embeddings ``z`` and keys ``k``)
and positive weights ``w_ab ∈ [0, 1]``::

    ℓ_a = − (1 / Σ_b w_ab) · Σ_b w_ab · [ s_ab − log Σ_{c ∈ D(a)} exp(s_ac) ]
    L   = loss_scale · mean over anchors with Σ_b w_ab > 0 of ℓ_a

where the denominator set ``D(a)`` is every key except ``a``'s own row (the diagonal) and the pairs in the
exclusion mask; positives are in it (SupCon/PCL). A pair that is excluded is neither positive nor
negative: its positive weight is ignored. Anchors without any positive are skipped. A zero-weight key in
``D(a)`` is a negative; a soft positive (0 < w < 1) still counts fully in the denominator.

SimCLR, GCL, PCL and Spade-global are this function with different masks (:mod:`volcontrast.spatial`).

Example::

    z = head(encoder(torch.cat([view1, view2])))          # (2N, D)
    mask = pcl_positive_mask(pos.repeat(2), 0.1, item_ids=view_item_ids(N))
    out = info_nce(z, mask, temperature=0.1)
    out.loss.backward(); log(out.scalars())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volcontrast import dist

__all__ = ["InfoNCELoss", "InfoNCEOutput", "base_temperature_scale", "info_nce"]


def base_temperature_scale(temperature: float, base_temperature: float = 0.07) -> float:
    """The SupCon/PCL-code loss factor ``τ / τ₀`` (``0.1 / 0.07 ≈ 1.43`` for PCL), for ``loss_scale``."""
    return temperature / base_temperature


@dataclass
class InfoNCEOutput:
    """Result of :func:`info_nce`.

    Attributes:
        loss: 0-dim float32 (float64 for float64 input) tensor, differentiable.
        diagnostics: detached 0-dim tensors (no host sync until you read them):

            - ``n_anchors``: rows of this rank; ``n_skipped``: anchors without a positive (not in the loss);
            - ``mean_positives``: mean over scored anchors of Σ_b w_ab (the positive count for hard masks);
            - ``pos_cosine`` / ``neg_cosine``: mean cosine similarity of positive pairs (weighted by w) and of
              negatives (keys in the denominator with w = 0), over this rank's anchors;
            - ``collapse_value``: what ``loss`` would be if every embedding and key were identical,
              ``loss_scale · mean_a ln |D(a)|`` (``loss_scale · ln(2N − 1)`` for 2N rows without exclusions or
              queue) — a loss that sits there means the embeddings have collapsed;
            - ``embedding_std``: mean over dimensions of the per-dimension std of this rank's normalised
              embeddings (0 when collapsed; about ``1/√D`` when spread uniformly on the sphere) and
              ``embedding_spread = embedding_std · √D`` (about 1 healthy, 0 collapsed).
    """

    loss: Tensor
    diagnostics: dict[str, Tensor] = field(default_factory=dict)

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Loss and diagnostics as Python floats (one host sync), e.g. for a log row."""
        out = {f"{prefix}loss": float(self.loss.detach())}
        out.update({f"{prefix}{k}": float(v) for k, v in self.diagnostics.items()})
        return out


_GLOBAL_HINT = " (with gather=True under DDP, masks cover the global batch: all ranks' rows)"


def _check_shape(mask: Tensor, name: str, shape: tuple[int, int], gathered: bool) -> None:
    if tuple(mask.shape) != shape:
        hint = _GLOBAL_HINT if gathered else ""
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}{hint}")


def _as_weights(
    mask: Tensor, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, gathered: bool
) -> Tensor:
    _check_shape(mask, name, shape, gathered)
    return mask.to(device=device, dtype=dtype)


def _as_bool(mask: Tensor | None, name: str, shape: tuple[int, int], device: torch.device, gathered: bool) -> Tensor:
    if mask is None:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    _check_shape(mask, name, shape, gathered)
    return mask.to(device=device, dtype=torch.bool)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 — never half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def info_nce(
    embeddings: Tensor,
    positive_mask: Tensor,
    temperature: float = 0.1,
    *,
    exclude_mask: Tensor | None = None,
    queue: Tensor | None = None,
    queue_positive_mask: Tensor | None = None,
    queue_exclude_mask: Tensor | None = None,
    keys: Tensor | None = None,
    loss_scale: float = 1.0,
    normalize: bool = True,
    gather: bool = False,
) -> InfoNCEOutput:
    """Masked multi-positive InfoNCE (see the module docstring for the formula).

    Args:
        embeddings: ``(M, D)`` anchor rows of this rank (all views, e.g. ``M = 2N``); any float dtype — the
            math runs in float32 (float64 if given float64) with autocast disabled.
        positive_mask: ``(M_g, M_g)`` bool or float weights in ``[0, 1]``; row = anchor, column = key. The
            diagonal is ignored. ``M_g = M`` unless ``gather`` (see below).
        temperature: ``τ`` (> 0).
        exclude_mask: ``(M_g, M_g)`` bool, pairs that are neither positive nor negative.
        queue: ``(Q, D)`` extra keys (e.g. :class:`~volcontrast.losses.queue.MemoryQueue` entries); no
            gradient flows into them. Identical on every rank under DDP.
        queue_positive_mask: ``(M_g, Q)`` bool/weights; default all False (queue keys are negatives).
        queue_exclude_mask: ``(M_g, Q)`` bool.
        keys: ``(M, D)`` separate key embeddings (MoCo: the momentum encoder's output for the *same* rows);
            default the embeddings themselves. Key row ``a`` is the one the diagonal refers to.
        loss_scale: multiplies the loss and ``collapse_value`` (PCL-code parity:
            :func:`base_temperature_scale`).
        normalize: L2-normalise embeddings, keys and queue inside (turn off if already normalised).
        gather: under an initialised process group with more than one rank, compare this rank's anchors with
            the keys of *all* ranks (gathered with gradients, :func:`volcontrast.dist.gather_with_grad`).

    The ``gather`` contract: rows are ordered rank 0's ``M_0`` rows, then rank 1's, … (``M_g = Σ_r M_r``;
    ranks may hold different ``M_r``). The masks describe the **global** batch — shape ``(M_g, M_g)`` and
    ``(M_g, Q)`` — and must be identical on every rank (build them from gathered positions and ids, see
    :func:`volcontrast.dist.gather_no_grad`); the function uses this rank's rows of them. The returned loss is
    this rank's share, normalised so that its **mean over ranks** equals the loss of one process on the
    concatenated batch; with DDP's gradient averaging the parameter gradients are then exactly those of that
    one process. Every rank must call the backward. Without a process group, or with one rank, ``gather``
    changes nothing.

    Returns:
        :class:`InfoNCEOutput` with the scalar ``loss`` and detached ``diagnostics``.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (M, D), got shape {tuple(embeddings.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if keys is not None and keys.shape != embeddings.shape:
        raise ValueError(f"keys must have the embeddings' shape {tuple(embeddings.shape)}, got {tuple(keys.shape)}")
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != embeddings.shape[1]):
        raise ValueError(f"queue must be (Q, {embeddings.shape[1]}), got shape {tuple(queue.shape)}")

    m_local = embeddings.shape[0]
    device = embeddings.device
    dtype = _compute_dtype(embeddings, keys, queue)

    with torch.autocast(device_type=device.type, enabled=False):
        z = embeddings.to(dtype)
        k = z if keys is None else keys.to(dtype)
        if normalize:
            z = F.normalize(z, dim=1)
            k = z if keys is None else F.normalize(k, dim=1)

        # Gather keys across ranks; locate this rank's rows in the global batch.
        start = 0
        n_ranks = dist.world_size() if gather else 1
        if n_ranks > 1:
            k, sizes = dist.gather_with_grad_and_sizes(k)  # plain gather when k needs no gradient
            start = sum(sizes[: dist.rank()])
        m_global = k.shape[0]
        rows = slice(start, start + m_local)

        g = n_ranks > 1
        pos_w = _as_weights(positive_mask, "positive_mask", (m_global, m_global), dtype, device, g)[rows]
        excl = _as_bool(exclude_mask, "exclude_mask", (m_global, m_global), device, g)[rows]
        self_mask = torch.zeros((m_local, m_global), dtype=torch.bool, device=device)
        self_mask[torch.arange(m_local, device=device), torch.arange(start, start + m_local, device=device)] = True
        excl = excl | self_mask

        if queue is not None:
            q = queue.detach().to(device=device, dtype=dtype)
            if normalize:
                q = F.normalize(q, dim=1)
            n_q = q.shape[0]
            if queue_positive_mask is None:
                q_w = torch.zeros((m_local, n_q), dtype=dtype, device=device)
            else:
                q_w = _as_weights(queue_positive_mask, "queue_positive_mask", (m_global, n_q), dtype, device, g)
                q_w = q_w[rows]
            q_excl = _as_bool(queue_exclude_mask, "queue_exclude_mask", (m_global, n_q), device, g)[rows]
            k = torch.cat([k, q], dim=0)
            pos_w = torch.cat([pos_w, q_w], dim=1)
            excl = torch.cat([excl, q_excl], dim=1)
        elif queue_positive_mask is not None or queue_exclude_mask is not None:
            raise ValueError("queue_positive_mask/queue_exclude_mask given without a queue")

        in_denominator = ~excl
        pos_w = pos_w.masked_fill(excl, 0.0)  # an excluded pair is never positive; nor is the diagonal

        cos = z @ k.T  # (M, K) cosine similarities if normalised
        logits = cos / temperature
        masked = logits.masked_fill(excl, float("-inf"))
        row_max = masked.max(dim=1, keepdim=True).values.detach()
        has_terms = in_denominator.any(dim=1, keepdim=True)
        row_max = torch.where(has_terms, row_max, torch.zeros_like(row_max))
        shifted = logits - row_max
        exp_sum = torch.exp(shifted.masked_fill(excl, float("-inf"))).sum(dim=1, keepdim=True)
        log_denominator = torch.log(torch.where(has_terms, exp_sum, torch.ones_like(exp_sum)))
        log_prob = shifted - log_denominator  # (M, K): s_ab - log Σ_c exp(s_ac)

        w_sum = pos_w.sum(dim=1)
        scored = w_sum > 0
        per_anchor = -(pos_w * log_prob).sum(dim=1) / torch.where(scored, w_sum, torch.ones_like(w_sum))
        per_anchor = torch.where(scored, per_anchor, torch.zeros_like(per_anchor))

        # Normaliser: the number of scored anchors in the whole (global) batch, so that the mean over ranks of
        # this rank's loss is the global mean. Computed from the global masks: no communication.
        n_scored = scored.sum()
        if n_ranks > 1:
            n_scored_global = _count_scored_global(
                positive_mask, exclude_mask, queue_positive_mask, queue_exclude_mask, device
            )
            denom = n_scored_global.clamp_min(1).to(dtype) / n_ranks
        else:
            denom = n_scored.clamp_min(1).to(dtype)
        loss = loss_scale * per_anchor.sum() / denom

        with torch.no_grad():
            diagnostics = _diagnostics(z, cos, pos_w, in_denominator, scored, n_scored, denom, loss_scale)
    return InfoNCEOutput(loss=loss, diagnostics=diagnostics)


def _count_scored_global(
    positive_mask: Tensor,
    exclude_mask: Tensor | None,
    queue_positive_mask: Tensor | None,
    queue_exclude_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Anchors of the global batch with at least one positive that is neither excluded nor the diagonal."""
    with torch.no_grad():
        pos = positive_mask.to(device) > 0
        if exclude_mask is not None:
            pos = pos & ~exclude_mask.to(device=device, dtype=torch.bool)
        pos = pos.fill_diagonal_(False)
        has = pos.any(dim=1)
        if queue_positive_mask is not None:
            q = queue_positive_mask.to(device) > 0
            if queue_exclude_mask is not None:
                q = q & ~queue_exclude_mask.to(device=device, dtype=torch.bool)
            has = has | q.any(dim=1)
        return has.sum()


def _diagnostics(
    z: Tensor,
    cos: Tensor,
    pos_w: Tensor,
    in_denominator: Tensor,
    scored: Tensor,
    n_scored: Tensor,
    denom: Tensor,
    loss_scale: float,
) -> dict[str, Tensor]:
    cos = cos.detach()
    z = z.detach()
    m, dim = z.shape
    negatives = in_denominator & (pos_w == 0)
    pos_total = pos_w.sum()
    n_terms = in_denominator.sum(dim=1).to(cos.dtype)
    log_terms = torch.where(scored, torch.log(n_terms.clamp_min(1)), torch.zeros_like(n_terms))
    std = z.std(dim=0, unbiased=False).mean() if m > 1 else z.new_zeros(())
    return {
        "n_anchors": torch.tensor(float(m), device=z.device),
        "n_skipped": (m - n_scored).to(torch.float32),
        "mean_positives": (pos_w.sum(dim=1) * scored).sum() / n_scored.clamp_min(1),
        "pos_cosine": (pos_w * cos).sum() / pos_total.clamp_min(1e-12),
        "neg_cosine": (cos * negatives).sum() / negatives.sum().clamp_min(1),
        "collapse_value": loss_scale * log_terms.sum() / denom,
        "embedding_std": std,
        "embedding_spread": std * math.sqrt(dim),
    }


class InfoNCELoss(nn.Module):
    """:func:`info_nce` with stored settings, as an ``nn.Module``.

    Args:
        temperature: ``τ``.
        loss_scale: loss factor (``base_temperature_scale(τ)`` for PCL-code parity).
        normalize: L2-normalise inside.
        gather: gather keys across DDP ranks (global masks, see :func:`info_nce`).

    Example::

        criterion = InfoNCELoss(temperature=0.1)
        out = criterion(z, simclr_positive_mask(view_item_ids(N)))   # z: (2N, D)
        out.loss.backward()
    """

    def __init__(
        self, temperature: float = 0.1, loss_scale: float = 1.0, normalize: bool = True, gather: bool = False
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.loss_scale = float(loss_scale)
        self.normalize = bool(normalize)
        self.gather = bool(gather)

    def forward(
        self,
        embeddings: Tensor,
        positive_mask: Tensor,
        *,
        exclude_mask: Tensor | None = None,
        queue: Tensor | None = None,
        queue_positive_mask: Tensor | None = None,
        queue_exclude_mask: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> InfoNCEOutput:
        """See :func:`info_nce` for shapes."""
        return info_nce(
            embeddings,
            positive_mask,
            self.temperature,
            exclude_mask=exclude_mask,
            queue=queue,
            queue_positive_mask=queue_positive_mask,
            queue_exclude_mask=queue_exclude_mask,
            keys=keys,
            loss_scale=self.loss_scale,
            normalize=self.normalize,
            gather=self.gather,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, loss_scale={self.loss_scale}, gather={self.gather}"
