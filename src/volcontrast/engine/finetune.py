"""``volcontrast finetune``: few-label supervised training (METHODS.md section 5) through the shared engine.

The labelled cases of the cache are split into folds (:mod:`volcontrast.data.splits`); fold ``fold`` is the
test fold and is never touched here. ``labeled`` training volumes are drawn with the protocol's seed (the same
draw for every method). **Every label counts**: by default no label is read for checkpoint choice (fixed
schedule, the last weights are the model); ``val = N`` draws N labelled volumes from the fold's validation cases
to choose ``RUN/best/``, and they are part of the run's label budget ``M = labeled + val`` (``RUN/split.json``
records ``labeled``, ``validation`` and ``label_budget``). The encoder comes from a pretraining run (decoder
fresh, or ``load="all"``) or from scratch. Loss: Dice + CE (MONAI).

The recipe (like nnssl's pretrained trainer): a linear warm-up of the whole network over ``warmup_fraction`` of
the steps, then poly decay ``(1 - t)^0.9`` (``lr_schedule``; or cosine); a pretrained encoder runs at
``encoder_lr_scale`` x the learning rate, and a network trained from scratch gets its own learning rate
``scratch_lr`` (tuned by ``volcontrast benchmark --lr-sweep``). The training Dice of every batch is logged
(``train_dice`` in ``log.csv``) so convergence can be checked, and ``snapshots`` saves the weights at chosen
steps (``RUN/snapshots/step<N>/``) to score the model part-way through fine-tuning.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from volcontrast import __version__, dist
from volcontrast.config import resolve, save_yaml, to_dict
from volcontrast.data.cache import Cache
from volcontrast.data.splits import LabelledDraw, Split, kfold_splits, labelled_draw
from volcontrast.engine.config import ModelConfig, OptimConfig
from volcontrast.engine.inference import sliding_window_probabilities
from volcontrast.engine.run import RunDir, load_model_json, load_weights, save_checkpoint
from volcontrast.engine.trainer import FitResult, LoopSettings, fit, loop_settings
from volcontrast.errors import InputError
from volcontrast.losses.pdcr import PDCRLoss
from volcontrast.nets import backbone_from_config, build_backbone, load_encoder_state
from volcontrast.nets.base import Backbone
from volcontrast.nets.uafs import add_uafs
from volcontrast.utils.files import atomic_write_json
from volcontrast.views.augment import AugmentConfig, augment, sample_views
from volcontrast.views.label_sampler import LabelledBoxSampler, LabelSamplerConfig
from volcontrast.views.sampler import box_size_for


@dataclass
class FinetuneData:
    crop_size: tuple[int, ...] = (32, 32, 32)
    batch_size: int = 2
    foreground_prob: float = 0.33
    workers: int = 0
    prefetch: int = 2


@dataclass
class FinetuneConfig:
    steps: int = 200
    seed: int = 0  # label draw and training randomness
    split_seed: int = 0  # the fold assignment (fixed across seeds and methods)
    fold: int = 0
    folds: int = 3
    labeled: int = 0  # labelled training volumes (0 = every training case of the fold)
    val: int = 0  # labelled validation volumes for checkpoint choice (0 = none: last weights); part of the budget
    val_fraction: float = 0.2  # share of the fold's non-test cases set aside as validation candidates
    init: str = "scratch"  # "scratch" or a pretraining run folder
    load: str = "encoder"  # encoder | all (encoder + decoder from the pretraining run)
    encoder_lr_scale: float = 0.5  # learning-rate factor for a *pretrained* encoder (scratch: always 1)
    scratch_lr: float = 0.0  # learning rate when init = scratch (0 = optim.lr)
    lr_schedule: str = "poly"  # after the warm-up: poly ((1 - t)^poly_power, nnU-Net) | cosine
    poly_power: float = 0.9
    warmup_fraction: float = 0.1  # linear warm-up of the whole network over this share of the steps (0: optim's)
    snapshots: list[int] = field(default_factory=list)  # also save the weights after these steps
    freeze_encoder_steps: int = 0  # keep a *pretrained* encoder fixed for the first N steps (decoder warm-up)
    freeze_encoder: bool = False  # frozen-encoder probe: the encoder (weights and norm statistics) never changes
    dim: int = 3
    data: FinetuneData = field(default_factory=FinetuneData)
    model: ModelConfig = field(default_factory=ModelConfig)  # used when init = scratch
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=1e-4, warmup_steps=10))
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(rotation_deg=15.0, scale_range=(0.85, 1.15),
                                                                         spatial_prob=0.3, context=1.3))
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    pdcr: bool = False  # label-affinity patch contrast on encoder features (METHODS.md section 4)
    pdcr_weight: float = 0.01  # per layer (averaged over layers)
    pdcr_stages: list[int] = field(default_factory=lambda: [2, 3])  # 0-based encoder stages (3rd and 4th)
    pdcr_grid: int = 0  # sample every N input voxels; 0 = about patch/4, a multiple of the stages' strides
    pdcr_windows: list[int] = field(default_factory=list)  # empty: receptive-field cubes; else H-PDCR sizes
    pdcr_temperature: float = 0.5
    pdcr_cross_layer: bool = False  # + cross-layer term between the first two stages (weight 0.005)
    uafs: bool = False  # uncertainty-aware feature re-weighting after each decoder stage
    deep_supervision: bool = False  # Dice+CE on every decoder stage (weights halve per level)
    val_every: int = 0  # validation (for checkpoint choice) every K steps; 0 = only at the end
    val_overlap: float = 0.25
    amp: str = "auto"
    compile: bool = False
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100

    def validate(self) -> FinetuneConfig:
        if self.dim == 2 and len(self.data.crop_size) == 3:
            self.data.crop_size = tuple(self.data.crop_size[:2])
        if self.dim == 2 and self.model.preset.endswith("-3d"):  # e.g. nnunet-3d -> nnunet-2d for slices
            self.model.preset = self.model.preset[:-3] + "-2d"
        if len(self.data.crop_size) != self.dim:
            raise InputError("data.crop_size", f"needs {self.dim} values for {self.dim}D")
        if self.load not in ("encoder", "all"):
            raise InputError("--load", "must be encoder or all")
        if self.lr_schedule not in ("poly", "cosine"):
            raise InputError("lr_schedule", f"must be poly or cosine, got {self.lr_schedule!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InputError("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if self.val < 0:
            raise InputError("--val", f"validation volumes must be >= 0, got {self.val}")
        if self.dim == 2 and self.augment.flip_axes == (0, 1, 2):
            self.augment.flip_axes = (0, 1)
        self.augment.check()
        return self


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": {"steps": 20, "data": {"crop_size": [24, 24, 24], "batch_size": 2}, "log_every": 5},
    "cpu-small": {"steps": 300, "data": {"crop_size": [32, 32, 32], "batch_size": 4}, "val_every": 100},
    "gpu-3d": {"steps": 4000, "data": {"crop_size": [96, 96, 96], "batch_size": 2, "workers": 6},
               "model": {"preset": "nnunet-3d"}, "optim": {"lr": 1e-3, "warmup_steps": 100, "grad_clip": 12.0},
               "val_every": 500, "log_every": 50, "checkpoint_every": 500},
    "pcl-paper": {"dim": 2, "steps": 2000, "data": {"crop_size": [256, 256], "batch_size": 10},
                  "optim": {"name": "adamw", "lr": 5e-5, "min_lr": 5e-6, "weight_decay": 1e-5}, "dice_weight": 0.0,
                  "lr_schedule": "cosine", "warmup_fraction": 0.0, "encoder_lr_scale": 1.0, "val_every": 200},
}


def resolve_finetune_config(preset: str | None = None, yaml_data: dict | None = None,
                            overrides: dict | None = None) -> FinetuneConfig:
    """Defaults <- preset <- YAML <- overrides (each a nested dict), validated."""
    return resolve(FinetuneConfig, FINETUNE_PRESETS, preset, yaml_data, overrides)


def pdcr_grid_spacing(net: Backbone, stages: list[int], crop: tuple[int, ...], requested: int) -> int:
    """``requested``, or about a quarter of the smallest patch side rounded to a multiple of the stages' strides
    (at least one stride: e.g. 8 for 32³ patches of the tiny U-Net, 32 for 128³ nnU-Net patches)."""
    if requested:
        return requested
    lattice = math.lcm(*(int(s) for st in stages for s in net.encoder_strides[st]))
    return max(lattice, (min(crop) // 4) // lattice * lattice)


@torch.no_grad()
def batch_dice(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Hard Dice of ``argmax(logits)`` against ``labels`` on a training batch: per foreground class over the whole
    batch, averaged over the classes present in prediction or truth (0 when none is); stays on the device."""
    pred = logits.argmax(1)
    labels = labels.to(pred.device).long()
    dices, present = [], []
    for c in range(1, num_classes):
        p, t = pred == c, labels == c
        denom = (p.sum() + t.sum()).float()
        dices.append(2.0 * (p & t).sum().float() / denom.clamp(min=1.0))
        present.append(denom > 0)
    if not dices:
        return torch.zeros((), device=pred.device)
    d, m = torch.stack(dices), torch.stack(present).float()
    return (d * m).sum() / m.sum().clamp(min=1.0)


class SegmentationModel(nn.Module):
    """Backbone + Dice/CE loss (+ optional PDCR on encoder features): ``forward(batch) -> (loss, logs)``.

    ``frozen_encoder``: the encoder has no trainable parameters and stays in eval mode while the rest trains (its
    normalisation statistics do not move either): the frozen-encoder probe."""

    def __init__(self, net: Backbone, num_classes: int, dice_weight: float, ce_weight: float,
                 pdcr: nn.Module | None = None, frozen_encoder: bool = False):
        super().__init__()
        self.frozen_encoder = frozen_encoder
        if frozen_encoder:
            net.encoder.requires_grad_(False)
        from monai.losses import DiceCELoss

        self.net = net
        self.num_classes = num_classes
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight,
                               batch=True)
        self.pdcr = pdcr

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.frozen_encoder:
            self.net.encoder.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        skips = self.net.encode(batch["views"])
        out = self.net.segment(self.net.decode(skips))
        target = batch["labels"][:, None].long()
        if isinstance(out, list):  # deep supervision: full resolution first, halve the weight per level
            weights = [0.5**i for i in range(len(out))]
            loss = sum(w * self.loss(o.float(), nn.functional.interpolate(target.float(), size=o.shape[2:]).long())
                       for w, o in zip(weights, out)) / sum(weights)
        else:
            loss = self.loss(out.float(), target)
        logs: dict[str, Tensor] = {"train_dice": batch_dice(out[0] if isinstance(out, list) else out,
                                                            batch["labels"], self.num_classes)}
        if self.pdcr is not None:
            reg = self.pdcr(self.pdcr.select(skips), batch["labels"].long(), generator=batch.get("pdcr_generator"))
            logs.update({"seg_loss": loss.detach(), "pdcr_loss": reg.loss.detach()})
            loss = loss + reg.loss
        return loss, logs


class SegmentationTask:
    def __init__(self, model: SegmentationModel, config: FinetuneConfig, cache: Cache, val_ids: list[str],
                 run: RunDir, model_json: dict[str, Any]):
        self.module = model
        self.export_module = model.net
        self.config = config
        self.cache = cache
        self.val_ids = val_ids
        self.run = run
        self._model_json = model_json
        self.best: tuple[float, int] | None = None

    def parameter_groups(self) -> list[dict[str, Any]]:
        net = self.module.net
        if self.config.init == "scratch":
            return [{"params": list(net.parameters())}]
        enc = list(net.encoder.parameters())
        ids = {id(p) for p in enc}
        rest = [p for p in self.module.parameters() if id(p) not in ids]
        return [{"params": enc, "lr_scale": self.config.encoder_lr_scale,
                 "frozen_steps": self.config.freeze_encoder_steps}, {"params": rest}]

    def prepare(self, raw, step, gen, device):
        crop = tuple(self.config.data.crop_size)
        boxes = raw["boxes"].to(device, non_blocking=True)
        labels = raw["label_boxes"].to(device, non_blocking=True)
        out = augment(boxes, crop, self.config.augment, gen)
        lab = sample_views(labels[:, None].float(), out.voxel_to_box, crop, mode="nearest")[:, 0]
        return {"views": out.views, "labels": lab.round().to(torch.uint8), "n_samples": boxes.shape[0],
                "pdcr_generator": gen}

    def after_step(self, step: int) -> None:
        if step + 1 in self.config.snapshots and dist.rank() == 0:
            save_checkpoint(self.run.root / "snapshots" / f"step{step + 1}", self.module.net,
                            {**self._model_json, "step": step + 1}, None)

    def log_columns(self) -> list[str]:
        return ["train_dice", "val_dice"] + (["seg_loss", "pdcr_loss"] if self.config.pdcr else [])

    def model_json(self) -> dict[str, Any]:
        best = {"best_step": self.best[1], "best_val_dice": self.best[0]} if self.best else {}
        return {**self._model_json, **best}

    def validate(self) -> float:
        """Mean foreground Dice over the validation cases (sliding window on the cached grid)."""
        net = self.module.net
        device = next(net.parameters()).device
        dices = []
        for cid in self.val_ids:
            probs = sliding_window_probabilities(net, self.cache.image(cid), self.config.data.crop_size,
                                                 overlap=self.config.val_overlap, device=device)
            pred = probs.argmax(0).numpy()
            truth = np.asarray(self.cache.label(cid))
            for c in range(1, self.module.num_classes):
                p, t = pred == c, truth == c
                if p.any() or t.any():
                    dices.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
        return float(np.mean(dices)) if dices else float("nan")

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        every = self.config.val_every
        if not self.val_ids or not (final or (every and step % every == 0)):
            return {}
        dice = self.validate()
        if self.best is None or dice > self.best[0]:
            self.best = (dice, step)
            save_checkpoint(self.run.root / "best", self.module.net,
                            {**self._model_json, "step": step, "val_dice": dice}, None)
        return {"val_dice": dice}


def resolve_split(cache: Cache, config: FinetuneConfig) -> tuple[Split, LabelledDraw]:
    """The fold's split of the labelled cases and the run's labelled draw (training + validation volumes)."""
    labelled = cache.labelled_ids
    if len(labelled) < config.folds:
        raise InputError(cache.root, f"only {len(labelled)} labelled cases; need at least --folds {config.folds}")
    splits = kfold_splits(labelled, config.folds, seed=config.split_seed, val_fraction=config.val_fraction)
    if not 0 <= config.fold < len(splits):
        raise InputError("--fold", f"must be in 0..{len(splits) - 1}")
    split = splits[config.fold]
    return split, labelled_draw(split, config.labeled, config.val, config.seed)


def build_segmentation_backbone(cache: Cache, config: FinetuneConfig) -> tuple[Backbone, str]:
    """Backbone for fine-tuning and a one-line description of its initialisation."""
    num_classes = max(2, cache.num_classes)
    torch.manual_seed(config.seed)
    if config.init == "scratch":
        net = backbone_from_config(config.model, dim=config.dim, in_channels=cache.channels,
                                   num_classes=num_classes, deep_supervision=config.deep_supervision)
        if config.uafs:
            add_uafs(net)
        return net, "scratch"
    from volcontrast.engine.interop import build_from_external, external_init_kind

    if external_init_kind(config.init):  # an nnU-Net v2 / nnssl checkpoint file or a MONAI bundle folder
        return build_from_external(config.init, config.model, dim=config.dim, in_channels=cache.channels,
                                   num_classes=num_classes, deep_supervision=config.deep_supervision,
                                   load=config.load, uafs=config.uafs)
    run = Path(config.init)
    meta = load_model_json(run)
    if meta.get("kind") != "pretrain":
        raise InputError(run / "model.json", "--init must be a pretraining run folder (kind 'pretrain')")
    if int(meta.get("dim", 3)) != config.dim:
        raise InputError(run / "model.json", f"pretraining run is {meta.get('dim')}D but --dim is {config.dim}D")
    arch = dict(meta["architecture"])
    arch.update(num_classes=num_classes, in_channels=cache.channels, deep_supervision=config.deep_supervision)
    net = build_backbone(**arch)
    if config.uafs:  # before loading: the pretrained state has no UAFS keys, and needs none
        add_uafs(net)
    weights = load_weights(run)
    prefix = meta.get("backbone_prefix", "backbone.")
    try:
        report = load_encoder_state(net, weights, source_prefix=prefix, strict=True)
    except ValueError as exc:
        raise InputError(run / "model.safetensors", str(exc)) from None
    if config.load == "all":
        dec = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix + "decoder.")}
        net.load_state_dict(dec, strict=False)
    parts = f"{len(report.loaded)} encoder tensors" + (", decoder" if config.load == "all" else "")
    return net, f"{meta.get('method')} run {run} ({parts})"


def finetune_loop_settings(config: FinetuneConfig, *, progress: bool = False,
                           description: str = "finetune") -> LoopSettings:
    """The loop settings of the recipe: the optimiser section, with scratch's own learning rate, the warm-up as a
    share of the steps and the decay schedule (the encoder's factor is a parameter group, see
    :meth:`SegmentationTask.parameter_groups`)."""
    s = loop_settings(config, progress=progress, description=description)
    lr = config.scratch_lr if config.init == "scratch" and config.scratch_lr > 0 else s.lr
    warmup = round(config.warmup_fraction * config.steps) if config.warmup_fraction > 0 else s.warmup_steps
    return replace(s, lr=lr, warmup_steps=warmup, schedule=config.lr_schedule, poly_power=config.poly_power)


def finetune(cache: str | os.PathLike | Cache, out: str | os.PathLike, config: FinetuneConfig | None = None, *,
             resume: bool = False, steps: int | None = None, progress: bool = True) -> FitResult:
    """Fine-tune a segmentation network on few labelled volumes; writes the run folder ``out``."""
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    run = RunDir(out)
    config = run.open_config(FinetuneConfig, config, resume, steps)
    dist.init_distributed_from_env()
    split, draw = resolve_split(cache, config)
    train_ids = draw.train
    net, init_note = build_segmentation_backbone(cache, config)
    crop = tuple(config.data.crop_size)
    try:
        net.check_input_size(crop)
    except ValueError as exc:
        raise InputError("data.crop_size", str(exc)) from None
    sampler = LabelledBoxSampler(
        cache.root, train_ids,
        LabelSamplerConfig(crop_size=crop, box_size=box_size_for(crop, config.augment.context),
                           batch_size=config.data.batch_size, foreground_prob=config.data.foreground_prob,
                           dim=config.dim),
        seed=config.seed, rank=dist.rank(), steps=config.steps)
    pdcr = None
    if config.pdcr:
        stages = list(config.pdcr_stages)
        if max(stages) >= len(net.encoder_channels):
            raise InputError("--pdcr-stages", f"the encoder has stages 0..{len(net.encoder_channels) - 1}")
        try:
            pdcr = PDCRLoss.for_backbone(
                net, stages=stages, num_classes=max(2, cache.num_classes),
                windows=list(config.pdcr_windows) if config.pdcr_windows else "rf",
                grid_spacing=pdcr_grid_spacing(net, stages, crop, config.pdcr_grid),
                temperature=config.pdcr_temperature, layer_weight=config.pdcr_weight,
                cross_layer=config.pdcr_cross_layer)
        except ValueError as exc:
            raise InputError("--pdcr", str(exc)) from None
    model = SegmentationModel(net, max(2, cache.num_classes), config.dice_weight, config.ce_weight, pdcr,
                              frozen_encoder=config.freeze_encoder)
    label_names = {str(k): v for k, v in cache.label_names.items()}
    model_json = {
        "kind": "segmentation", "architecture": net.arch_config(), "uafs": config.uafs, "dim": config.dim,
        "patch_size": list(crop),
        "preprocessing": cache.manifest.get("resolved"),
        "channel_names": cache.manifest.get("dataset", {}).get("channel_names"),
        "label_names": label_names, "init": config.init, "init_note": init_note,
        "fold": config.fold, "labeled_cases": train_ids, "validation_cases": draw.val,
        "label_budget": draw.budget, "cache": str(Path(cache.root).resolve()),
        "config": to_dict(config), "volcontrast_version": __version__,
    }
    if dist.rank() == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        save_yaml(run.root / "config.yaml", config)
        atomic_write_json(run.root / "split.json", {**split.to_dict(), "labeled": train_ids, "validation": draw.val,
                                                    "label_budget": draw.budget})
    task = SegmentationTask(model, config, cache, draw.val, run, model_json)
    if resume and (run.root / "best" / "model.json").is_file():
        best = load_model_json(run.root / "best")
        task.best = (float(best["val_dice"]), int(best["step"]))
    settings = finetune_loop_settings(config, progress=progress,
                                      description=f"finetune ({init_note.split(' ')[0]}, M={draw.budget})")
    return fit(task, sampler, run, settings, resume=resume)
