"""Named architecture presets for every backbone family.

A preset is plain data: the keyword arguments of the backbone (dimension-agnostic where
possible — a scalar kernel size or stride is expanded to every spatial axis at build time)
plus the spatial dimensions it is meant for. :func:`volcontrast.nets.build_backbone` starts
from a preset and applies ``**overrides`` on top.

CNN presets (``plain_unet``, ``resenc_unet``) use dynamic-network-architectures keyword
names (``features_per_stage``, ``strides``, ``n_conv_per_stage`` / ``n_blocks_per_stage``,
...); ``swin_unetr`` presets use MONAI ``SwinUNETR`` names (``feature_size``, ``depths``, ...).

Parameter counts (in_channels=1, num_classes=2) are listed in ``description``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from volcontrast.errors import InputError

BACKBONE_NAMES: tuple[str, ...] = ("plain_unet", "resenc_unet", "swin_unetr")


@dataclass(frozen=True)
class Preset:
    """One named architecture setting of one backbone family.

    Attributes:
        name: preset name, e.g. ``"tiny"``.
        backbone: backbone family it belongs to (one of :data:`BACKBONE_NAMES`).
        dims: spatial dimensions the preset is meant for (2 and/or 3).
        kwargs: backbone keyword arguments (JSON-like values only).
        description: one line for listings.
    """

    name: str
    backbone: str
    dims: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_PRESETS: list[Preset] = [
    # ---------------------------------------------------------------- plain_unet
    Preset("tiny", "plain_unet", (2, 3), dict(
        features_per_stage=[8, 16, 32, 64], strides=[1, 2, 2, 2], kernel_sizes=3,
        n_conv_per_stage=[1, 1, 1, 1], n_conv_per_stage_decoder=[1, 1, 1]),
        "CPU tests/demo: 4 stages 8..64, 1 conv/stage (3D 0.17 M, 2D 0.06 M params)"),
    Preset("small", "plain_unet", (2, 3), dict(
        features_per_stage=[16, 32, 64, 128, 128], strides=[1, 2, 2, 2, 2], kernel_sizes=3,
        n_conv_per_stage=[2, 2, 2, 2, 2], n_conv_per_stage_decoder=[1, 1, 1, 1]),
        "CPU-feasible experiments: 5 stages 16..128, 2 convs/stage (3D 3.2 M, 2D 1.1 M params)"),
    Preset("nnunet-3d", "plain_unet", (3,), dict(
        features_per_stage=[32, 64, 128, 256, 320, 320], strides=[1, 2, 2, 2, 2, 2], kernel_sizes=3,
        n_conv_per_stage=[2, 2, 2, 2, 2, 2], n_conv_per_stage_decoder=[2, 2, 2, 2, 2]),
        "nnU-Net 3d_fullres: 6 stages 32..320, 2 convs/stage, patch 96³/128³ (31.2 M params)"),
    Preset("nnunet-2d", "plain_unet", (2,), dict(
        features_per_stage=[32, 64, 128, 256, 512, 512, 512], strides=[1, 2, 2, 2, 2, 2, 2], kernel_sizes=3,
        n_conv_per_stage=[2] * 7, n_conv_per_stage_decoder=[2] * 6),
        "nnU-Net 2d: 7 stages 32..512, 2 convs/stage, inputs multiple of 64 (33.5 M params)"),
    # ---------------------------------------------------------------- resenc_unet
    Preset("tiny", "resenc_unet", (2, 3), dict(
        features_per_stage=[8, 16, 32, 64], strides=[1, 2, 2, 2], kernel_sizes=3,
        n_blocks_per_stage=[1, 1, 1, 1], n_conv_per_stage_decoder=[1, 1, 1]),
        "CPU tests/demo: 4 stages 8..64, 1 residual block/stage (3D 0.32 M, 2D 0.11 M params)"),
    Preset("small", "resenc_unet", (2, 3), dict(
        features_per_stage=[16, 32, 64, 128, 128], strides=[1, 2, 2, 2, 2], kernel_sizes=3,
        n_blocks_per_stage=[1, 2, 2, 2, 2], n_conv_per_stage_decoder=[1, 1, 1, 1]),
        "CPU-feasible experiments: 5 stages 16..128, blocks 1,2,2,2,2 (3D 5.2 M, 2D 1.8 M params)"),
    Preset("nnunet-3d", "resenc_unet", (3,), dict(
        features_per_stage=[32, 64, 128, 256, 320, 320], strides=[1, 2, 2, 2, 2, 2], kernel_sizes=3,
        n_blocks_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=[1, 1, 1, 1, 1]),
        "nnU-Net ResEnc-M-style 3d_fullres: 6 stages 32..320, blocks 1,3,4,6,6,6 (102 M params)"),
    Preset("nnunet-2d", "resenc_unet", (2,), dict(
        features_per_stage=[32, 64, 128, 256, 512, 512, 512], strides=[1, 2, 2, 2, 2, 2, 2], kernel_sizes=3,
        n_blocks_per_stage=[1, 3, 4, 6, 6, 6, 6], n_conv_per_stage_decoder=[1] * 6),
        "nnU-Net ResEnc-style 2d: 7 stages 32..512, blocks 1,3,4,6,6,6,6 (106 M params)"),
    # ---------------------------------------------------------------- swin_unetr
    Preset("tiny", "swin_unetr", (2, 3), dict(
        feature_size=12, depths=[1, 1, 1, 1], num_heads=[3, 6, 12, 24], window_size=4),
        "CPU tests/demo: feature_size 12, depths 1,1,1,1, window 4 (3D 3.7 M, 2D 1.4 M params)"),
    Preset("small", "swin_unetr", (2, 3), dict(
        feature_size=24, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7),
        "feature_size 24, depths 2,2,2,2 (3D 15.7 M, 2D 6.3 M params)"),
    Preset("base", "swin_unetr", (2, 3), dict(
        feature_size=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7),
        "Swin UNETR (BTCV) size: feature_size 48, depths 2,2,2,2 (3D 62.2 M, 2D 25.1 M params)"),
    Preset("nnunet-3d", "swin_unetr", (3,), dict(
        feature_size=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7),
        "alias of 'base' so one --preset name works for every backbone (3D)"),
    Preset("nnunet-2d", "swin_unetr", (2,), dict(
        feature_size=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7),
        "alias of 'base' so one --preset name works for every backbone (2D)"),
]

PRESETS: dict[tuple[str, str], Preset] = {(p.backbone, p.name): p for p in _PRESETS}


def list_presets(backbone: str | None = None) -> list[Preset]:
    """All presets, or those of one backbone family, in registry order."""
    if backbone is not None:
        check_backbone_name(backbone)
    return [p for p in _PRESETS if backbone is None or p.backbone == backbone]


def check_backbone_name(name: str) -> None:
    """Raise :class:`InputError` unless ``name`` is a known backbone family."""
    if name not in BACKBONE_NAMES:
        raise InputError("backbone", f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")


def get_preset(backbone: str, name: str, dim: int) -> Preset:
    """Look up a preset and check it is meant for ``dim`` spatial dimensions.

    Raises:
        InputError: unknown backbone or preset, or a preset built for another dimension
            (e.g. ``nnunet-3d`` with ``dim=2``).
    """
    check_backbone_name(backbone)
    preset = PRESETS.get((backbone, name))
    if preset is None:
        names = ", ".join(p.name for p in list_presets(backbone))
        raise InputError("preset", f"unknown preset {name!r} for {backbone}; choose one of {names}")
    if dim not in preset.dims:
        raise InputError("preset", f"preset {name!r} of {backbone} is for {preset.dims}-D inputs, not {dim}-D")
    return preset
