"""MONAI ``SwinUNETR`` (2D and 3D) behind the :class:`~volcontrast.nets.base.Backbone` interface.

The MONAI network is built once and its submodules are regrouped, not re-implemented:

- ``encoder``: ``swinViT`` + the residual conv blocks ``encoder1..4`` and ``encoder10``;
- ``decoder``: the up-blocks ``decoder5..1``;
- ``seg_head``: one 1×1(×1) ``UnetOutBlock`` per decoder stage; the last one is MONAI's ``out``.

Encoder stages (F = ``feature_size``, p = ``patch_size``, default 2), shallow → deep:

====  ==========================  ========  ==================
 i    tensor (MONAI name)         channels  down-sampling
====  ==========================  ========  ==================
 0    ``encoder1(x)`` (enc0)       F         1
 1    ``encoder2(hs[0])`` (enc1)   F         p
 2    ``encoder3(hs[1])`` (enc2)   2F        2p
 3    ``encoder4(hs[2])`` (enc3)   4F        4p
 4    ``hs[3]`` (swin stage 3)     8F        8p
 5    ``encoder10(hs[4])`` (dec4)  16F       16p (bottleneck)
====  ==========================  ========  ==================

where ``hs = swinViT(x, normalize)``. Decoder stages, deep → shallow: 8F, 4F, 2F, F, F channels at
8p, 4p, 2p, p, 1. Inputs must be multiples of ``p**5`` (32) per axis — a MONAI requirement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.networks.blocks import UnetOutBlock
from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from volcontrast.nets.base import Backbone

SWIN_KEYS: tuple[str, ...] = (
    "feature_size", "depths", "num_heads", "window_size", "patch_size", "mlp_ratio", "qkv_bias", "norm_name",
    "drop_rate", "attn_drop_rate", "dropout_path_rate", "normalize", "patch_norm", "use_checkpoint",
    "downsample", "use_v2",
)
_DEFAULTS: dict[str, Any] = {
    "feature_size": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "patch_size": 2,
    "mlp_ratio": 4.0, "qkv_bias": True, "norm_name": "instance", "drop_rate": 0.0, "attn_drop_rate": 0.0,
    "dropout_path_rate": 0.0, "normalize": True, "patch_norm": False, "use_checkpoint": False,
    "downsample": "merging", "use_v2": False,
}
_ENCODER_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
_DECODER_BLOCKS = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")


def resolve_swin_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Complete, JSON-serialisable ``SwinUNETR`` kwargs (preset + overrides + MONAI defaults)."""
    unknown = sorted(set(kwargs) - set(SWIN_KEYS))
    if unknown:
        raise ValueError(f"swin_unetr: unknown argument(s) {unknown}; allowed: {', '.join(SWIN_KEYS)}")
    kw = {**_DEFAULTS, **kwargs}
    if not isinstance(kw["norm_name"], str) or not isinstance(kw["downsample"], str):
        raise ValueError("swin_unetr: norm_name and downsample must be strings in a config")
    for key in ("depths", "num_heads"):
        kw[key] = [int(v) for v in kw[key]]
    if not isinstance(kw["window_size"], int):
        kw["window_size"] = [int(v) for v in kw["window_size"]]
    if kw["feature_size"] % 12:
        raise ValueError(f"swin_unetr: feature_size must be a multiple of 12, got {kw['feature_size']}")
    return {k: kw[k] for k in SWIN_KEYS}


class SwinEncoder(nn.Module):
    """MONAI's Swin transformer and encoder conv blocks; forward returns the 6 encoder stages."""

    def __init__(self, net: SwinUNETR):
        super().__init__()
        self.swinViT = net.swinViT
        for name in _ENCODER_BLOCKS:
            setattr(self, name, getattr(net, name))
        self.normalize = net.normalize

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, C_in, *spatial) → 6 stage outputs (see module docstring)."""
        hidden = self.swinViT(x, self.normalize)
        return [
            self.encoder1(x),
            self.encoder2(hidden[0]),
            self.encoder3(hidden[1]),
            self.encoder4(hidden[2]),
            hidden[3],
            self.encoder10(hidden[4]),
        ]


class SwinDecoder(nn.Module):
    """MONAI's up-blocks ``decoder5..decoder1`` (deep → shallow), in ``blocks`` order."""

    def __init__(self, net: SwinUNETR):
        super().__init__()
        for name in _DECODER_BLOCKS:
            setattr(self, name, getattr(net, name))

    @property
    def blocks(self) -> list[nn.Module]:
        return [getattr(self, name) for name in _DECODER_BLOCKS]


class SwinUNETRBackbone(Backbone):
    """MONAI ``SwinUNETR`` with encoder / decoder / seg-head groups (see the module docstring)."""

    def __init__(self, *, dim: int, in_channels: int, num_classes: int, preset: str | None,
                 deep_supervision: bool, kwargs: dict[str, Any]):
        resolved = resolve_swin_kwargs(kwargs)
        super().__init__("swin_unetr", preset, resolved)
        self.dim, self.in_channels, self.num_classes = dim, in_channels, num_classes
        self.deep_supervision = deep_supervision
        net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, spatial_dims=dim, **resolved)
        self.encoder = SwinEncoder(net)
        self.decoder = SwinDecoder(net)

        f, p = resolved["feature_size"], resolved["patch_size"]
        self.encoder_channels = [f, f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.encoder_strides = [(s,) * dim for s in (1, p, 2 * p, 4 * p, 8 * p, 16 * p)]
        self.decoder_channels = self.encoder_channels[-2::-1]
        self.decoder_strides = self.encoder_strides[-2::-1]
        self.min_input_multiple = (math.lcm(p**5, 16 * p),) * dim
        heads = [UnetOutBlock(dim, c, num_classes) for c in self.decoder_channels[:-1]]
        self.seg_head = nn.ModuleList([*heads, net.out])
        self.set_post_decoder_blocks(None)

    def encode(self, x: Tensor) -> list[Tensor]:
        self.check_input_size(x.shape[2:])
        return self.encoder(x)

    def decode(self, skips: Sequence[Tensor]) -> list[Tensor]:
        if len(skips) != 6:
            raise ValueError(f"expected 6 encoder features, got {len(skips)}")
        x = skips[-1]
        out = []
        for s, block in enumerate(self.decoder.blocks):
            x = self.post_decoder_blocks[s](block(x, skips[-(s + 2)]))
            out.append(x)
        return out


def to_monai_state_dict(model: SwinUNETRBackbone) -> dict[str, Tensor]:
    """State dict in MONAI ``SwinUNETR``'s layout (loads strictly into ``SwinUNETR`` built with
    ``model.arch_config()``'s kwargs). Deep-supervision heads other than the last are dropped."""
    last = len(model.seg_head) - 1
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.") or key.startswith("decoder."):
            out[key.split(".", 1)[1]] = value
        elif key.startswith(f"seg_head.{last}."):
            out["out." + key[len(f"seg_head.{last}."):]] = value
        elif key.startswith("post_decoder_blocks."):
            raise ValueError("post-decoder blocks have no MONAI counterpart; remove them before exporting")
    return out
