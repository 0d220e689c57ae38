"""Build a backbone by name (timm-style registry): ``build_backbone("plain_unet", dim=3, preset="tiny")``.

Names: ``plain_unet`` (nnU-Net ``PlainConvUNet``), ``resenc_unet`` (nnU-Net ``ResidualEncoderUNet``),
``swin_unetr`` (MONAI ``SwinUNETR``). Presets: :mod:`volcontrast.nets.presets`.
"""

from __future__ import annotations

from typing import Any

from volcontrast.errors import InputError
from volcontrast.nets.base import Backbone
from volcontrast.nets.presets import check_backbone_name, get_preset
from volcontrast.nets.swin import SwinUNETRBackbone
from volcontrast.nets.unet import DNAUNetBackbone


def build_backbone(
    name: str,
    *,
    dim: int = 3,
    in_channels: int = 1,
    num_classes: int = 2,
    preset: str | None = "tiny",
    deep_supervision: bool = False,
    **overrides: Any,
) -> Backbone:
    """Build a segmentation backbone from a preset plus overrides.

    Args:
        name: ``"plain_unet"``, ``"resenc_unet"`` or ``"swin_unetr"``.
        dim: spatial dimensions, 2 (slices, (B, C, H, W)) or 3 (crops, (B, C, D, H, W)).
        in_channels: input channels (image modalities).
        num_classes: segmentation classes including background.
        preset: a preset name (see :func:`volcontrast.nets.list_presets`), or None to give every
            architecture field in ``overrides`` (this is what :meth:`Backbone.arch_config` stores).
        deep_supervision: if True the model returns one logit map per decoder stage.
        **overrides: architecture fields replacing the preset's, e.g. ``features_per_stage=[8, 16, 32, 64]``
            for the U-Nets (dynamic-network-architectures names; ops as allow-listed strings such as
            ``norm_op="torch.nn.BatchNorm3d"``, or ``norm="batch"``) or ``feature_size=24`` for Swin-UNETR.

    Returns:
        a :class:`~volcontrast.nets.base.Backbone`; ``build_backbone(**model.arch_config())`` rebuilds it.

    Raises:
        InputError: unknown name or preset, a preset for another dimension, or invalid overrides.
    """
    check_backbone_name(name)
    if dim not in (2, 3):
        raise InputError("backbone", f"dim must be 2 or 3, got {dim}")
    if in_channels < 1 or num_classes < 1:
        raise InputError("backbone", f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    kwargs = dict(get_preset(name, preset, dim).kwargs) if preset is not None else {}
    kwargs.update(overrides)
    common = dict(dim=dim, in_channels=in_channels, num_classes=num_classes, preset=preset,
                  deep_supervision=deep_supervision, kwargs=kwargs)
    try:
        if name == "swin_unetr":
            return SwinUNETRBackbone(**common)
        return DNAUNetBackbone(name, **common)
    except (ValueError, TypeError, AssertionError) as error:
        raise InputError(f"backbone {name}", str(error) or repr(error)) from error


def backbone_from_config(model: Any, *, dim: int, in_channels: int, num_classes: int,
                         deep_supervision: bool = False) -> Backbone:
    """Build from a :class:`~volcontrast.engine.config.ModelConfig`: an nnU-Net plans.json if ``model.plans``
    is set (its dimension must match ``dim``), else ``model.backbone`` + ``model.preset`` + overrides."""
    if getattr(model, "plans", ""):
        from volcontrast.nets.plans import backbone_from_nnunet_plans

        net = backbone_from_nnunet_plans(model.plans, model.plans_configuration, in_channels=in_channels,
                                         num_classes=num_classes, deep_supervision=deep_supervision)
        if net.dim != dim:
            raise InputError(model.plans, f"configuration {model.plans_configuration!r} is {net.dim}D, not {dim}D")
        return net
    return build_backbone(model.backbone, dim=dim, in_channels=in_channels, num_classes=num_classes,
                          preset=model.preset, deep_supervision=deep_supervision, **model.overrides)
