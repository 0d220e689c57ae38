"""Projection and reconstruction heads, on one shared base (lightly style).

A head is a stack of blocks ``(layer, optional norm, optional activation)`` where ``layer`` is a
``Linear`` on (B, C) vectors or a 1×1(×1) convolution on (B, C, *spatial) maps — the same MLP,
applied per vector or per voxel.

Example::

    >>> head = GlobalProjectionHead(in_channels=64, out_dim=128)      # PCL: GAP → Linear → ReLU → Linear
    >>> z = head(torch.randn(4, 64, 4, 4, 4))                          # (4, 128)
    >>> dense = DenseProjectionHead(in_channels=16, out_dim=64, dim=3)
    >>> q = dense(torch.randn(2, 16, 8, 8, 8))                          # (2, 64, 8, 8, 8)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

Block = tuple[int, int, bool, bool]  # (in_features, out_features, batch_norm, activation)


def _layer(in_features: int, out_features: int, bias: bool, dim: int) -> nn.Module:
    if dim == 0:
        return nn.Linear(in_features, out_features, bias=bias)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return conv(in_features, out_features, kernel_size=1, bias=bias)


def _norm(features: int, dim: int) -> nn.Module:
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](features)


def mlp_blocks(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = False,
               last_batch_norm: bool = False) -> list[Block]:
    """Blocks of a ``num_layers``-layer MLP: hidden layers get ReLU (and BN if asked), the last none."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    return [
        (widths[i], widths[i + 1], batch_norm if i < num_layers - 1 else last_batch_norm, i < num_layers - 1)
        for i in range(num_layers)
    ]


class ProjectionHead(nn.Module):
    """Shared base: Linear/1×1-conv → (BatchNorm) → (ReLU) → ... blocks.

    Args:
        blocks: ``(in_features, out_features, batch_norm, relu)`` per layer.
        dim: 0 for vectors (B, C) with ``Linear``; 1, 2 or 3 for maps (B, C, *spatial) with 1×1 convs.

    Shapes:
        (B, blocks[0][0]) → (B, blocks[-1][1]) for ``dim=0``;
        (B, blocks[0][0], *spatial) → (B, blocks[-1][1], *spatial) otherwise.
    """

    def __init__(self, blocks: Sequence[Block], dim: int = 0):
        super().__init__()
        if dim not in (0, 1, 2, 3):
            raise ValueError(f"dim must be 0 (vectors), 1, 2 or 3, got {dim}")
        layers: list[nn.Module] = []
        for in_features, out_features, batch_norm, relu in blocks:
            layers.append(_layer(in_features, out_features, bias=not batch_norm, dim=dim))
            if batch_norm:
                layers.append(_norm(out_features, dim))
            if relu:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self.dim = dim
        self.in_features = blocks[0][0]
        self.out_features = blocks[-1][1]

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in[, *spatial]) → (B, C_out[, *spatial])."""
        return self.layers(x)


class GlobalProjectionHead(ProjectionHead):
    """Global average pool of a feature map, then an MLP (PCL / SimCLR / Spade-global head).

    Default (PCL): GAP → Linear(C, C) → ReLU → Linear(C, out_dim).

    Args:
        in_channels: C, channels of the pooled map (e.g. ``backbone.encoder_channels[-1]``).
        out_dim: embedding size (PCL 128 or 512; Spade 128).
        hidden_dim: width of the hidden layers; default C.
        num_layers: number of Linear layers (>= 1).
        batch_norm: BatchNorm1d after each hidden Linear.

    Shapes:
        (B, C, *spatial) or already pooled (B, C) → (B, out_dim). Not L2-normalised (losses do that).
    """

    def __init__(self, in_channels: int, out_dim: int = 128, hidden_dim: int | None = None, num_layers: int = 2,
                 batch_norm: bool = False):
        super().__init__(mlp_blocks(in_channels, hidden_dim or in_channels, out_dim, num_layers, batch_norm), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) → (B, out_dim)."""
        pooled = x.flatten(2).mean(dim=2) if x.ndim > 2 else x
        return self.layers(pooled)


class DenseProjectionHead(ProjectionHead):
    """Per-voxel MLP made of 1×1(×1) convolutions, for voxel-level (local) contrast.

    Args:
        in_channels: C of the feature map.
        out_dim: embedding size per voxel (Spade-local 64).
        hidden_dim: hidden width; default C.
        num_layers: number of 1×1 conv layers.
        dim: spatial dimensions of the map, 2 or 3.
        batch_norm: BatchNorm{2,3}d after each hidden conv.

    Shapes:
        (B, C, *spatial) → (B, out_dim, *spatial). Not L2-normalised.
    """

    def __init__(self, in_channels: int, out_dim: int = 64, hidden_dim: int | None = None, num_layers: int = 2,
                 dim: int = 3, batch_norm: bool = False):
        super().__init__(mlp_blocks(in_channels, hidden_dim or in_channels, out_dim, num_layers, batch_norm), dim=dim)


class ReconstructionHead(ProjectionHead):
    """A 1×1(×1) convolution to image channels, for restoration / masked-image-modelling losses.

    Shapes:
        (B, in_channels, *spatial) → (B, out_channels, *spatial), same units as the target image.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, dim: int = 3):
        super().__init__([(in_channels, out_channels, False, False)], dim=dim)
