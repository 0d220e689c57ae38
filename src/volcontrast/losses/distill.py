"""DINO-style self-distillation: prototype head, teacher centering/sharpening, cross-entropy, schedules.

A student network ``s`` and a teacher ``t`` (an EMA of the student) map an input to ``K`` prototype logits
through a :class:`DINOHead`. With a centre ``c`` (an EMA of the teacher's batch-mean logits), temperatures
``τ_s`` (student) and ``τ_t`` (teacher, sharper)::

    P_t = softmax((h_t − c) / τ_t)                  (Centering.targets: centering + sharpening, no gradient)
    P_s = softmax(h_s / τ_s)
    L   = mean over rows of H(P_t, P_s) = − Σ_k P_t,k · log P_s,k          (distill_loss)
    c  ← m · c + (1 − m) · mean over the global batch of h_t              (Centering.update, m = 0.9)

Centering alone pushes the teacher towards the uniform distribution and sharpening alone towards one
prototype; together (with the EMA teacher) they avoid collapse without negatives (DINO; Alice §3 of
METHODS.md). A row is a vector ``(B, K)`` (global token) or a token ``(B, N, K)`` (CASA-aligned tokens);
every function here treats all leading dimensions as rows.

Schedules (plain functions of the step): teacher momentum :func:`cosine_schedule` 0.996 → 1, teacher
temperature :func:`warmup_then_constant` 0.04 → 0.07 (the Alice code used 0.008 → 0.01).
Diagnostics for a collapse monitor: :func:`teacher_entropy` (0 = one-hot, ``ln K`` = uniform) and
:func:`prototype_usage`.

Example::

    head_s, head_t = DINOHead(384), DINOHead(384)             # teacher: EMA copy, no grad
    centre = Centering(num_prototypes=512)
    with torch.no_grad():
        t_logits = head_t(teacher_feats)                      # (B, 512)
    p_t = centre.targets(t_logits, temperature=warmup_then_constant(0.04, 0.07, warmup, step))
    loss = distill_loss(head_s(student_feats), p_t, student_temperature=0.1)
    centre.update(t_logits)                                   # after the loss; all-reduced under DDP
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volcontrast import dist

__all__ = [
    "Centering",
    "DINOHead",
    "WeightNormLinear",
    "cosine_schedule",
    "distill_loss",
    "koleo_loss",
    "prototype_usage",
    "teacher_entropy",
    "warmup_then_constant",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16/fp16/fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class WeightNormLinear(nn.Module):
    """Bias-free Linear with a weight-normalised matrix: row ``k`` of the weight is ``g_k · v_k / ‖v_k‖``.

    Args:
        in_features: input size ``D``.
        out_features: number of prototypes ``K``.
        fix_norm: keep ``g = 1`` (``weight_g`` is a parameter with ``requires_grad=False``), so every
            prototype has unit norm and the logits of an L2-normalised input are cosine similarities
            (DINO's ``norm_last_layer=True``).

    Parameters: ``weight_v`` ``(K, D)`` (direction) and ``weight_g`` ``(K,)`` (norm).

    Shapes:
        ``(..., D)`` → ``(..., K)``.
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight_v = nn.Parameter(torch.empty(self.out_features, self.in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(self.out_features), requires_grad=not fix_norm)
        self.fix_norm = bool(fix_norm)

    @property
    def weight(self) -> Tensor:
        """The effective ``(K, D)`` matrix ``g · v / ‖v‖`` (row norms equal ``g``)."""
        v = self.weight_v
        return self.weight_g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D)`` → ``(..., K)``."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fix_norm={self.fix_norm}"


class DINOHead(nn.Module):
    """MLP → L2-normalised bottleneck → weight-normalised Linear to ``K`` prototype logits (DINO/Alice head).

    Default: ``Linear(C, 2048) → GELU → Linear(2048, 2048) → GELU → Linear(2048, 256)``, L2-normalise,
    ``WeightNormLinear(256, 512)`` without bias.

    Args:
        in_dim: ``C``, input feature size (e.g. the bottleneck channels, or a CASA/token-projection dim).
        num_prototypes: ``K`` (Alice 512).
        hidden_dim: width of the hidden layers (2048).
        bottleneck_dim: size of the normalised bottleneck (256).
        num_layers: Linear layers in the MLP (>= 1); with 1 it is ``Linear(C, bottleneck_dim)``.
        norm_last_layer: fix the norm of every prototype to 1 (not trainable).

    Shapes:
        ``(B, C)`` → ``(B, K)``; tokens ``(B, N, C)`` → ``(B, N, K)`` (any leading dimensions).
    """

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 512,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, num_prototypes, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(
                f"in_dim, num_prototypes, hidden_dim and bottleneck_dim must be >= 1, got "
                f"{in_dim}, {num_prototypes}, {hidden_dim}, {bottleneck_dim}"
            )
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, num_prototypes, fix_norm=norm_last_layer)
        self.in_dim = int(in_dim)
        self.num_prototypes = int(num_prototypes)

    def embed(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck: ``(..., C)`` → ``(..., bottleneck_dim)``."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects (..., {self.in_dim}) features, got shape {tuple(x.shape)}")
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., C)`` → prototype logits ``(..., K)``."""
        return self.last_layer(self.embed(x))


class Centering(nn.Module):
    """Teacher centering and sharpening, with an EMA centre of the teacher logits kept in a buffer.

    Args:
        num_prototypes: ``K``.
        momentum: ``m`` of ``c ← m · c + (1 − m) · batch mean`` (0.9); 0 uses the current batch only.

    Buffer ``centre`` ``(K,)`` float32, zero at start; it is in ``state_dict()`` so a resumed run continues.
    Use one instance per head output (e.g. one for the global token, one for the CASA tokens).
    """

    centre: Tensor

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_prototypes = int(num_prototypes)
        self.momentum = float(momentum)
        self.register_buffer("centre", torch.zeros(self.num_prototypes))

    def _check(self, logits: Tensor) -> None:
        if logits.dim() < 1 or logits.shape[-1] != self.num_prototypes:
            raise ValueError(f"teacher logits must be (..., {self.num_prototypes}), got shape {tuple(logits.shape)}")

    def targets(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """Centred, sharpened teacher distribution ``softmax((h_t − c) / τ_t)`` (detached).

        Args:
            teacher_logits: ``(..., K)``, e.g. ``(B, K)`` or ``(B, N, K)``.
            temperature: ``τ_t > 0``; lower is sharper.

        Returns:
            probabilities of the same shape, float32 (float64 for float64 input) even under autocast, rows
            summing to 1, without gradient (the teacher is a target).
        """
        self._check(teacher_logits)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        with torch.no_grad(), torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            t = teacher_logits.detach().to(_compute_dtype(teacher_logits))
            centre = self.centre.to(device=t.device, dtype=t.dtype)
            return torch.softmax((t - centre) / temperature, dim=-1)

    def forward(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """Same as :meth:`targets`."""
        return self.targets(teacher_logits, temperature)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> Tensor:
        """EMA update of the centre with the global batch mean of the teacher logits.

        Args:
            teacher_logits: ``(..., K)``; every leading dimension is a row (tokens count individually).

        Returns:
            the global batch mean ``(K,)`` that entered the EMA (zeros, and the centre unchanged, if no rank
            had any row).

        Under DDP every rank must call this (it all-reduces). Ranks may hold different numbers of rows: the
        mean is ``Σ_ranks Σ_rows h / Σ_ranks rows``, exactly the single-process mean of the concatenated batch.
        """
        self._check(teacher_logits)
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            t = teacher_logits.detach().reshape(-1, self.num_prototypes).to(torch.float32)
            count = t.new_tensor([float(t.shape[0])])
            # mean over ranks of (sum, count): the ratio equals the global sum / global count
            stats = torch.cat([t.sum(dim=0), count])
            if dist.world_size() > 1:
                stats = dist.all_reduce_mean(stats)
            count = stats[-1].to(self.centre.device)
            batch_mean = (stats[:-1].to(self.centre.device) / count.clamp_min(1.0)).to(self.centre.dtype)
            ema = self.centre * self.momentum + batch_mean * (1.0 - self.momentum)
            self.centre.copy_(torch.where(count > 0, ema, self.centre))  # no host sync; empty batch: unchanged
            return batch_mean

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, momentum={self.momentum}"


def distill_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    student_temperature: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy ``H(P_t, softmax(h_s / τ_s))`` averaged over rows (vectors or tokens).

    Args:
        student_logits: ``(..., K)``, e.g. ``(B, K)`` or ``(B, N, K)``.
        teacher_probs: same shape, rows summing to 1 (from :meth:`Centering.targets`); detached here.
        student_temperature: ``τ_s > 0`` (0.1).
        weights: optional per-row weights or bool mask with the leading shape (``(B,)`` / ``(B, N)``), or a
            prefix of it (``(B,)`` for tokens ``(B, N, K)`` weighs whole samples). The loss is then
            ``Σ w · H / Σ w``; with all weights 0 it is 0 (still connected to the graph).

    Returns:
        0-dim tensor, float32 (float64 for float64 input), differentiable w.r.t. the student logits. Its
        minimum over the student logits is the mean entropy of ``P_t``, reached when ``softmax(h_s/τ_s) = P_t``.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probs {tuple(teacher_probs.shape)} differ"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"expected (..., K) with at least one row dimension, got shape {tuple(student_logits.shape)}")
    if not student_temperature > 0:
        raise ValueError(f"student_temperature must be > 0, got {student_temperature}")
    dtype = _compute_dtype(student_logits)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_s = torch.log_softmax(student_logits.to(dtype) / student_temperature, dim=-1)
        ce = -(teacher_probs.detach().to(dtype) * log_p_s).sum(dim=-1)  # (...,) one value per row
        if weights is None:
            return ce.mean()
        rows = tuple(ce.shape)
        if weights.dim() > ce.dim() or tuple(weights.shape) != rows[: weights.dim()]:
            raise ValueError(f"weights must have shape {rows} or a prefix of it, got {tuple(weights.shape)}")
        w = weights.to(device=ce.device, dtype=dtype).reshape(*weights.shape, *([1] * (ce.dim() - weights.dim())))
        w = w.expand_as(ce)
        # all-zero weights: 0 / tiny = 0, still connected to the graph (and no host sync)
        return (ce * w).sum() / w.sum().clamp_min(1e-12)


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser: ``−mean_i log(min_{j≠i} ‖z_i − z_j‖ + eps)`` (DINOv2).

    Each row is pushed away from its nearest neighbour in the batch, which spreads the (L2-normalised)
    embeddings over the sphere. Self-distillation alone lets a weak student map every crop to one embedding
    (then centering makes the teacher uniform: the collapse Alice's global branch showed at CPU scale); this term
    rises without bound as two rows meet, so it keeps them apart.

    Args:
        embeddings: ``(B, D)``; rows are L2-normalised here (B >= 2).
        eps: added to the distance before the log (0 distances give ``−log eps``, finite).

    Returns:
        0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. ``embeddings``.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B >= 2, D) embeddings, got shape {tuple(embeddings.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = F.normalize(embeddings.to(_compute_dtype(embeddings)), dim=-1, eps=1e-12)
        with torch.no_grad():  # the nearest neighbour is chosen without gradient, the distance carries it
            sim = z @ z.T
            sim.fill_diagonal_(-2.0)
            nearest = sim.argmax(dim=1)
        dist_nn = (z - z[nearest]).norm(dim=-1)
        return -torch.log(dist_nn + eps).mean()


def cosine_schedule(start: float, end: float, step: int | float, total: int | float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), clamped outside ``[0, total]``.

    ``value = end + (start − end) · (1 + cos(π · step / total)) / 2``; monotone. ``total <= 0`` gives ``end``.
    Teacher EMA momentum: ``cosine_schedule(0.996, 1.0, step, total_steps)``.
    """
    if total <= 0:
        return float(end)
    t = min(max(float(step) / float(total), 0.0), 1.0)
    return float(end) + (float(start) - float(end)) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_then_constant(start: float, end: float, warmup_steps: int | float, step: int | float) -> float:
    """Linear from ``start`` (step 0) to ``end`` (step ``warmup_steps``), then constant ``end``.

    Teacher temperature: ``warmup_then_constant(0.04, 0.07, warmup_steps, step)`` (Alice code preset:
    0.008 → 0.01). ``warmup_steps <= 0`` gives ``end`` at once; negative steps give ``start``.
    """
    if warmup_steps <= 0:
        return float(end)
    t = min(max(float(step) / float(warmup_steps), 0.0), 1.0)
    return float(start) + (float(end) - float(start)) * t


def _rows(probs: Tensor) -> Tensor:
    if probs.dim() < 1 or probs.shape[-1] < 1:
        raise ValueError(f"expected probabilities (..., K), got shape {tuple(probs.shape)}")
    return probs.detach().reshape(-1, probs.shape[-1]).to(_compute_dtype(probs))


@torch.no_grad()
def teacher_entropy(probs: Tensor) -> Tensor:
    """Mean over rows of the entropy ``−Σ_k p_k ln p_k`` in nats (0: one-hot rows; ``ln K``: uniform rows).

    Args:
        probs: ``(..., K)`` probabilities (e.g. :meth:`Centering.targets`).

    Returns:
        detached 0-dim tensor (no host sync). A teacher sitting at ``ln K`` or at 0 has collapsed.
    """
    p = _rows(probs)
    if p.shape[0] == 0:
        return p.new_zeros(())
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()


@torch.no_grad()
def prototype_usage(probs: Tensor) -> dict[str, Tensor]:
    """How many prototypes the rows use, as fractions of ``K`` (1/K when every row picks the same one).

    Args:
        probs: ``(..., K)`` probabilities of this rank (gather them first for a global figure under DDP).

    Returns:
        detached 0-dim tensors:

        - ``argmax_fraction``: fraction of prototypes that are the argmax of at least one row;
        - ``perplexity_fraction``: ``exp(H(mean_rows p)) / K``, the effective number of prototypes of the
          mean distribution over ``K`` (1 when the batch uses all prototypes equally).
    """
    p = _rows(probs)
    k = p.shape[-1]
    if p.shape[0] == 0:
        zero = p.new_zeros(())
        return {"argmax_fraction": zero, "perplexity_fraction": zero.clone()}
    used = torch.bincount(p.argmax(dim=-1), minlength=k) > 0
    mean = p.mean(dim=0)
    mean = mean / mean.sum().clamp_min(1e-12)
    perplexity = torch.exp(-torch.special.xlogy(mean, mean).sum())
    return {"argmax_fraction": used.to(p.dtype).mean(), "perplexity_fraction": perplexity / k}
