"""MAE on the U-Net: masked block reconstruction (Wald et al., CVPR 2025, "Revisiting MAE pre-training for 3D
medical image segmentation"; the nnssl framework).

Per item (a box cut from a cached scan) one view (device-side augmentation, the shared ``augment:`` section);
``mask_ratio`` of it is masked in ``mask_block`` blocks (:func:`~volcontrast.views.masking.block_mask`: exactly
``round(ratio · n_blocks)`` blocks per sample) and set to ``mask_value``; the whole U-Net (encoder and decoder)
sees the masked view and a 1×1×1 convolution on the full-resolution decoder features reconstructs the view; the
loss is the MSE on the masked voxels (:func:`~volcontrast.views.masking.masked_mse`; ``masked_only: false`` = all
voxels).

``sparse: true`` is the masked-token skipping that a CNN allows (SparK's "densified sparse convolution",
which S3D in nnssl follows): after the stem and every encoder stage the masked positions, at that stage's
resolution, are set to zero again, so information never leaks from visible voxels into masked ones through the
convolutions' receptive fields. It needs a CNN encoder with ``encoder.stages`` (plain_unet, resenc_unet); the
instance norms still count the zeros (S3D's sparse norm does not), which we document rather than hide.

Where we differ from nnssl, and why:

- nnssl masks 75 % of a 160³ patch in 16³ blocks for a ResEnc-L; our default block is 16³ too, but CPU crops are
  32³ (8 blocks, 6 masked): set ``mae.mask_block`` for other crops — a block grid with fewer than 4 blocks, or
  a ratio that masks every block or none, is refused.
- nnssl trains with SGD 1e-2 and poly decay for 250k steps; the optimiser here is the shared ``optim:`` section.

Log columns: ``loss_rec`` (the masked MSE), ``masked_fraction`` (voxels masked), ``rec_ratio`` (the masked MSE
divided by the masked voxels' variance: 1 = no better than predicting their mean), ``pred_spread`` (standard
deviation of the reconstruction over the masked voxels / that of the target; the collapse monitor warns when it
stays at or below ``collapse_spread``: the decoder paints a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volcontrast.errors import InputError
from volcontrast.methods.base import PretrainMethod
from volcontrast.methods.monitors import Monitor, SignalBound
from volcontrast.methods.registry import register_method
from volcontrast.nets.base import Backbone
from volcontrast.nets.heads import ReconstructionHead
from volcontrast.views.augment import augment
from volcontrast.views.geometry import CaseTable
from volcontrast.views.masking import apply_mask, block_mask, masked_mse

if TYPE_CHECKING:
    from volcontrast.engine.config import PretrainConfig


@dataclass
class MAEConfig:
    """MAE (the ``mae:`` config section)."""

    mask_ratio: float = 0.75  # fraction of blocks masked, in (0, 1)
    mask_block: tuple[int, ...] = (16, 16, 16)  # block size per axis (voxels); 16³ at nnssl's 160³ patches
    mask_value: float = 0.0  # what the masked voxels are set to (the normalised intensity's mean is 0)
    masked_only: bool = True  # MSE on the masked voxels (MAE); False: on every voxel
    sparse: bool = False  # re-mask after the stem and every encoder stage (CNN backbones; SparK-style)
    collapse_spread: float = 0.01  # monitor: warn when pred_spread stays at or below this (0 = off)


def _masked_var(x: Tensor, w: Tensor, n: Tensor) -> Tensor:
    """Unbiased variance of ``x`` over the voxels where ``w`` is 1 (``n`` of them; 0 when ``n < 2``)."""
    mean = (x * w).sum() / n.clamp_min(1)
    return ((x - mean) ** 2 * w).sum() / (n - 1).clamp_min(1)


class MAE(PretrainMethod):
    """Masked block reconstruction on any backbone with a decoder (U-Nets, SwinUNETR)."""

    name = "mae"
    uses_decoder = True

    @classmethod
    def validate_config(cls, config: PretrainConfig) -> None:
        m = config.mae
        crop = [int(c) for c in config.data.crop_size]
        if not 0.0 < m.mask_ratio < 1.0:
            raise InputError("mae.mask_ratio", f"must be in (0, 1), got {m.mask_ratio}")
        block = [int(b) for b in m.mask_block]
        if len(crop) == 2 and len(block) == 3:  # 2D slices: the in-plane part of the default 3D block
            block = block[:2]
            m.mask_block = tuple(block)
        if len(block) != len(crop) or min(block) < 1:
            raise InputError("mae.mask_block", f"needs {len(crop)} sizes >= 1 (one per crop axis), got {block}")
        n_blocks = math.prod(math.ceil(c / b) for c, b in zip(crop, block))
        n_masked = min(n_blocks, math.floor(m.mask_ratio * n_blocks + 0.5))
        if n_blocks < 4 or not 0 < n_masked < n_blocks:
            raise InputError("mae.mask_block", f"block {block} cuts the crop {crop} into {n_blocks} blocks, of which "
                                               f"{n_masked} would be masked; use smaller blocks (e.g. "
                                               f"`mae: {{mask_block: {[max(1, c // 4) for c in crop]}}}`)")
        if not 0.0 <= m.collapse_spread < 1.0:
            raise InputError("mae.collapse_spread", f"must be in [0, 1), got {m.collapse_spread}")

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        super().__init__(backbone, config, table)
        backbone.seg_head.requires_grad_(False)  # never used in pretraining
        self.rec_head = ReconstructionHead(backbone.decoder_channels[-1], backbone.in_channels, dim=backbone.dim)
        self._keep: Tensor | None = None  # (B, 1, *spatial) float visible-voxel mask while a sparse forward runs
        if config.mae.sparse:
            stages = getattr(getattr(backbone, "encoder", None), "stages", None)
            if stages is None:
                raise InputError("mae.sparse", f"needs a CNN encoder with stages (plain_unet, resenc_unet), not "
                                               f"{backbone.name}")
            stem = getattr(backbone.encoder, "stem", None)
            for module in ([stem] if isinstance(stem, nn.Module) else []) + list(stages):
                module.register_forward_hook(self._remask)

    def _remask(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        """Forward hook: zero the masked positions of a stage's output (at its resolution)."""
        if self._keep is None:
            return output
        keep = F.interpolate(self._keep, size=tuple(output.shape[2:]), mode="nearest")
        return output * keep.to(output.dtype)

    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        m = self.config.mae
        crop = tuple(self.config.data.crop_size)
        boxes = raw["boxes"].to(device, non_blocking=True)
        out = augment(boxes, crop, self.config.augment, gen)
        mask = block_mask(boxes.shape[0], crop, m.mask_ratio, tuple(m.mask_block), gen, device=device)
        return {"views": out.views, "mask": mask, "masked": apply_mask(out.views, mask, m.mask_value),
                "n_samples": boxes.shape[0]}

    def reconstruct(self, masked: Tensor, mask: Tensor | None = None) -> Tensor:
        """The reconstruction ``(B, C, *spatial)`` of a masked input (``mask`` re-applied per stage if sparse)."""
        if self.config.mae.sparse and mask is not None:
            self._keep = (~mask).unsqueeze(1).float()
        try:
            skips = self.backbone.encode(masked)
        finally:
            self._keep = None
        return self.rec_head(self.backbone.decode(skips)[-1])

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        m = self.config.mae
        views, mask = batch["views"], batch["mask"]
        pred = self.reconstruct(batch["masked"], mask)
        loss = masked_mse(pred, views, mask, masked_only=m.masked_only)
        with torch.no_grad():  # masked sums, no boolean indexing: no host sync per step on a GPU
            w = mask.unsqueeze(1).expand_as(views).float()
            n = w.sum()
            var_t, var_p = _masked_var(views.float(), w, n), _masked_var(pred.detach().float(), w, n)
            ratio = masked_mse(pred.detach(), views, mask, masked_only=True) / var_t.clamp_min(1e-8)
            spread = var_p.sqrt() / var_t.clamp_min(1e-8).sqrt()
        return loss, {"loss_rec": loss.detach(), "masked_fraction": mask.float().mean(), "rec_ratio": ratio,
                      "pred_spread": spread}

    def monitors(self) -> list[Monitor]:
        floor = self.config.mae.collapse_spread
        if floor <= 0:
            return []
        return [SignalBound(column="pred_spread", bound=floor, above=False,
                            message="the reconstruction is the same value everywhere (the decoder paints a constant)")]

    def log_columns(self) -> list[str]:
        return ["loss_rec", "masked_fraction", "rec_ratio", "pred_spread", "collapse_warning"]


register_method("mae", MAE, section="mae", config=MAEConfig,
                summary="masked block reconstruction on the U-Net (nnssl's MAE)",
                small={"mae": {"mask_block": [4, 4, 4]}})

__all__ = ["MAE", "MAEConfig"]
