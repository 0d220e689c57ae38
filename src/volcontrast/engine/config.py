"""Pretraining configuration: typed dataclasses, named presets, YAML round trip.

A run's config is resolved as: defaults <- ``--preset`` <- ``--config YAML`` <- explicit CLI flags, and the
result is saved as ``RUN/config.yaml`` (loadable with ``--config`` to repeat the run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from volcontrast.config import resolve, to_dict
from volcontrast.errors import InputError
from volcontrast.methods.registry import config_sections, get_method, method_presets
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
class PretrainConfig:
    method: str = "pcl"  # the default --method; any registered name (volcontrast.methods.registry)
    dim: int = 3
    steps: int = 100
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # + one section per registered method config (contrast, spade, alice, voco, mae, ...): see extra_sections
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    checkpoint_every: int = 100  # write the latest checkpoint every N steps (and at the end)
    keep_every: int = 0  # also keep a snapshot every K steps (0 = keep only the latest)
    probe_every: int = 0  # body-position probe every K steps (0 = only at the end)
    probe_crops: int = 48
    collapse_patience: int = 3  # consecutive logged steps at the collapse value before warning

    @staticmethod
    def extra_sections() -> dict[str, type]:
        """The method config sections (``contrast:``, ``spade:``, ``alice:``, ...): the method registry's."""
        return config_sections()

    def __post_init__(self) -> None:
        for name, cls in self.extra_sections().items():
            if name not in self.__dict__:
                setattr(self, name, cls())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and to_dict(self) == to_dict(other)

    def __getattr__(self, name: str) -> Any:  # a section registered after this config was built
        sections = config_sections() if not name.startswith("__") else {}
        if name in sections:
            value = sections[name]()
            setattr(self, name, value)
            return value
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def validate(self) -> PretrainConfig:
        """Shared checks, then the method's own (``validate_config`` of its registered class)."""
        spec = get_method(self.method)
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
        if self.optim.name not in ("adamw", "sgd"):
            raise InputError("optim.name", "must be adamw or sgd")
        if self.amp not in ("auto", "bf16", "off"):
            raise InputError("amp", "must be auto, bf16 or off")
        spec.cls.validate_config(self)
        if self.dim == 2 and self.augment.flip_axes == (0, 1, 2):
            self.augment.flip_axes = (0, 1)
        self.augment.check()
        return self


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
}


def pretrain_presets() -> dict[str, dict[str, Any]]:
    """Every preset ``--preset`` accepts: the shared ones above and those the methods register."""
    return {**PRETRAIN_PRESETS, **method_presets()}


def resolve_pretrain_config(
    preset: str | None = None, yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> PretrainConfig:
    """Defaults <- preset <- YAML <- overrides (each a nested dict), validated."""
    return resolve(PretrainConfig, pretrain_presets(), preset, yaml_data, overrides)


__all__ = [
    "PRETRAIN_PRESETS",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "pretrain_presets",
    "resolve_pretrain_config",
    "to_dict",
]
