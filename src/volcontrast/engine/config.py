"""Pretraining configuration: typed dataclasses, named presets, YAML round trip.

A run's config is resolved as: defaults <- ``--preset`` <- ``--config YAML`` <- explicit CLI flags, and the
result is saved as ``RUN/config.yaml`` (loadable with ``--config`` to repeat the run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from volcontrast.config import resolve, to_dict
from volcontrast.errors import InputError
from volcontrast.views.augment import AugmentConfig


@dataclass
class DataConfig:
    crop_size: tuple[int, ...] = (32, 32, 32)  # 3 values (3D crops) or 2 (2D slices)
    volumes_per_batch: int = 4  # volumes read per step (per rank)
    crops_per_volume: int = 2  # items cut from each volume; each item gives two views
    workers: int = 2  # DataLoader worker processes (0 = in the main process)
    prefetch: int = 2  # steps prefetched per worker
    pool: list[str] = field(default_factory=list)  # case ids to pretrain on (empty = every cached case)


@dataclass
class ModelConfig:
    backbone: str = "plain_unet"  # plain_unet | resenc_unet | swin_unetr
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture fields replacing the preset's
    plans: str = ""  # an nnU-Net v2 plans.json: build the CNN exactly as nnU-Net would (backbone/preset ignored)
    plans_configuration: str = "3d_fullres"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine floor
    grad_clip: float = 0.0  # max grad norm (0 = off)


@dataclass
class ContrastConfig:
    """SimCLR / GCL / PCL (METHODS.md sections 0-1)."""

    temperature: float = 0.1
    loss_scale: float = 1.0  # PCL code parity: temperature / 0.07
    proj_dim: int = 128
    proj_hidden: int = 0  # 0 = same as the encoder's deepest width
    threshold: list[float] = field(default_factory=lambda: [0.1])  # PCL lambda (one, or one per axis)
    position: str = "body"  # body | index
    axes: str = "z"  # z (body axis) | xyz (3D crops, per-axis thresholds)
    partitions: int = 4  # GCL


# Spade's distance radii per correspondence provider (its units): r_friend, r_enemy, r_local
SPADE_RADII: dict[str, tuple[float, float, float]] = {
    "body": (0.05, 0.2, 0.03),  # fractions of the body box per axis
    "index": (0.05, 0.2, 0.03),  # fractions of the whole scan per axis
    "affine": (15.0, 60.0, 8.0),  # mm of the reference scan
}


@dataclass
class SpadeConfig:
    """Spade (METHODS.md section 2; our interpretation of the paper). Radii are in the provider's units
    (:data:`SPADE_RADII`); ``None`` takes the provider's default."""

    provider: str = "body"  # correspondence provider: body | affine | index (or a registered one)
    debias: bool = True  # False: plain MoCo-style global + dense local contrast (the ablation)
    min_overlap: float = 0.3  # each view pair overlaps by at least this fraction of a crop (before scaling)
    momentum: float = 0.99  # momentum encoder, cosine schedule to momentum_end over the run
    momentum_end: float = 0.999
    global_weight: float = 1.0  # lambda_g (0 = no global branch)
    global_dim: int = 128
    global_hidden: int = 0  # 0 = the encoder's deepest width
    global_batch_norm: bool = True  # BN in the head's hidden layer (keeps instance-normed encoders from collapsing)
    global_temperature: float = 0.2
    global_queue: int = 8192
    r_friend: float | None = None  # queue/batch keys nearer than this are soft positives
    r_enemy: float | None = None  # keys at least this far are negatives; in between: excluded
    friend_sigma: float = 0.0  # soft-positive weight exp(-d^2 / 2 sigma^2); 0 = r_friend / 2
    local_weight: float = 1.0  # lambda_l (0 = no local branch)
    local_dim: int = 64
    local_temperature: float = 0.2
    local_points: int = 1024  # overlap voxels per step (per rank), spread evenly over the view pairs
    local_queue: int = 16384
    local_enqueue: int = 256  # local keys pushed into the queue per step (per rank)
    r_local: float | None = None  # local negatives nearer than this to the anchor voxel are excluded
    local_stage: int = -1  # decoder stage of the local features (-1 = full resolution, -2 = half, ...)
    restore_weight: float = 1.0  # lambda_r (0 = no restoration head)

    def radii(self) -> tuple[float, float, float]:
        """(r_friend, r_enemy, r_local) with provider defaults filled in; all 0 without debiasing."""
        if not self.debias:
            return 0.0, 0.0, 0.0
        default = SPADE_RADII.get(self.provider, SPADE_RADII["body"])
        given = (self.r_friend, self.r_enemy, self.r_local)
        return tuple(float(d if g is None else g) for g, d in zip(given, default))  # type: ignore[return-value]


@dataclass
class AliceConfig:
    """Alice (METHODS.md section 3): cross-scan views, tube-masked student, EMA teacher, self-distillation, CASA.

    Defaults are the values that keep the global branch learning at small scale (sharp teacher 0.01, KoLeo 0.1,
    every encoder stage pooled: measured in benchmarks/RESULTS.md); preset ``alice-paper`` holds the released
    code's values.
    """

    # cross-scan view mining (views/pair_sampler.py)
    provider: str = "body"  # correspondence provider: body | affine | index (or a registered one)
    min_confidence: float = 0.5  # matches below this are rejected and redrawn (counted, never accepted)
    max_tries: int = 50  # candidates per pair before an InputError
    pairs_per_batch: int = 4  # (Q, K) pairs per step and rank: 2 x pairs views
    # tube masks (views/masking.py): in-plane blocks extruded through slice_axis, voxels set to 0
    mask_ratio: float = 0.75  # fraction of in-plane blocks masked, in [0, 1)
    mask_block: tuple[int, int] = (16, 16)  # in-plane block size (axes other than slice_axis, in axis order)
    slice_axis: int = 2  # spatial axis the blocks are extruded through (2 = z after canonical RAS+)
    # DINO heads (losses/distill.py): global head on the pooled bottleneck, patch head on the CASA tokens
    num_prototypes: int = 512  # K, for both heads
    # standardise the pooled bottleneck over the batch before the global head (BatchNorm without affine or running
    # statistics): the global average of an instance-normed stage hardly differs between crops, so without it
    # every crop starts on the same prototype and centering turns the teacher uniform (collapse)
    global_batch_norm: bool = True
    # the global token pools the deepest global_stages encoder stages (concatenated; 0 = every stage): the pooled
    # instance-normed bottleneck alone carries no crop identity at initialisation (see methods/alice.GlobalHead)
    global_stages: int = 0
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_lr_scale: float = 1.0  # learning rate of both DINO heads = this x optim.lr (schedule included)
    freeze_last_layer_steps: int = 0  # the heads' prototype layers stay fixed (lr 0) for this many steps
    student_temperature: float = 0.1
    # the teacher is sharp (the code: 0.008 -> 0.01): with DINO's 0.04 -> 0.07 a student that cannot yet predict
    # the other patient's crop hedges towards uniform and the teacher follows it (uniform collapse, RESULTS.md)
    teacher_temperature: float = 0.01  # linear warm-up from this ...
    teacher_temperature_end: float = 0.01  # ... to this, then constant
    teacher_warmup_steps: float = 0.3  # < 1: fraction of the run's steps; >= 1: a step count
    center_momentum: float = 0.9  # EMA of the teacher's batch-mean logits (one centre per head)
    momentum: float = 0.996  # teacher EMA momentum, cosine schedule to momentum_end over the run
    momentum_end: float = 1.0
    # CASA (nets/casa.py): queries = student bottleneck tokens of the masked crop
    casa_dim: int = 256  # common token size (TokenProjection of each source)
    casa_heads: int = 8
    casa_ffn_ratio: float = 4.0
    casa_dropout: float = 0.0
    teacher_casa: str = "shared"  # T through the student's CASA block (code) | "ema": the teacher's EMA copy
    # keys/values: decoder stage (index into the backbone's decoder stages, deep -> shallow): 0 = the first
    # decoder stage, one up-sampling above the bottleneck (nnFormer in the code: 8³ = 512 tokens at 64³);
    # -1 = full resolution (far too many tokens)
    decoder_stage: int = 0
    # loss = inter_weight * L_inter + intra_weight * L_intra + rec_weight * L_rec
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    rec_weight: float = 5.0  # the code's 10 x MSE / 2
    rec_masked_only: bool = True  # MSE on masked voxels (paper, MAE-style); False: all voxels (code)
    # KoLeo spread of the student's global embeddings (DINOv2), added to the loss: keeps the student's crops apart
    # while it cannot predict the teacher yet (0 = off, as in the code)
    koleo_weight: float = 0.1
    # collapse monitor (engine): warn when the global teacher sends every crop to one prototype (prototype usage
    # below usage_floor; 0 = 2 / num_prototypes) or turns uniform (entropy above entropy_ceiling x ln K; 0 = off)
    usage_floor: float = 0.0
    entropy_ceiling: float = 0.99

    def warmup_steps(self, total_steps: int) -> int:
        """The teacher-temperature warm-up in steps (a fraction < 1 of ``total_steps``, else a count)."""
        w = float(self.teacher_warmup_steps)
        return round(w * total_steps) if w < 1 else round(w)

    def collapse_floor(self) -> float:
        """Prototype-usage floor of the collapse monitor."""
        return float(self.usage_floor) if self.usage_floor > 0 else 2.0 / self.num_prototypes

    def collapse_ceiling(self) -> float:
        """Teacher-entropy ceiling of the collapse monitor, in nats (0 = off)."""
        return float(self.entropy_ceiling) * math.log(self.num_prototypes)


@dataclass
class PretrainConfig:
    method: str = "pcl"
    dim: int = 3
    steps: int = 100
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    spade: SpadeConfig = field(default_factory=SpadeConfig)
    alice: AliceConfig = field(default_factory=AliceConfig)
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    checkpoint_every: int = 100  # write the latest checkpoint every N steps (and at the end)
    keep_every: int = 0  # also keep a snapshot every K steps (0 = keep only the latest)
    probe_every: int = 0  # body-position probe every K steps (0 = only at the end)
    probe_crops: int = 48
    collapse_patience: int = 3  # consecutive logged steps at the collapse value before warning

    def validate(self) -> PretrainConfig:
        if self.dim not in (2, 3):
            raise InputError("--dim", f"must be 2d or 3d, got {self.dim}")
        if self.dim == 2 and len(self.data.crop_size) == 3:  # a 3D default crop read as its in-plane size
            self.data.crop_size = tuple(self.data.crop_size[:2])
        if self.dim == 2 and self.model.preset.endswith("-3d"):  # e.g. nnunet-3d -> nnunet-2d for slices
            self.model.preset = self.model.preset[:-3] + "-2d"
        if len(self.data.crop_size) != self.dim:
            got = list(self.data.crop_size)
            raise InputError("data.crop_size", f"needs {self.dim} values for {self.dim}D, got {got}")
        if self.steps < 1:
            raise InputError("--steps", "must be >= 1")
        if self.contrast.position not in ("body", "index"):
            raise InputError("contrast.position", "must be body or index")
        if self.contrast.axes not in ("z", "xyz"):
            raise InputError("contrast.axes", "must be z or xyz")
        if self.optim.name not in ("adamw", "sgd"):
            raise InputError("optim.name", "must be adamw or sgd")
        if self.amp not in ("auto", "bf16", "off"):
            raise InputError("amp", "must be auto, bf16 or off")
        if self.method.startswith("spade"):
            sp = self.spade
            if self.dim != 3:
                raise InputError("--dim", "spade works on 3D crops only")
            if not 0.0 < sp.min_overlap <= 1.0:
                raise InputError("spade.min_overlap", f"must be in (0, 1], got {sp.min_overlap}")
            r_friend, r_enemy, r_local = sp.radii()
            if r_friend < 0 or r_enemy < r_friend or r_local < 0:
                raise InputError("spade", f"need 0 <= r_friend <= r_enemy and r_local >= 0, got "
                                          f"{r_friend}, {r_enemy}, {r_local}")
            if sp.global_weight <= 0 and sp.local_weight <= 0 and sp.restore_weight <= 0:
                raise InputError("spade", "every loss weight is 0; enable global, local or restore")
        if self.method == "alice":
            self._validate_alice()
        if self.dim == 2 and self.augment.flip_axes == (0, 1, 2):
            self.augment.flip_axes = (0, 1)
        return self

    def _validate_alice(self) -> None:
        a = self.alice
        if self.dim != 3:
            raise InputError("--dim", f"alice works on 3D crops only, got dim {self.dim}")
        if not 0.0 <= a.mask_ratio < 1.0:
            raise InputError("alice.mask_ratio", f"must be in [0, 1), got {a.mask_ratio}")
        if a.slice_axis not in (-3, -2, -1, 0, 1, 2):
            raise InputError("alice.slice_axis", f"must be 0, 1 or 2, got {a.slice_axis}")
        axis = a.slice_axis % 3
        plane = [int(s) for i, s in enumerate(self.data.crop_size) if i != axis]
        block = [int(b) for b in a.mask_block]
        if len(block) != 2 or min(block) < 1:
            raise InputError("alice.mask_block", f"needs two in-plane sizes >= 1, got {list(a.mask_block)}")
        if any(b >= p for b, p in zip(block, plane)):
            raise InputError("alice.mask_block", f"in-plane block {block} must be smaller than the crop's in-plane "
                                                 f"size {plane} (crop {list(self.data.crop_size)}, slice axis "
                                                 f"{axis}); use smaller blocks for small crops, e.g. "
                                                 "`alice: {mask_block: [4, 4]}` in a --config YAML")
        if not 0.0 <= a.min_confidence <= 1.0:
            raise InputError("alice.min_confidence", f"must be in [0, 1], got {a.min_confidence}")
        for name in ("max_tries", "pairs_per_batch", "num_prototypes", "head_hidden", "head_bottleneck",
                     "casa_dim", "casa_heads"):
            if int(getattr(a, name)) < 1:
                raise InputError(f"alice.{name}", f"must be >= 1, got {getattr(a, name)}")
        if int(a.global_stages) < 0:
            raise InputError("alice.global_stages", f"must be >= 0 (0 = every encoder stage), got {a.global_stages}")
        if a.casa_dim % a.casa_heads:
            raise InputError("alice.casa_dim", f"must be a multiple of casa_heads ({a.casa_heads}), got {a.casa_dim}")
        for name in ("student_temperature", "teacher_temperature", "teacher_temperature_end", "casa_ffn_ratio"):
            if not float(getattr(a, name)) > 0:
                raise InputError(f"alice.{name}", f"must be > 0, got {getattr(a, name)}")
        if not 0.0 <= a.casa_dropout < 1.0:
            raise InputError("alice.casa_dropout", f"must be in [0, 1), got {a.casa_dropout}")
        if a.teacher_warmup_steps < 0:
            raise InputError("alice.teacher_warmup_steps", f"must be >= 0, got {a.teacher_warmup_steps}")
        if not 0.0 <= a.center_momentum <= 1.0:
            raise InputError("alice.center_momentum", f"must be in [0, 1], got {a.center_momentum}")
        if not 0.0 <= a.momentum <= a.momentum_end <= 1.0:
            raise InputError("alice.momentum", f"need 0 <= momentum <= momentum_end <= 1, got {a.momentum}, "
                                               f"{a.momentum_end}")
        if a.teacher_casa not in ("shared", "ema"):
            raise InputError("alice.teacher_casa", f"must be shared or ema, got {a.teacher_casa!r}")
        weights = (a.inter_weight, a.intra_weight, a.rec_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise InputError("alice", f"loss weights must be >= 0 and not all 0, got inter/intra/rec {weights}")
        if a.koleo_weight < 0:
            raise InputError("alice.koleo_weight", f"must be >= 0, got {a.koleo_weight}")
        if not 0.0 <= a.usage_floor < 1.0:
            raise InputError("alice.usage_floor", f"must be in [0, 1), got {a.usage_floor}")
        if not 0.0 <= a.entropy_ceiling <= 1.0:
            raise InputError("alice.entropy_ceiling", f"must be in [0, 1], got {a.entropy_ceiling}")
        if a.head_lr_scale < 0 or a.freeze_last_layer_steps < 0:
            raise InputError("alice", f"head_lr_scale and freeze_last_layer_steps must be >= 0, got "
                                      f"{a.head_lr_scale}, {a.freeze_last_layer_steps}")


# Presets are partial configs (nested dicts) applied on top of the defaults.
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": {
        "steps": 20,
        "data": {"crop_size": [24, 24, 24], "volumes_per_batch": 2, "crops_per_volume": 2, "workers": 0},
        "model": {"preset": "tiny"},
        "log_every": 5, "checkpoint_every": 10, "probe_crops": 24,
    },
    "cpu-small": {
        "steps": 300,
        "data": {"crop_size": [32, 32, 32], "volumes_per_batch": 4, "crops_per_volume": 2, "workers": 2},
        "model": {"preset": "tiny"},
        "optim": {"lr": 2e-3, "warmup_steps": 20},
        "log_every": 10, "checkpoint_every": 100, "probe_every": 100,
    },
    "gpu-3d": {
        "steps": 10000,
        "data": {"crop_size": [96, 96, 96], "volumes_per_batch": 4, "crops_per_volume": 2, "workers": 8},
        "model": {"preset": "nnunet-3d"},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-5, "warmup_steps": 500, "grad_clip": 12.0},
        "log_every": 50, "checkpoint_every": 1000, "keep_every": 5000, "probe_every": 1000,
    },
    "pcl-paper": {  # METHODS.md section 1: 2D slices, SGD 0.1 cosine to 0, 32 slices, paper augmentation
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
    },
    "alice-paper": {  # METHODS.md section 3 with the released code's values (research/alice.md section 0)
        "method": "alice",
        "steps": 10000,
        # 64³ crops; the code pairs one scan with the previous batch's (batch 1 per GPU): we mine 8 pairs/step
        "data": {"crop_size": [64, 64, 64], "workers": 8},
        # nnU-Net widths with 5 stages: bottleneck 4³ = 64 query tokens and first decoder stage 8³ = 512
        # key/value tokens at 64³, the token counts of nnFormer in the code
        "model": {"preset": "nnunet-3d", "overrides": {"features_per_stage": [32, 64, 128, 256, 320],
                                                       "strides": [1, 2, 2, 2, 2], "n_conv_per_stage": [2] * 5,
                                                       "n_conv_per_stage_decoder": [2] * 4}},
        # AdamW, weight decay 0.04 (the code's start value; it ramps to 0.4), clipping 3 (the code's is per
        # parameter), warm-up then cosine
        "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.04, "warmup_steps": 500, "min_lr": 1e-5,
                  "grad_clip": 3.0},
        # the code's augmentations are computed and discarded: views are the plain crops
        "augment": {"flip_prob": 0.0, "spatial_prob": 0.0, "brightness_prob": 0.0, "contrast_prob": 0.0,
                    "gamma_prob": 0.0, "noise_prob": 0.0, "blur_prob": 0.0, "context": 1.0},
        "alice": {"pairs_per_batch": 8, "mask_ratio": 0.75, "mask_block": [16, 16], "slice_axis": 2,
                  "num_prototypes": 512, "head_hidden": 2048, "head_bottleneck": 256, "student_temperature": 0.1,
                  "teacher_temperature": 0.008, "teacher_temperature_end": 0.01,
                  "teacher_warmup_steps": 0.03,  # 30 of 1000 epochs
                  "freeze_last_layer_steps": 100,  # the code: 1 epoch (of 1000)
                  "center_momentum": 0.9, "momentum": 0.996, "momentum_end": 1.0, "casa_dim": 512,
                  "casa_heads": 8, "casa_dropout": 0.1, "teacher_casa": "shared", "decoder_stage": 0,
                  "inter_weight": 1.0, "intra_weight": 1.0, "rec_weight": 5.0, "rec_masked_only": False,
                  # the code pools the bottleneck alone and has no KoLeo term
                  "global_stages": 1, "koleo_weight": 0.0},
        "log_every": 50, "checkpoint_every": 1000, "keep_every": 5000, "probe_every": 1000,
    },
}


def resolve_pretrain_config(
    preset: str | None = None, yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> PretrainConfig:
    """Defaults <- preset <- YAML <- overrides (each a nested dict), validated."""
    return resolve(PretrainConfig, PRETRAIN_PRESETS, preset, yaml_data, overrides)


__all__ = [
    "PRETRAIN_PRESETS",
    "SPADE_RADII",
    "AliceConfig",
    "ContrastConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "SpadeConfig",
    "resolve_pretrain_config",
    "to_dict",
]
