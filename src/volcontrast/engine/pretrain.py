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
from volcontrast.views.pair_sampler import CrossScanPairSampler, PairSamplerConfig
from volcontrast.views.sampler import BoxSampler, BoxSamplerConfig, StepSampler, box_size_for


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
    """The method (backbone + heads) and the step-indexed sampler for ``config`` on ``cache``: boxes of single
    scans (:class:`BoxSampler`), or for ``alice`` pairs of boxes at matched anatomy of two different scans
    (:class:`CrossScanPairSampler`, ``alice.pairs_per_batch`` pairs per step and rank)."""
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
    box = box_size_for(crop, config.augment.context)
    sampler: StepSampler
    if config.method == "alice":
        a = config.alice
        pair_cfg = PairSamplerConfig(crop_size=crop, box_size=box, pairs_per_batch=a.pairs_per_batch,
                                     provider=a.provider, min_confidence=a.min_confidence, max_tries=a.max_tries)
        sampler = CrossScanPairSampler(cache.root, pool, pair_cfg, seed=config.seed, rank=dist.rank(),
                                       steps=config.steps)
        return method, sampler, pool
    sampler_cfg = BoxSamplerConfig(
        crop_size=crop, box_size=box, volumes_per_batch=config.data.volumes_per_batch,
        crops_per_volume=config.data.crops_per_volume, dim=config.dim,
    )
    sampler = BoxSampler(cache.root, pool, sampler_cfg, seed=config.seed, rank=dist.rank(), steps=config.steps)
    return method, sampler, pool


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
    settings.usage_floor = float(getattr(method, "usage_floor", 0.0))  # self-distillation collapse monitor
    settings.entropy_ceiling = float(getattr(method, "entropy_ceiling", 0.0))
    task = PretrainTask(method, model_json, probe, config.probe_every)
    return fit(task, sampler, run, settings, resume=resume)
