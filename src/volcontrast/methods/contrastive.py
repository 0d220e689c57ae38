"""SimCLR, GCL and PCL: one masked InfoNCE (METHODS.md sections 0-1), three positive masks.

Each item (a 3D crop or a 2D slice) is augmented twice; the 2M views pass the encoder together, the deepest
stage is pooled and projected (PCL head: Linear(C, C) -> ReLU -> Linear(C, D)), embeddings and positions are
gathered across DDP ranks, and the positive mask decides who is a friend:

- SimCLR: only the other view of the same item;
- GCL: same partition of the body axis (S equal partitions), any volume;
- PCL: |p_a - p_b| < lambda (per axis for ``axes="xyz"``), any volume; both views always positive.

Positions are ``body`` (normalised body-box coordinate of the view centre, default), ``index`` (slice
index / number of slices of the resampled volume, paper parity; see :mod:`volcontrast.views.geometry`), or the
name of a correspondence provider, e.g. ``affine``: the view centre mapped into the reference scan and normalised
by the reference's body box (:meth:`~volcontrast.spatial.correspondence.CorrespondenceProvider.normalised`). The
body box is a poor frame when fields of view differ (a brain scan's head fills its scan, so body positions become
slice positions); the registered reference frame is not.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from volcontrast import dist
from volcontrast.errors import InputError
from volcontrast.losses.info_nce import info_nce
from volcontrast.methods.base import PretrainMethod
from volcontrast.methods.monitors import ContrastiveCollapse, Monitor
from volcontrast.methods.registry import register_method, register_preset
from volcontrast.nets.base import Backbone
from volcontrast.nets.heads import GlobalProjectionHead
from volcontrast.spatial.correspondence import provider_names
from volcontrast.spatial.masks import gcl_positive_mask, pcl_positive_mask, simclr_positive_mask, view_item_ids
from volcontrast.views.augment import augment
from volcontrast.views.geometry import CaseTable, view_geometry

if TYPE_CHECKING:
    from volcontrast.engine.config import PretrainConfig

@dataclass
class ContrastConfig:
    """SimCLR / GCL / PCL (METHODS.md sections 0-1)."""

    temperature: float = 0.1
    loss_scale: float = 1.0  # PCL code parity: temperature / 0.07
    proj_dim: int = 128
    proj_hidden: int = 0  # 0 = same as the encoder's deepest width
    threshold: list[float] = field(default_factory=lambda: [0.1])  # PCL lambda (one, or one per axis)
    position: str = "body"  # body | index | a correspondence provider (affine: the reference scan's anatomy)
    axes: str = "z"  # z (body axis) | xyz (3D crops, per-axis thresholds)
    partitions: int = 4  # GCL


DIAGNOSTICS = ["mean_positives", "pos_cosine", "neg_cosine", "collapse_value", "embedding_spread"]


class ContrastiveMethod(PretrainMethod):
    """Two views per item, a global projection head, and a positive mask from the views' positions."""

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        super().__init__(backbone, config, table)
        c = config.contrast
        width = backbone.encoder_channels[-1]
        self.head = GlobalProjectionHead(width, out_dim=c.proj_dim, hidden_dim=c.proj_hidden or width)
        # positions from a correspondence provider (e.g. affine: the reference scan's anatomy) instead of the
        # scan's own body box or slice index, which differ between scans whose fields of view differ
        self._provider = None if c.position in ("body", "index") else self.fit_provider(c.position)

    @classmethod
    def validate_config(cls, config: PretrainConfig) -> None:
        c = config.contrast
        if c.position not in ("body", "index") and c.position not in provider_names():
            raise InputError("contrast.position", f"must be body, index or a correspondence provider "
                                                  f"({', '.join(provider_names())}), got {c.position!r}")
        if c.position not in ("body", "index") and config.dim != 3:
            raise InputError("contrast.position", f"positions from the {c.position!r} provider need 3D crops")
        if c.axes not in ("z", "xyz"):
            raise InputError("contrast.axes", "must be z or xyz")
        if not c.temperature > 0:
            raise InputError("contrast.temperature", f"must be > 0, got {c.temperature}")

    def monitors(self) -> list[Monitor]:
        return [ContrastiveCollapse()]

    @abc.abstractmethod
    def positive_mask(self, positions: Tensor, item_ids: Tensor) -> Tensor:
        """(M, M) bool positives from gathered positions (M,) or (M, k) and item ids (M,)."""

    def positions_of(self, geometry) -> Tensor:
        c = self.config.contrast
        if self._provider is None:
            return geometry.positions(c.position, c.axes)
        p = self.per_case(self._provider.normalised, geometry.case_index, geometry.cached_centre)
        return p[:, 2] if c.axes == "z" else p

    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        crop = tuple(self.config.data.crop_size)
        boxes = raw["boxes"].to(device, non_blocking=True)
        m = boxes.shape[0]
        both = torch.cat([boxes, boxes])  # view 1 of every item, then view 2
        out = augment(both, crop, self.config.augment, gen)
        case_index = torch.cat([raw["case_index"], raw["case_index"]])
        box_lower = torch.cat([raw["box_lower"], raw["box_lower"]])
        geometry = view_geometry(case_index, box_lower, out.voxel_to_box, crop, self.table, out.params)
        positions = self.positions_of(geometry).to(device=device, dtype=torch.float32)
        ids = view_item_ids(m, 2, offset=dist.rank() * m, device=device)
        return {"views": out.views, "positions": positions, "item_ids": ids, "n_samples": 2 * m,
                "geometry": geometry}

    def embed(self, views: Tensor) -> Tensor:
        return self.head(self.backbone.encode(views)[-1])

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.embed(batch["views"])
        positions = dist.gather_no_grad(batch["positions"])
        ids = dist.gather_no_grad(batch["item_ids"])
        mask = self.positive_mask(positions, ids)
        c = self.config.contrast
        out = info_nce(z, mask, c.temperature, loss_scale=c.loss_scale, gather=True)
        return out.loss, {k: out.diagnostics[k] for k in DIAGNOSTICS}

    def log_columns(self) -> list[str]:
        return [*DIAGNOSTICS, "collapse_warning"]


class SimCLR(ContrastiveMethod):
    name = "simclr"

    def positive_mask(self, positions: Tensor, item_ids: Tensor) -> Tensor:
        return simclr_positive_mask(item_ids)


class GCL(ContrastiveMethod):
    name = "gcl"

    def positive_mask(self, positions: Tensor, item_ids: Tensor) -> Tensor:
        return gcl_positive_mask(positions, self.config.contrast.partitions, item_ids)


class PCL(ContrastiveMethod):
    name = "pcl"

    def positive_mask(self, positions: Tensor, item_ids: Tensor) -> Tensor:
        threshold = self.config.contrast.threshold
        if positions.ndim == 2 and len(threshold) == 1:
            threshold = threshold * positions.shape[1]
        return pcl_positive_mask(positions, threshold if positions.ndim == 2 else threshold[0], item_ids)


register_method("simclr", SimCLR, section="contrast", config=ContrastConfig,
                summary="positive = the other view of the same crop/slice")
register_method("gcl", GCL, section="contrast", summary="positive = same partition (of S) along the body axis")
register_method("pcl", PCL, section="contrast", summary="positive iff normalised positions differ by < lambda")
register_preset("pcl-paper", {
    "method": "pcl",
    "dim": 2,
    "steps": 20000,
    "data": {"crop_size": [256, 256], "volumes_per_batch": 8, "crops_per_volume": 4, "workers": 8},
    "model": {"preset": "small"},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "min_lr": 0.0},
    "augment": {"flip_prob": 0.5, "flip_axes": [0, 1], "spatial_prob": 0.67, "rotation_deg": 180.0,
                "scale_range": [0.7, 1.3], "elastic_prob": 1.0, "brightness_prob": 0.0, "contrast_prob": 0.0,
                "gamma_prob": 0.0, "noise_prob": 0.0, "blur_prob": 0.0, "context": 1.5},
    "contrast": {"temperature": 0.1, "loss_scale": 0.1 / 0.07, "proj_dim": 512, "threshold": [0.1],
                 "position": "index", "axes": "z"},
    "log_every": 50, "checkpoint_every": 1000, "probe_every": 2000,
})
