"""UAFS (UAFR in the journal version): uncertainty-aware feature selection / re-weighting, METHODS.md §4.

A small head on a feature map F predicts an M-channel map A (M = 2); its normalised softmax entropy is a
per-voxel uncertainty U ∈ [0, 1] shared by all channels, and the block returns::

    A = conv1×1( ReLU( norm( conv3×3(×3)(F) ) ) )       (B, M, *spatial)
    P = softmax(A) over M,  U = −Σ_m P_m log P_m / log M  (B, 1, *spatial)
    F' = F + F · (1 − U) = F · (2 − U)

Confident voxels are amplified up to ×2, maximally uncertain ones are kept at ×1. The head has no loss of its
own: it learns through the segmentation loss flowing through the gate. One block sits after each decoder
stage (:func:`add_uafs`), before that stage's segmentation head and the next stage.

The head keeps PyTorch's default initialisation on purpose: zero output weights would give equal logits,
where the entropy is stationary (∂U/∂A = 0), so the head would never receive a gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from volcontrast.nets.base import POST_DECODER_PREFIX, Backbone

__all__ = ["UAFS", "add_uafs", "uafs_parameter_prefix"]

uafs_parameter_prefix = POST_DECODER_PREFIX
"""State-dict prefix of the UAFS blocks installed by :func:`add_uafs` (``"post_decoder_blocks."``)."""

_NORMS = ("instance", "batch", "none")


class UAFS(nn.Module):
    """Uncertainty-aware re-weighting of a (B, C, *spatial) feature map, 2D or 3D.

    Args:
        channels: C, channels of the feature map (input = output).
        dim: spatial dimensions (2 or 3).
        hidden: width of the head's first convolution; default ``max(C // 4, 4)`` (the released 3D head
            used C/4, the 2D head 16).
        norm: ``"instance"`` (affine, as nnU-Net), ``"batch"`` or ``"none"``.
        kernel_size: side of the head's first convolution (3; the paper's ablation found 3 best).
        num_outputs: M, channels of A (2 in every released head; ≥ 2).

    Example::

        block = UAFS(32, dim=3)
        y = block(x)                    # (B, 32, D, H, W), y = x · (2 − U)
        u = block.uncertainty(x)        # (B, 1, D, H, W) in [0, 1]
    """

    def __init__(self, channels: int, dim: int, hidden: int | None = None, norm: str = "instance",
                 kernel_size: int = 3, num_outputs: int = 2) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if num_outputs < 2:
            raise ValueError(f"num_outputs must be >= 2 (a 1-channel softmax has no uncertainty), got {num_outputs}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        hidden = max(channels // 4, 4) if hidden is None else hidden
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        if norm == "instance":
            norm_layer: nn.Module = (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(hidden, affine=True)
        elif norm == "batch":
            norm_layer = (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(hidden)
        else:
            norm_layer = nn.Identity()
        self.channels, self.dim, self.hidden, self.norm = channels, dim, hidden, norm
        self.kernel_size, self.num_outputs = kernel_size, num_outputs
        self.head = nn.Sequential(
            conv(channels, hidden, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
            norm_layer,
            nn.ReLU(inplace=True),
            conv(hidden, num_outputs, 1),
        )

    def uncertainty(self, x: Tensor) -> Tensor:
        """U: (B, C, *spatial) → (B, 1, *spatial) float32 normalised entropy in [0, 1] (1 = equal logits)."""
        if x.dim() != self.dim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"UAFS expects (B, {self.channels}, *{self.dim} spatial axes), got {tuple(x.shape)}")
        logits = self.head(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
            log_p = torch.log_softmax(logits.to(dtype), dim=1)
            entropy = -(log_p.exp() * log_p).sum(dim=1, keepdim=True)
            return (entropy / math.log(self.num_outputs)).clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *spatial) → x · (2 − U), same shape and dtype."""
        return x * (2.0 - self.uncertainty(x)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}, hidden={self.hidden}, norm={self.norm!r}"


def add_uafs(backbone: Backbone, hidden: int | None = None, norm: str = "instance", kernel_size: int = 3,
             num_outputs: int = 2) -> Backbone:
    """Install one :class:`UAFS` after each decoder stage of ``backbone`` (in place) and return it.

    Block i gets ``backbone.decoder_channels[i]`` channels; its parameters are stored under
    ``post_decoder_blocks.{i}.*`` (:data:`uafs_parameter_prefix`). Checkpoints written without UAFS still load
    (``load_backbone_state`` / ``load_encoder_state``), the new blocks keeping their fresh initialisation.
    New blocks are created on the device and dtype of the backbone's parameters.
    """
    ref = next(backbone.parameters(), None)
    blocks = [UAFS(c, backbone.dim, hidden, norm, kernel_size, num_outputs) for c in backbone.decoder_channels]
    if ref is not None:
        blocks = [b.to(device=ref.device, dtype=ref.dtype) for b in blocks]
    backbone.set_post_decoder_blocks(blocks)
    return backbone
