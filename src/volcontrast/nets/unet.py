"""nnU-Net's CNNs (dynamic-network-architectures ``PlainConvUNet`` / ``ResidualEncoderUNet``) behind
the :class:`~volcontrast.nets.base.Backbone` interface.

The upstream network is built as nnU-Net builds it (same kwargs, He initialisation) and its
``encoder`` / ``decoder`` modules are reused as they are, with two changes to the module tree:

- ``decoder.seg_layers`` moves to ``seg_head`` (so ``decoder.*`` does not depend on ``num_classes``);
- the decoder's back-reference to the encoder is unregistered (upstream state dicts hold every encoder
  tensor twice, once as ``decoder.encoder.*``; loading a decoder would silently overwrite the encoder).

:func:`to_nnunet_state_dict` maps our state dict back to the upstream layout, which loads strictly into
nnU-Net v2's network built from the same plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import Tensor, nn

from volcontrast.nets.base import Backbone, cumulative_strides

# Allow-list of torch.nn classes a config or nnU-Net plans file may name. Nothing else is ever resolved.
_ALLOWED_OPS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU,
)
OP_ALLOW_LIST: dict[str, type[nn.Module]] = {}
for _cls in _ALLOWED_OPS:
    OP_ALLOW_LIST[f"torch.nn.{_cls.__name__}"] = _cls
    OP_ALLOW_LIST[f"{_cls.__module__}.{_cls.__name__}"] = _cls  # e.g. torch.nn.modules.conv.Conv3d
OP_KEYS = ("norm_op", "dropout_op", "nonlin")

_CLASSES: dict[str, type[nn.Module]] = {"plain_unet": PlainConvUNet, "resenc_unet": ResidualEncoderUNet}
_COMMON_KEYS = (
    "n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage_decoder", "conv_bias",
    "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs",
)
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "plain_unet": (*_COMMON_KEYS, "n_conv_per_stage", "nonlin_first"),
    "resenc_unet": (*_COMMON_KEYS, "n_blocks_per_stage", "stem_channels"),
}
_PER_STAGE_KEYS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage")


def op_name(cls: type[nn.Module] | None) -> str | None:
    """Canonical config string of an allowed op class, e.g. ``"torch.nn.InstanceNorm3d"``."""
    return None if cls is None else f"torch.nn.{cls.__name__}"


def resolve_op(name: str | None, where: str = "op") -> type[nn.Module] | None:
    """Allowed op string (``"torch.nn.Conv3d"``, ``"torch.nn.modules.conv.Conv3d"``) → class; None → None.

    Raises:
        ValueError: the string is not in :data:`OP_ALLOW_LIST` (nothing is imported).
    """
    if name is None:
        return None
    cls = OP_ALLOW_LIST.get(str(name))
    if cls is None:
        allowed = sorted({op_name(c) for c in OP_ALLOW_LIST.values()})
        raise ValueError(f"{where}: class {name!r} is not allowed; allowed: {', '.join(allowed)}")
    return cls


def _per_axis(value: Any, dim: int, key: str, n_stages: int) -> list[list[int]]:
    """Scalar, per-stage scalars, or per-stage per-axis lists → per-stage per-axis lists."""
    if isinstance(value, int):
        value = [value] * n_stages
    out = []
    for v in value:
        v = [int(v)] * dim if isinstance(v, int) else [int(i) for i in v]
        if len(v) != dim:
            raise ValueError(f"{key}: entry {v} has {len(v)} axes, expected {dim}")
        out.append(v)
    return out


def resolve_unet_kwargs(name: str, dim: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Complete, validated, JSON-serialisable kwargs of a CNN backbone.

    ``kwargs`` is a preset's kwargs updated with overrides. Scalars are expanded per stage and axis;
    ``norm: "instance"|"batch"`` picks the dimension's norm op; op strings are checked against the
    allow-list and must match ``dim``.
    """
    kw = dict(kwargs)
    norm = kw.pop("norm", None)
    unknown = sorted(set(kw) - set(ARCH_KEYS[name]))
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {unknown}; allowed: {', '.join(ARCH_KEYS[name])}")
    if "features_per_stage" not in kw or "strides" not in kw:
        raise ValueError(f"{name}: features_per_stage and strides are required")
    n_stages = int(kw.get("n_stages", len(kw["features_per_stage"])))
    kw["n_stages"] = n_stages
    if isinstance(kw["features_per_stage"], int):
        kw["features_per_stage"] = [kw["features_per_stage"]] * n_stages
    kw.setdefault("kernel_sizes", 3)
    kw["kernel_sizes"] = _per_axis(kw["kernel_sizes"], dim, "kernel_sizes", n_stages)
    kw["strides"] = _per_axis(kw["strides"], dim, "strides", n_stages)
    depth_key = "n_conv_per_stage" if name == "plain_unet" else "n_blocks_per_stage"
    kw.setdefault(depth_key, 2 if name == "plain_unet" else 1)
    kw.setdefault("n_conv_per_stage_decoder", 2 if name == "plain_unet" else 1)
    for key in (depth_key, "n_conv_per_stage_decoder"):
        n = n_stages if key == depth_key else n_stages - 1
        kw[key] = [int(kw[key])] * n if isinstance(kw[key], int) else [int(v) for v in kw[key]]
    kw["features_per_stage"] = [int(v) for v in kw["features_per_stage"]]
    for key in (*_PER_STAGE_KEYS, "n_conv_per_stage_decoder"):
        if key in kw:
            want = n_stages - 1 if key == "n_conv_per_stage_decoder" else n_stages
            if len(kw[key]) != want:
                raise ValueError(
                    f"{name}: {key} has {len(kw[key])} entries but n_stages={n_stages} needs {want}; "
                    "override n_stages, features_per_stage, strides, kernel_sizes and the per-stage conv "
                    "counts together"
                )
    kw.setdefault("conv_bias", True)
    if "norm_op" not in kw:
        norm_cls = {"instance": (nn.InstanceNorm2d, nn.InstanceNorm3d), "batch": (nn.BatchNorm2d, nn.BatchNorm3d)}
        kw["norm_op"] = op_name(norm_cls[norm or "instance"][dim - 2])
        kw.setdefault("norm_op_kwargs", {"eps": 1e-5, "affine": True})
    kw.setdefault("norm_op_kwargs", None)
    kw.setdefault("dropout_op", None)
    kw.setdefault("dropout_op_kwargs", None)
    kw.setdefault("nonlin", "torch.nn.LeakyReLU")
    kw.setdefault("nonlin_kwargs", {"inplace": True})
    if name == "plain_unet":
        kw.setdefault("nonlin_first", False)
    else:
        kw.setdefault("stem_channels", None)
    for key in OP_KEYS:
        cls = resolve_op(kw[key], key)
        kw[key] = op_name(cls)
        if kw[key] and kw[key][-2:] in ("1d", "2d", "3d") and kw[key][-2] != str(dim):
            raise ValueError(f"{name}: {key}={kw[key]} does not fit dim={dim}")
    return {k: kw[k] for k in ARCH_KEYS[name]}


class DNAUNetBackbone(Backbone):
    """``PlainConvUNet`` (``name="plain_unet"``) or ``ResidualEncoderUNet`` (``"resenc_unet"``).

    Encoder stages are the upstream encoder's stage outputs (the residual encoder's stem is part of
    stage 0); decoder stages are the outputs of the upstream decoder's merge-conv stages.
    """

    def __init__(self, name: str, *, dim: int, in_channels: int, num_classes: int, preset: str | None,
                 deep_supervision: bool, kwargs: dict[str, Any]):
        resolved = resolve_unet_kwargs(name, dim, kwargs)
        super().__init__(name, preset, resolved)
        self.dim, self.in_channels, self.num_classes = dim, in_channels, num_classes
        self.deep_supervision = deep_supervision
        net_kwargs = {k: resolve_op(v) if k in OP_KEYS else v for k, v in resolved.items()}
        net_kwargs["conv_op"] = nn.Conv2d if dim == 2 else nn.Conv3d
        net = _CLASSES[name](input_channels=in_channels, num_classes=num_classes, deep_supervision=False,
                             **net_kwargs)
        net.apply(net.initialize)  # He init (+ zero last norm of residual blocks), as nnU-Net does

        decoder = net.decoder
        del decoder._modules["encoder"]  # keep a plain reference only: no `decoder.encoder.*` duplicates
        decoder.__dict__["encoder"] = net.encoder
        seg_layers = decoder.seg_layers
        del decoder.seg_layers
        self.encoder = net.encoder
        self.decoder = decoder
        self.seg_head = nn.ModuleList(seg_layers)

        self.encoder_channels = list(resolved["features_per_stage"])
        self.encoder_strides = cumulative_strides(resolved["strides"])
        self.decoder_channels = self.encoder_channels[-2::-1]
        self.decoder_strides = self.encoder_strides[-2::-1]
        self.min_input_multiple = self.encoder_strides[-1]
        self.set_post_decoder_blocks(None)

    def encode(self, x: Tensor) -> list[Tensor]:
        self.check_input_size(x.shape[2:])
        return list(self.encoder(x))

    def decode(self, skips: Sequence[Tensor]) -> list[Tensor]:
        n = len(self.decoder.stages)
        if len(skips) != n + 1:
            raise ValueError(f"expected {n + 1} encoder features, got {len(skips)}")
        x = skips[-1]
        out = []
        for s in range(n):
            x = self.decoder.transpconvs[s](x)
            x = torch.cat((x, skips[-(s + 2)]), 1)
            x = self.decoder.stages[s](x)
            x = self.post_decoder_blocks[s](x)
            out.append(x)
        return out


def to_nnunet_state_dict(model: DNAUNetBackbone) -> dict[str, Tensor]:
    """State dict in the layout of dynamic-network-architectures' own network (what nnU-Net v2 saves).

    ``seg_head.i`` → ``decoder.seg_layers.i`` and the encoder is repeated under ``decoder.encoder.``.
    Post-decoder blocks have no upstream counterpart; they must be identity.
    """
    if any(not isinstance(m, nn.Identity) for m in model.post_decoder_blocks):
        raise ValueError("post-decoder blocks have no nnU-Net counterpart; remove them before exporting")
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("seg_head."):
            out["decoder.seg_layers." + key[len("seg_head."):]] = value
        else:
            out[key] = value
        if key.startswith("encoder."):
            out["decoder." + key] = value
    return out
