"""CASA (conditional anatomical semantic alignment, Alice): one cross-attention block over feature tokens.

Queries ``q`` (e.g. the student's bottleneck tokens of the masked crop) attend over keys/values ``kv``
(e.g. the student's decoder tokens, or the teacher's tokens of the unmasked crop). Post-norm residual block::

    x   = LayerNorm(q + MHA(q, kv, kv))
    out = LayerNorm(x + FFN(x)),        FFN = Linear(d, r·d) → act → Linear(r·d, d)

Alice runs the block twice with the *same* student queries: over student tokens → ``S``, over teacher tokens
→ ``T``; the intra-volume loss is a per-token cross-entropy between the centred, sharpened ``softmax(T)`` and
``softmax(S)`` (:mod:`volcontrast.losses.distill`). There is no positional encoding inside the block, so the
output is invariant to the order of the key/value tokens and equivariant to the order of the queries.

**Stop-gradient is the caller's choice.** The block does not detach anything. For the teacher branch pass
the teacher tokens under ``torch.no_grad()`` or ``.detach()``; whether gradients of ``T`` reach the
student queries and the block weights is decided by how the loss treats ``T`` (the distillation targets
are detached, so in Alice's loss they do not).

Tokens come from feature maps of different widths (U-Net bottleneck and decoder stages): flatten with
:func:`to_tokens` and bring them to a common ``dim`` with a :class:`TokenProjection` per source.

Example::

    proj_q, proj_kv = TokenProjection(320, 256), TokenProjection(128, 256)
    casa = CASABlock(256, heads=8)
    q = to_tokens(student_skips[-1], proj_q)                       # (B, 4·4·4, 256)
    s = casa(q, to_tokens(student_dec[1], proj_kv))                # (B, 64, 256)
    with torch.no_grad():
        kv_t = to_tokens(teacher_dec[1], teacher_proj_kv)          # teacher tokens: no gradient
    t = casa(q, kv_t)                                              # (B, 64, 256)
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CASABlock", "TokenProjection", "to_tokens"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def to_tokens(feature_map: Tensor, proj: nn.Module | None = None) -> Tensor:
    """Flatten a feature map into tokens, optionally projected.

    Args:
        feature_map: ``(B, C, *spatial)`` with at least one spatial dimension.
        proj: applied to the ``(B, N, C)`` tokens (e.g. a :class:`TokenProjection`); ``None`` keeps them.

    Shapes:
        ``(B, C, D, H, W)`` → ``(B, N, C')`` with ``N = D·H·W`` in C order (token ``n`` is voxel
        ``unravel(n, (D, H, W))``) and ``C' = C`` without ``proj``.
    """
    if feature_map.dim() < 3:
        raise ValueError(f"feature_map must be (B, C, *spatial), got shape {tuple(feature_map.shape)}")
    tokens = feature_map.flatten(2).transpose(1, 2)
    return proj(tokens) if proj is not None else tokens


class TokenProjection(nn.Module):
    """``Linear(C_in, dim)`` (+ ``LayerNorm(dim)``) on tokens, to give features of different widths one ``dim``.

    Args:
        in_channels: ``C_in`` of the source feature map.
        dim: common token size.
        norm: apply a LayerNorm after the Linear.

    Shapes:
        ``(..., C_in)`` → ``(..., dim)``.
    """

    def __init__(self, in_channels: int, dim: int, norm: bool = True) -> None:
        super().__init__()
        if in_channels < 1 or dim < 1:
            raise ValueError(f"in_channels and dim must be >= 1, got {in_channels}, {dim}")
        self.linear = nn.Linear(in_channels, dim)
        self.norm: nn.Module = nn.LayerNorm(dim) if norm else nn.Identity()
        self.in_channels = int(in_channels)
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., C_in)`` → ``(..., dim)``."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"TokenProjection expects (..., {self.in_channels}) tokens, got {tuple(x.shape)}")
        return self.norm(self.linear(x))


class CASABlock(nn.Module):
    """One post-norm cross-attention block: ``LN(q + MHA(q, kv, kv))`` then ``LN(x + FFN(x))``.

    Args:
        dim: token size ``d`` of queries and keys/values (divisible by ``heads``).
        heads: attention heads (8).
        ffn_ratio: FFN hidden width ``ffn_ratio · d`` (4).
        dropout: dropout on the attention weights and after each sub-layer (0).
        activation: FFN activation, ``"relu"`` (Alice code) or ``"gelu"``.
        eps: LayerNorm epsilon.

    Shapes:
        queries ``(B, Nq, d)``, keys ``(B, Nk, d)``, values ``(B, Nk, d)`` (default: the keys)
        → ``(B, Nq, d)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        ffn_ratio: float = 4.0,
        dropout: float = 0.0,
        activation: str = "relu",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads != 0:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim} heads={heads}")
        if ffn_ratio <= 0:
            raise ValueError(f"ffn_ratio must be > 0, got {ffn_ratio}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        hidden = max(1, round(dim * ffn_ratio))
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, hidden), _ACTIVATIONS[activation](), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.drop2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dim = int(dim)
        self.heads = int(heads)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Cross-attend the queries over the keys/values.

        Args:
            queries: ``(B, Nq, d)``.
            keys: ``(B, Nk, d)``; pass teacher tokens detached (see the module docstring).
            values: ``(B, Nk, d)``; default ``keys``.
            key_padding_mask: optional ``(B, Nk)`` bool, True = ignore that key token.

        Returns:
            ``(B, Nq, d)``.
        """
        values = keys if values is None else values
        for name, t in (("queries", queries), ("keys", keys), ("values", values)):
            if t.dim() != 3 or t.shape[-1] != self.dim:
                raise ValueError(f"{name} must be (B, N, {self.dim}), got shape {tuple(t.shape)}")
        if keys.shape[:2] != values.shape[:2] or keys.shape[0] != queries.shape[0]:
            raise ValueError(
                f"batch/token counts disagree: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, "
                f"values {tuple(values.shape)}"
            )
        attended, _ = self.attn(queries, keys, values, key_padding_mask=key_padding_mask, need_weights=False)
        x = self.norm1(queries + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"
