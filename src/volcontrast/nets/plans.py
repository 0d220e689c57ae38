"""Build the CNN that an nnU-Net v2 ``plans.json`` describes, without importing anything it names.

Two plans formats are understood:

- current (nnU-Net >= 2.4): ``configurations[cfg]["architecture"] = {"network_class_name":
  "dynamic_network_architectures.architectures.unet.PlainConvUNet", "arch_kwargs": {...},
  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}``;
- older: ``UNet_class_name``, ``UNet_base_num_features``, ``unet_max_num_features``,
  ``n_conv_per_stage_encoder``/``_decoder``, ``conv_kernel_sizes``, ``pool_op_kernel_sizes``
  (instance norm, LeakyReLU, conv bias — as nnU-Net built them).

``inherits_from`` between configurations is followed. Class strings resolve only against
:data:`volcontrast.nets.unet.OP_ALLOW_LIST` and the two network classes below.
"""

from __future__ import annotations

import json
import os
from typing import Any

from volcontrast.errors import InputError
from volcontrast.nets.backbones import build_backbone
from volcontrast.nets.base import Backbone
from volcontrast.nets.unet import OP_KEYS, resolve_op

NETWORK_CLASSES: dict[str, str] = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "plain_unet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "resenc_unet",
    "PlainConvUNet": "plain_unet",
    "ResidualEncoderUNet": "resenc_unet",
}


def _configuration(plans: dict[str, Any], configuration: str, where: str) -> dict[str, Any]:
    configs = plans.get("configurations")
    if not isinstance(configs, dict):
        raise InputError(where, "no 'configurations' in plans (is this an nnU-Net v2 plans.json?)")
    chain: list[dict[str, Any]] = []
    name: str | None = configuration
    while name is not None:
        if name not in configs:
            raise InputError(where, f"configuration {name!r} not found; available: {', '.join(configs)}")
        if len(chain) > len(configs):
            raise InputError(where, f"configuration {configuration!r}: inherits_from forms a cycle")
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    merged: dict[str, Any] = {}
    for cfg in reversed(chain):
        merged.update(cfg)
    return merged


def _network_name(class_name: Any, where: str) -> str:
    net = NETWORK_CLASSES.get(str(class_name))
    if net is None:
        raise InputError(where, f"network class {class_name!r} is not supported; supported: "
                         + ", ".join(k for k in NETWORK_CLASSES if "." in k))
    return net


def plans_to_arch(plans: dict[str, Any], configuration: str = "3d_fullres",
                  where: str = "plans.json") -> tuple[str, int, dict[str, Any]]:
    """Parse a plans dict → ``(backbone name, dim, architecture kwargs for build_backbone)``.

    Raises:
        InputError: missing configuration, unsupported network class, or a class string outside the
            allow-list (nothing is imported).
    """
    cfg = _configuration(plans, configuration, where)
    if "architecture" in cfg:
        arch = cfg["architecture"]
        name = _network_name(arch.get("network_class_name"), where)
        kwargs = dict(arch.get("arch_kwargs") or {})
        extra = sorted(set(arch.get("_kw_requires_import", [])) - {"conv_op", *OP_KEYS})
        if extra:
            raise InputError(where, f"arch_kwargs {extra} require imports that are not supported")
        try:
            conv_op = resolve_op(kwargs.pop("conv_op", None), "conv_op")
            for key in OP_KEYS:  # validate now so the error names the plans file
                resolve_op(kwargs.get(key), key)
        except ValueError as error:
            raise InputError(where, str(error)) from error
    elif "UNet_class_name" in cfg:
        name = _network_name(cfg["UNet_class_name"], where)
        try:
            kernels, strides = cfg["conv_kernel_sizes"], cfg["pool_op_kernel_sizes"]
            n = len(kernels)
            base, cap = int(cfg["UNet_base_num_features"]), int(cfg["unet_max_num_features"])
            depth_key = "n_conv_per_stage" if name == "plain_unet" else "n_blocks_per_stage"
            kwargs = {
                "n_stages": n, "features_per_stage": [min(base * 2**i, cap) for i in range(n)],
                "kernel_sizes": kernels, "strides": strides,
                depth_key: cfg["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": cfg["n_conv_per_stage_decoder"],
            }
        except (KeyError, TypeError) as error:
            raise InputError(where, f"configuration {configuration!r} lacks field {error}") from error
        conv_op = resolve_op(f"torch.nn.Conv{len(kernels[0])}d")
    else:
        raise InputError(where, f"configuration {configuration!r} has neither 'architecture' nor 'UNet_class_name'")
    dims = {"Conv2d": 2, "Conv3d": 3}
    if conv_op is None or conv_op.__name__ not in dims:
        raise InputError(where, f"conv_op must be Conv2d or Conv3d, got {conv_op}")
    return name, dims[conv_op.__name__], kwargs


def backbone_from_nnunet_plans(
    plans_json_path: str | os.PathLike,
    configuration: str = "3d_fullres",
    *,
    in_channels: int,
    num_classes: int,
    deep_supervision: bool = False,
) -> Backbone:
    """Build the backbone matching an nnU-Net v2 ``plans.json`` configuration.

    Args:
        plans_json_path: path of ``nnUNetPlans.json`` (or any plans file).
        configuration: e.g. ``"3d_fullres"``, ``"2d"``, ``"3d_lowres"``.
        in_channels: number of input channels (``len(dataset.json["channel_names"])``).
        num_classes: number of labels including background (``len(dataset.json["labels"])``).
        deep_supervision: return one logit map per decoder stage.

    Returns:
        the backbone, with ``preset=None`` and every field explicit in ``arch_config()``; its
        state dict maps to nnU-Net's with :func:`volcontrast.nets.unet.to_nnunet_state_dict`.

    Raises:
        InputError: unreadable file, unknown configuration or class, or invalid architecture.
    """
    where = str(plans_json_path)
    try:
        with open(plans_json_path, encoding="utf-8") as handle:
            plans = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(where, f"cannot read plans: {error}") from error
    name, dim, kwargs = plans_to_arch(plans, configuration, where)
    try:
        return build_backbone(name, dim=dim, in_channels=in_channels, num_classes=num_classes, preset=None,
                              deep_supervision=deep_supervision, **kwargs)
    except InputError as error:
        raise InputError(where, f"configuration {configuration!r}: {error.problem}") from error
