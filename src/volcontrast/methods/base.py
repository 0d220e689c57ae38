"""What every pretraining method provides to the engine.

A method is an ``nn.Module`` holding the backbone, its heads and any state (queues, momentum copies). The
engine calls, per step: ``prepare(raw, step, gen, device)`` (device-side views, no autograd) ->
``forward(batch) -> (loss, logs)`` (through DDP) -> ``after_step(step)``. Parts of the backbone a method does
not train are frozen (``requires_grad=False``) so DDP and the optimiser never see them.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from volcontrast import dist
from volcontrast.engine.config import PretrainConfig
from volcontrast.errors import InputError
from volcontrast.nets.base import Backbone
from volcontrast.spatial.correspondence import CorrespondenceProvider, get_provider
from volcontrast.views.geometry import CaseTable


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

    def after_step(self, step: int) -> None:
        """Hook after the optimiser step (momentum encoders, queues). Default: nothing."""

    def log_columns(self) -> list[str]:
        return []

    @torch.no_grad()
    def pooled_features(self, x: Tensor) -> Tensor:
        """(B, C) global average of the deepest encoder stage: what the probe reads."""
        deepest = self.backbone.encode(x)[-1]
        return deepest.flatten(2).mean(-1)
