"""VoCo: volume contrast with a position prior (Wu et al., CVPR 2024; the large-scale TPAMI follow-up).

**Views.** Per region (``voco.regions_per_batch`` per step and rank, each cut from a random scan): a grid of
``voco.grid`` *base* crops tiles the region exactly (default 2×2×1, the axial plane; ``[n, n, n]`` a 3D grid),
and ``voco.targets`` *target* crops sit at random positions inside it (along axes where the grid has one cell,
at the same place as the bases: the paper's "z centred"). Every crop has the shared crop size and gets its own
augmentation on the device (flips and intensity by default; ``voco.spatial_augment`` adds the rotation/zoom of
the ``augment:`` section).

**Labels** (:func:`voco_labels`): the target's overlap proportion with each base, computed in world mm from each
crop's recorded geometry (``view voxel -> cached voxel -> world``, :func:`~volcontrast.views.geometry.world_boxes`
and :func:`~volcontrast.views.geometry.overlap_fractions`), so a flipped or resampled scan gives the same
labels. With the grid tiling the region and the targets inside it, each label vector sums to 1.

**Features.** The global averages of every encoder stage, concatenated, standardised over the batch (BatchNorm
without affine or running statistics: at initialisation the pooled features of instance-normed U-Nets hardly
differ between crops, as measured for Alice in benchmarks/RESULTS.md), then an MLP projector (Linear -> BN ->
ReLU -> Linear). Logits ``p_k = ReLU(cos(target, base_k))``.

**Loss** (:func:`voco_loss`), per region, averaged over regions:

- positive: ``−Σ_k y_k log(1 − |y_k − p_k| + ε) / (Σ_k y_k + ε)`` over the region's targets,
- negative: ``Σ_k [y_k = 0] p_k² / (Σ_k [y_k = 0] + ε)``,
- regulariser: mean over base pairs ``i < j`` of ``ReLU(cos(b_i, sg(b_j)))²`` (one side detached),

weighted ``pos_weight``, ``neg_weight``, ``reg_weight``. **EMA teacher** (``voco.momentum``, default 0.9 as in the
code; 0 = no teacher, the CVPR paper): a momentum copy of backbone and projector; the logits are the average of
(student target vs teacher bases) and (teacher target vs student bases), as in the released code — without it
users report that the loss does not fall (nnssl issue 22).

Where paper, code and this version differ:

- Sizes: the CVPR code cuts a 384×384×96 region into 4×4 bases of 96³ resized to 64³; we tile the region with
  crops of the network's crop size at native resolution (no resizing; resizing would change the spacing the
  network learns at). Default 2×2×1 of 32³ on the CPU; ``voco.grid: [4, 4, 1]`` with 64³ or 96³ crops on a GPU.
- Labels: the code computes the x-y overlap area / 96² from crop indices; we use world-mm volumes of the
  views' footprints — identical for a grid one cell thick in z with flips only, and still right for
  flipped/resampled scans.
- Positive term: one version of the code weights by ``y`` (as here), another by ``[y > 0]``.
- CVPR code detaches the bases in the logits (no teacher); with the teacher (the default) nothing is detached
  except the teacher itself.
- The TPAMI inter-volume term (teacher assignments of a target to *another* volume's bases) is not built.
- The projector input is standardised over the batch (ours, see Features).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from volcontrast.data.cache import Cache
from volcontrast.errors import InputError
from volcontrast.methods.base import PretrainMethod, ema_update
from volcontrast.methods.monitors import Monitor, SignalBound
from volcontrast.methods.registry import register_method
from volcontrast.nets.base import Backbone
from volcontrast.nets.heads import GlobalProjectionHead
from volcontrast.views.augment import augment
from volcontrast.views.geometry import CaseTable, overlap_fractions, view_geometry, world_boxes
from volcontrast.views.sampler import BoxSampler, BoxSamplerConfig, StepSampler, box_size_for

if TYPE_CHECKING:
    from volcontrast.engine.config import PretrainConfig

EPS = 1e-6


@dataclass
class VoCoConfig:
    """VoCo (the ``voco:`` config section)."""

    grid: tuple[int, int, int] = (2, 2, 1)  # bases per axis tiling the region; (n, n, 1) = axial-plane grid
    targets: int = 2  # random target crops per region
    regions_per_batch: int = 2  # regions per step and rank (each from a random scan)
    spatial_augment: bool = False  # False: flips + intensity (the code); True: + the augment section's rotation/zoom
    proj_dim: int = 256
    proj_hidden: int = 1024
    momentum: float = 0.9  # EMA teacher (code: 0.9); 0 = no teacher (CVPR paper: bases detached in the logits)
    pos_weight: float = 1.0
    neg_weight: float = 1.0
    reg_weight: float = 1.0
    collapse_cosine: float = 0.99  # monitor: warn when the mean cosine between bases stays >= this (0 = off)


def voco_labels(target_geometry_maps: Tensor, base_geometry_maps: Tensor, crop_size: tuple[int, ...],
                target_affine: Tensor, base_affine: Tensor) -> Tensor:
    """``(T, K)`` overlap proportions of T target views with K base views of one region, in world mm.

    Args:
        target_geometry_maps, base_geometry_maps: (T, 4, 4) / (K, 4, 4) view voxel -> cached voxel.
        crop_size: the views' size.
        target_affine, base_affine: (T, 4, 4) / (K, 4, 4) cached voxel -> world mm.
    """
    t_lo, t_hi = world_boxes(target_geometry_maps, crop_size, target_affine)
    b_lo, b_hi = world_boxes(base_geometry_maps, crop_size, base_affine)
    return overlap_fractions(t_lo, t_hi, b_lo, b_hi)


def voco_logits(targets: Tensor, bases: Tensor) -> Tensor:
    """``ReLU(cos(target_t, base_k))``: (R, T, D) x (R, K, D) -> (R, T, K)."""
    t, b = F.normalize(targets.float(), dim=-1), F.normalize(bases.float(), dim=-1)
    return F.relu(torch.einsum("rtd,rkd->rtk", t, b))


def voco_loss(logits: Tensor, labels: Tensor, bases: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three VoCo terms, each averaged over the R regions.

    Args:
        logits: (R, T, K) in [0, 1].
        labels: (R, T, K) overlap proportions.
        bases: (R, K, D) student base embeddings (for the regulariser).

    Returns:
        ``(positive, negative, regulariser)`` 0-dim tensors.
    """
    y = labels.to(logits.dtype)
    pos = -(y * torch.log(1 - (y - logits).abs() + EPS)).sum((1, 2)) / (y.sum((1, 2)) + EPS)
    neg_mask = (y == 0).to(logits.dtype)
    neg = (neg_mask * logits**2).sum((1, 2)) / (neg_mask.sum((1, 2)) + EPS)
    b = F.normalize(bases.float(), dim=-1)
    cos = torch.einsum("rkd,rjd->rkj", b, b.detach())  # (R, K, K): cos(b_i, sg(b_j))
    k = bases.shape[1]
    upper = torch.ones(k, k, device=bases.device).triu(diagonal=1)  # pairs i < j, as a weight (no indexing)
    reg = (F.relu(cos) ** 2 * upper).sum((1, 2)) / max(k * (k - 1) // 2, 1)
    return pos.mean(), neg.mean(), reg.mean()


class VoCoHead(nn.Module):
    """Pooled encoder stages (all, concatenated) -> batch standardisation -> MLP projector."""

    def __init__(self, widths: list[int], hidden: int, out_dim: int):
        super().__init__()
        width = sum(widths)
        self.norm = nn.BatchNorm1d(width, affine=False, track_running_stats=False)
        self.proj = GlobalProjectionHead(width, out_dim=out_dim, hidden_dim=hidden, num_layers=2, batch_norm=True)

    def forward(self, skips: list[Tensor]) -> Tensor:
        pooled = torch.cat([s.flatten(2).float().mean(-1) for s in skips], dim=1)
        return self.proj(self.norm(pooled))


class VoCo(PretrainMethod):
    """VoCo on any :class:`~volcontrast.nets.base.Backbone` (3D U-Nets, SwinUNETR)."""

    name = "voco"

    @classmethod
    def validate_config(cls, config: PretrainConfig) -> None:
        v = config.voco
        if config.dim != 3:
            raise InputError("--dim", f"voco works on 3D crops only, got dim {config.dim}")
        grid = [int(g) for g in v.grid]
        if len(grid) != 3 or min(grid) < 1 or np.prod(grid) < 2:
            raise InputError("voco.grid", f"needs 3 counts >= 1 and at least 2 bases, got {list(v.grid)}")
        for name in ("targets", "regions_per_batch", "proj_dim", "proj_hidden"):
            if int(getattr(v, name)) < 1:
                raise InputError(f"voco.{name}", f"must be >= 1, got {getattr(v, name)}")
        if not 0.0 <= v.momentum < 1.0:
            raise InputError("voco.momentum", f"must be in [0, 1), got {v.momentum}")
        weights = (v.pos_weight, v.neg_weight, v.reg_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise InputError("voco", f"loss weights must be >= 0 and not all 0, got pos/neg/reg {weights}")
        if v.regions_per_batch * (int(np.prod(grid)) + v.targets) < 2:
            raise InputError("voco", "a step needs at least 2 crops (batch statistics of the projector)")

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        super().__init__(backbone, config, table)
        v = config.voco
        if backbone.dim != 3:
            raise InputError("--dim", "voco works on 3D crops only")
        self.head = VoCoHead(list(backbone.encoder_channels), v.proj_hidden, v.proj_dim)
        self.teacher: nn.ModuleDict | None = None
        if v.momentum > 0:
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(self.head)})
            self.teacher.requires_grad_(False)
        crop = tuple(int(c) for c in config.data.crop_size)
        self.crop = crop
        self.grid = tuple(int(g) for g in v.grid)
        self.region = tuple(c * g for c, g in zip(crop, self.grid))
        ctx = config.augment.context if v.spatial_augment else 1.0
        self.box = box_size_for(crop, ctx)
        self.margin = tuple((b - c) // 2 for b, c in zip(self.box, crop))
        # base crop offsets inside the region (voxels), x fastest
        self.base_offsets = torch.tensor([[i * crop[0], j * crop[1], k * crop[2]]
                                          for k in range(self.grid[2]) for j in range(self.grid[1])
                                          for i in range(self.grid[0])], dtype=torch.long)
        self.augment_cfg = config.augment if v.spatial_augment else replace(config.augment, spatial_prob=0.0,
                                                                           context=1.0)

    # ----------------------------------------------------------------------------------------- views
    def build_sampler(self, cache_root: Any, pool: list[str], rank: int) -> StepSampler:
        """Regions (the base grid's extent, plus the augmentation margin) of random scans; a scan smaller than the
        region on an axis is centred in it and padded with its minimum (the crops must still fit the scan)."""
        c, v = self.config, self.config.voco
        Cache(cache_root).check_min_size(self.crop, pool)
        region_box = tuple(r + b - k for r, b, k in zip(self.region, self.box, self.crop))
        cfg = BoxSamplerConfig(crop_size=self.region, box_size=region_box, volumes_per_batch=v.regions_per_batch,
                               crops_per_volume=1, dim=3, pad_small=True)
        return BoxSampler(cache_root, pool, cfg, seed=c.seed, rank=rank, steps=c.steps)

    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        v = self.config.voco
        regions = raw["boxes"].to(device, non_blocking=True)  # (R, C, *region_box)
        r = regions.shape[0]
        k, t = len(self.base_offsets), int(v.targets)
        target_offsets = torch.zeros(r, t, 3, dtype=torch.long)
        for a in range(3):
            if self.grid[a] > 1:
                target_offsets[..., a] = torch.randint(0, self.region[a] - self.crop[a] + 1, (r, t), generator=gen)
        offsets = torch.cat([self.base_offsets.expand(r, k, 3), target_offsets], dim=1)  # (R, K + T, 3)
        # the context box of a crop at region offset o starts at o in region-box coordinates
        subs = [regions[i, :, o[0]:o[0] + self.box[0], o[1]:o[1] + self.box[1], o[2]:o[2] + self.box[2]]
                for i in range(r) for o in offsets[i].tolist()]
        out = augment(torch.stack(subs), self.crop, self.augment_cfg, gen)
        n = k + t
        case_index = raw["case_index"].repeat_interleave(n)
        box_lower = raw["box_lower"].repeat_interleave(n, dim=0) + offsets.reshape(-1, 3)
        geometry = view_geometry(case_index, box_lower, out.voxel_to_box, self.crop, self.table, out.params)
        maps = geometry.voxel_to_cached.view(r, n, 4, 4)
        affine = self.table.affine[case_index].view(r, n, 4, 4)
        labels = torch.stack([voco_labels(maps[i, k:], maps[i, :k], self.crop, affine[i, k:], affine[i, :k])
                              for i in range(r)])
        return {"views": out.views, "labels": labels.to(device=device, dtype=torch.float32), "n_regions": r,
                "n_samples": r * n, "geometry": geometry}

    # ---------------------------------------------------------------------------------------- losses
    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        v = self.config.voco
        views, labels = batch["views"], batch["labels"]
        r, t, k = labels.shape
        z = self.head(self.backbone.encode(views)).view(r, k + t, -1)
        bases, targets = z[:, :k], z[:, k:]
        if self.teacher is not None:
            with torch.no_grad():
                zt = self.teacher["head"](self.teacher["backbone"].encode(views)).view(r, k + t, -1)
            logits = 0.5 * (voco_logits(targets, zt[:, :k]) + voco_logits(zt[:, k:], bases))
        else:
            logits = voco_logits(targets, bases.detach())
        pos, neg, reg = voco_loss(logits, labels, bases)
        loss = v.pos_weight * pos + v.neg_weight * neg + v.reg_weight * reg
        with torch.no_grad():
            b = F.normalize(bases.float(), dim=-1)
            cos = torch.einsum("rkd,rjd->rkj", b, b)
            base_cosine = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)).mean() / (k * (k - 1))
            label_error = (logits - labels).abs().mean()
        return loss, {"loss_pos": pos.detach(), "loss_neg": neg.detach(), "loss_reg": reg.detach(),
                      "base_cosine": base_cosine, "label_error": label_error}

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            ema_update(self.teacher["backbone"], self.backbone, self.config.voco.momentum)
            ema_update(self.teacher["head"], self.head, self.config.voco.momentum)

    def monitors(self) -> list[Monitor]:
        ceiling = self.config.voco.collapse_cosine
        if ceiling <= 0:
            return []
        return [SignalBound(column="base_cosine", bound=ceiling, above=True,
                              message="every base crop has the same embedding (VoCo collapse)")]

    def log_columns(self) -> list[str]:
        return ["loss_pos", "loss_neg", "loss_reg", "base_cosine", "label_error", "collapse_warning"]


register_method("voco", VoCo, section="voco", config=VoCoConfig,
                summary="predict a crop's overlap with a grid of base crops (position prior), EMA teacher",
                small={"voco": {"proj_dim": 32, "proj_hidden": 64, "regions_per_batch": 1}})

__all__ = ["VoCo", "VoCoConfig", "VoCoHead", "voco_labels", "voco_logits", "voco_loss"]
