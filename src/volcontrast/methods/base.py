"""What every pretraining method provides to the engine.

A method is an ``nn.Module`` holding the backbone, its heads and any state (queues, momentum copies), registered
by name in :mod:`volcontrast.methods.registry`. Before a run the engine calls the class's
``validate_config(config)``; then it builds the method, asks it for its step sampler (``build_sampler``), its
log columns and its collapse monitors (``monitors``), and calls, per step: ``prepare(raw, step, gen, device)``
(device-side views, no autograd) -> ``forward(batch) -> (loss, logs)`` (through DDP) -> ``after_step(step)``.
Parts of the backbone a method does not train are frozen (``requires_grad=False``) so DDP and the optimiser
never see them.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from volcontrast import dist
from volcontrast.errors import InputError
from volcontrast.methods.monitors import Monitor
from volcontrast.nets.base import Backbone
from volcontrast.spatial.correspondence import CorrespondenceProvider, get_provider
from volcontrast.views.geometry import CaseTable
from volcontrast.views.sampler import BoxSampler, BoxSamplerConfig, StepSampler, box_size_for

if TYPE_CHECKING:  # the engine's config type, for annotations only (methods never import the engine)
    from volcontrast.engine.config import PretrainConfig


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``θ_t ← μ θ_t + (1 − μ) θ_s`` for every parameter of ``target`` (a momentum copy of ``source``); buffers
    are copied. Momentum encoders (Spade) and EMA teachers (Alice)."""
    t_params = list(target.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in source.parameters()], alpha=1 - momentum)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)


class PretrainMethod(nn.Module, abc.ABC):
    name: str = "method"
    uses_decoder: bool = False

    def __init__(self, backbone: Backbone, config: PretrainConfig, table: CaseTable):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.table = table
        if not self.uses_decoder:
            for part in (backbone.decoder, backbone.seg_head):
                part.requires_grad_(False)

    @classmethod
    def validate_config(cls, config: PretrainConfig) -> None:
        """Raise :class:`~volcontrast.errors.InputError` for settings this method cannot run (its section and
        the shared fields it depends on). Default: nothing to check."""

    def build_sampler(self, cache_root: Any, pool: list[str], rank: int) -> StepSampler:
        """The step-indexed sampler of raw boxes (run in DataLoader workers). Default: boxes of single scans,
        ``data.volumes_per_batch`` volumes x ``data.crops_per_volume`` boxes per step and rank."""
        c = self.config
        crop = tuple(c.data.crop_size)
        cfg = BoxSamplerConfig(crop_size=crop, box_size=box_size_for(crop, c.augment.context),
                               volumes_per_batch=c.data.volumes_per_batch, crops_per_volume=c.data.crops_per_volume,
                               dim=c.dim)
        return BoxSampler(cache_root, pool, cfg, seed=c.seed, rank=rank, steps=c.steps)

    def monitors(self) -> list[Monitor]:
        """Collapse monitors the engine feeds every logged row (fresh objects: they count rows). Default: none."""
        return []

    @abc.abstractmethod
    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        """Device-side views and everything ``forward`` needs for this step (called without autograd)."""

    def fit_provider(self, name: str) -> CorrespondenceProvider:
        """The correspondence provider ``name`` for this method's cache, fitted once on rank 0 (``affine``
        registers each scan of the pool and stores it in the cache; the others check the geometry)."""
        cache = self.table.cache
        if cache is None:
            raise InputError(self.name, "the case table has no cache; build it with CaseTable.from_cache")
        if dist.rank() == 0:
            get_provider(name, cache).fit(self.table.ids)
        dist.barrier()
        return get_provider(name, cache)

    def per_case(self, fn, case_index: Tensor, points: Tensor) -> Tensor:
        """``fn(case_id, points)`` (a provider's ``to_reference`` / ``normalised``) applied to the (N, ..., 3)
        cached voxel ``points`` of the cases ``case_index`` (N,), one call per case; float64 on the CPU."""
        out = np.empty(tuple(points.shape), dtype=np.float64)
        pts = points.detach().cpu().double().numpy()
        idx = case_index.cpu().numpy()
        for ci in np.unique(idx):
            rows = idx == ci
            out[rows] = fn(self.table.ids[int(ci)], pts[rows])
        return torch.from_numpy(out)

    def after_step(self, step: int) -> None:
        """Hook after the optimiser step (momentum encoders, queues). Default: nothing."""

    def log_columns(self) -> list[str]:
        return []

    @torch.no_grad()
    def pooled_features(self, x: Tensor) -> Tensor:
        """(B, C) global average of the deepest encoder stage: what the probe reads."""
        deepest = self.backbone.encode(x)[-1]
        return deepest.flatten(2).mean(-1)
