"""``volcontrast pretrain``: a method's self-supervised pretraining on a cache, through the shared engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from volcontrast import __version__, dist
from volcontrast.config import save_yaml, to_dict
from volcontrast.data.cache import Cache
from volcontrast.engine.config import PretrainConfig
from volcontrast.engine.probe import BodyPositionProbe
from volcontrast.engine.run import RunDir
from volcontrast.engine.trainer import FitResult, fit, loop_settings
from volcontrast.errors import InputError
from volcontrast.methods import build_method
from volcontrast.methods.base import PretrainMethod
from volcontrast.nets import backbone_from_config
from volcontrast.views.geometry import CaseTable
from volcontrast.views.sampler import StepSampler


class PretrainTask:
    """Adapts a :class:`PretrainMethod` to the engine's :class:`~volcontrast.engine.trainer.TrainTask`."""

    def __init__(self, method: PretrainMethod, model_json: dict[str, Any], probe: BodyPositionProbe | None,
                 probe_every: int):
        self.module = method
        self.method = method
        self._model_json = model_json
        self.probe = probe
        self.probe_every = probe_every

    def prepare(self, raw, step, gen, device):
        with torch.no_grad():
            return self.method.prepare(raw, step, gen, device)

    def after_step(self, step: int) -> None:
        self.method.after_step(step)

    def parameter_groups(self) -> list[Any]:
        """The method's optimiser groups (``lr_scale``, ``frozen_steps``) if it has any, else its trainable
        parameters."""
        groups = getattr(self.method, "optimizer_groups", None)
        if groups is not None:
            return groups()
        return [p for p in self.method.parameters() if p.requires_grad]

    def monitors(self) -> list[Any]:
        return self.method.monitors()

    def log_columns(self) -> list[str]:
        cols = self.method.log_columns()
        return cols + (["probe_r2_z", "probe_r2_xyz"] if self.probe is not None else [])

    def model_json(self) -> dict[str, Any]:
        return self._model_json

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        if self.probe is None or not (final or (self.probe_every and step % self.probe_every == 0)):
            return {}
        was_training = self.method.training
        self.method.eval()
        try:
            device = next(self.method.parameters()).device
            return self.probe(self.method.pooled_features, device)
        finally:
            self.method.train(was_training)


def build_pretraining(cache: Cache, config: PretrainConfig) -> tuple[PretrainMethod, StepSampler, list[str]]:
    """The registered method (backbone + heads) and its step-indexed sampler for ``config`` on ``cache``."""
    pool = list(config.data.pool) or list(cache.ids)
    unknown = sorted(set(pool) - set(cache.ids))
    if unknown:
        raise InputError("data.pool", f"case ids not in the cache: {unknown[:5]}")
    crop = tuple(config.data.crop_size)
    torch.manual_seed(config.seed)
    backbone = backbone_from_config(config.model, dim=config.dim, in_channels=cache.channels, num_classes=2)
    try:
        backbone.check_input_size(crop)
    except ValueError as exc:
        raise InputError("data.crop_size", str(exc)) from None
    table = CaseTable.from_cache(cache, pool)
    method = build_method(config.method, backbone, config, table)
    return method, method.build_sampler(cache.root, pool, dist.rank()), pool


def pretrain(cache: str | os.PathLike | Cache, out: str | os.PathLike, config: PretrainConfig | None = None, *,
             resume: bool = False, steps: int | None = None, progress: bool = True) -> FitResult:
    """Pretrain ``config.method`` on the cached dataset and write the run folder ``out``.

    With ``resume=True`` the saved ``out/config.yaml`` is used (``steps`` may extend it) and training continues
    from the last checkpoint exactly as an uninterrupted run would.

    Raises:
        InputError: ``out`` already holds a run (without ``resume``), nothing to resume, bad config.
    """
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    run = RunDir(out)
    config = run.open_config(PretrainConfig, config, resume, steps)
    dist.init_distributed_from_env()
    method, sampler, pool = build_pretraining(cache, config)
    if dist.rank() == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        save_yaml(run.root / "config.yaml", config)
    model_json = {
        "kind": "pretrain",
        "method": config.method,
        "dim": config.dim,
        "crop_size": list(config.data.crop_size),
        "architecture": method.backbone.arch_config(),
        "backbone_prefix": "backbone.",
        "preprocessing": cache.manifest.get("resolved"),
        "channel_names": cache.manifest.get("dataset", {}).get("channel_names"),
        "cache": str(Path(cache.root).resolve()),
        "pool": pool,
        "config": to_dict(config),
        "volcontrast_version": __version__,
    }
    probe = None
    if config.probe_crops > 0 and len(pool) >= 2:
        probe = BodyPositionProbe(cache, pool, tuple(config.data.crop_size), config.probe_crops, seed=config.seed)
    settings = loop_settings(config, progress=progress, description=f"pretrain {config.method}")
    task = PretrainTask(method, model_json, probe, config.probe_every)
    return fit(task, sampler, run, settings, resume=resume)
