"""Pretrained weights from outside volcontrast for ``finetune --init``: nnU-Net v2 / nnssl checkpoints and MONAI
bundles, read with ``torch.load(weights_only=True)`` (no pickled code runs; numpy scalars in nnU-Net's training log
are the only extra types allowed) and nothing in a bundle's config is evaluated.

Which network is built:

- nnU-Net v2 ``checkpoint_final.pth``: the plans and configuration stored in its ``init_args``;
- nnssl checkpoint: ``nnssl_adaptation_plan.architecture_plans`` (``PlainConvUNet`` / ``ResidualEncoderUNet`` with
  their kwargs, or the ``ResEncL`` preset = our ``resenc_unet`` ``nnunet-3d``);
- any other ``{"network_weights": ...}`` file (e.g. ``volcontrast export --to nnunet``) or a bare state dict: the
  fine-tuning config's model (``model.plans`` or backbone + preset), which must then match the weights;
- MONAI bundle folder (``configs/inference.json`` + ``models/model.pt``): its ``network_def`` (MONAI ``SwinUNETR``
  or dynamic-network-architectures' ``PlainConvUNet`` / ``ResidualEncoderUNet``), read as plain JSON.

The network gets the fine-tuning data's channels and classes; the encoder tensors are loaded strictly (every key,
every shape), the decoder too with ``--load all``; segmentation layers never (they depend on the classes).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from volcontrast.errors import InputError
from volcontrast.nets import build_backbone, load_encoder_state
from volcontrast.nets.base import DECODER_PREFIX, SEG_HEAD_PREFIX, Backbone

_SWIN_ENCODER = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
_SWIN_DECODER = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")
_DNA_NAMES = {"PlainConvUNet": "plain_unet", "ResidualEncoderUNet": "resenc_unet"}


def external_init_kind(init: str | os.PathLike | None) -> str | None:
    """``"bundle"`` for a MONAI bundle folder, ``"checkpoint"`` for a file, None otherwise (a run folder or scratch)."""
    if not init or str(init) == "scratch":
        return None
    path = Path(init)
    if path.is_dir() and (path / "configs" / "inference.json").is_file() and not (path / "model.json").is_file():
        return "bundle"
    if path.is_file():
        return "checkpoint"
    return None


def _numpy_safe_globals() -> list[Any]:
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [scalar, np.dtype, *dtypes]


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; numpy scalars (nnU-Net's log) are allowed.

    Raises:
        InputError: naming the file when it cannot be read as weights.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        first = " ".join(str(exc).split())[:300]
        raise InputError(path, f"cannot read as a weights-only PyTorch checkpoint: {first}") from None


def _strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def from_dna_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """dynamic-network-architectures layout (what nnU-Net saves) -> ours: ``decoder.seg_layers.i`` ->
    ``seg_head.i``; the aliased ``decoder.encoder.*`` copies are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in _strip_wrappers(state).items():
        if key.startswith("decoder.encoder."):
            continue
        if key.startswith("decoder.seg_layers."):
            out[SEG_HEAD_PREFIX + key[len("decoder.seg_layers."):]] = value
        else:
            out[key] = value
    return out


def from_monai_swin_state_dict(state: dict[str, Tensor], n_heads: int) -> dict[str, Tensor]:
    """MONAI ``SwinUNETR`` layout -> ours (``out`` is the last segmentation head)."""
    out: dict[str, Tensor] = {}
    for key, value in _strip_wrappers(state).items():
        top = key.split(".", 1)[0]
        if top in _SWIN_ENCODER:
            out["encoder." + key] = value
        elif top in _SWIN_DECODER:
            out[DECODER_PREFIX + key] = value
        elif top == "out":
            out[f"{SEG_HEAD_PREFIX}{n_heads - 1}." + key[len("out."):]] = value
    return out


def _literal(value: Any, key: str, where: Path) -> Any:
    """A bundle value as plain data; ``$torch.nn.X`` op expressions become ``torch.nn.X`` (checked later against
    the allow-list); other expressions and ``@`` references are refused (nothing is evaluated)."""
    if isinstance(value, str) and value.startswith("$"):
        expr = value[1:].strip()
        if expr.startswith("torch.nn.") and expr.replace(".", "").replace("_", "").isalnum():
            return expr
        raise InputError(where, f"network_def.{key} is an expression ({value!r}); only literal values are read")
    if isinstance(value, str) and value.startswith("@"):
        raise InputError(where, f"network_def.{key} is a reference ({value!r}); only literal values are read")
    return value


def backbone_from_network_def(network_def: dict[str, Any], where: Path, *, in_channels: int, num_classes: int,
                              deep_supervision: bool) -> Backbone:
    """Our backbone equal to the network a MONAI bundle's ``network_def`` builds (channels/classes replaced)."""
    from volcontrast.nets.swin import SWIN_KEYS
    from volcontrast.nets.unet import ARCH_KEYS

    target = str(network_def.get("_target_", ""))
    short = target.rsplit(".", 1)[-1]
    try:
        if short == "SwinUNETR":
            kwargs = {k: _literal(v, k, where) for k, v in network_def.items() if k in SWIN_KEYS}
            dim = int(network_def.get("spatial_dims", 3))
            return build_backbone("swin_unetr", dim=dim, in_channels=in_channels, num_classes=num_classes,
                                  preset=None, deep_supervision=deep_supervision, **kwargs)
        if short in _DNA_NAMES:
            name = _DNA_NAMES[short]
            conv = str(_literal(network_def.get("conv_op", "$torch.nn.Conv3d"), "conv_op", where))
            dims = {"torch.nn.Conv2d": 2, "torch.nn.Conv3d": 3}
            if conv not in dims:
                raise InputError(where, f"network_def.conv_op must be torch.nn.Conv2d or Conv3d, got {conv!r}")
            kwargs = {k: _literal(v, k, where) for k, v in network_def.items() if k in ARCH_KEYS[name]}
            return build_backbone(name, dim=dims[conv], in_channels=in_channels, num_classes=num_classes,
                                  preset=None, deep_supervision=deep_supervision, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(where, f"network_def: {exc}") from None
    raise InputError(where, f"network_def._target_ {target!r} is not supported; supported: SwinUNETR, "
                     "PlainConvUNet, ResidualEncoderUNet")


def _network_weights(obj: Any, where: Path) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("network_weights", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(where, "holds no state dict (expected 'network_weights', 'state_dict', 'model' or a "
                         "plain dict of tensors)")
    return dict(obj)


def _arch_from_checkpoint(ckpt: dict[str, Any], where: Path) -> tuple[str, str | None, dict[str, Any]] | None:
    """``(backbone name, preset, kwargs)`` recorded in an nnU-Net v2 or nnssl checkpoint, or None."""
    from volcontrast.nets.plans import plans_to_arch

    init_args = ckpt.get("init_args")
    if isinstance(init_args, dict) and isinstance(init_args.get("plans"), dict):
        configuration = str(init_args.get("configuration", "3d_fullres"))
        name, dim, kwargs = plans_to_arch(init_args["plans"], configuration, str(where))
        return name, None, {"dim": dim, **kwargs}
    plan = ckpt.get("nnssl_adaptation_plan")
    if isinstance(plan, dict):
        arch = plan.get("architecture_plans") or {}
        cls = str(arch.get("arch_class_name", "")).rsplit(".", 1)[-1]
        if cls == "ResEncL" and not arch.get("arch_kwargs"):
            return "resenc_unet", "nnunet-3d", {"dim": 3}
        if cls in _DNA_NAMES and isinstance(arch.get("arch_kwargs"), dict):
            fake_plans = {"configurations": {"pretrain": {"architecture": {
                "network_class_name": cls, "arch_kwargs": arch["arch_kwargs"],
                "_kw_requires_import": arch.get("arch_kwargs_requiring_import") or []}}}}
            name, dim, kwargs = plans_to_arch(fake_plans, "pretrain", str(where))
            return name, None, {"dim": dim, **kwargs}
        raise InputError(where, f"nnssl architecture {arch.get('arch_class_name')!r} is not supported; supported: "
                         "ResEncL, PlainConvUNet, ResidualEncoderUNet")
    return None


def build_from_external(init: str | os.PathLike, model_config: Any, *, dim: int, in_channels: int,
                        num_classes: int, deep_supervision: bool, load: str = "encoder",
                        uafs: bool = False) -> tuple[Backbone, str]:
    """The fine-tuning backbone initialised from an nnU-Net v2 / nnssl checkpoint or a MONAI bundle.

    Args:
        init: the checkpoint file or bundle folder.
        model_config: the fine-tuning :class:`~volcontrast.engine.config.ModelConfig`, used when the file does
            not record its architecture.
        dim, in_channels, num_classes, deep_supervision: of the fine-tuning network.
        load: ``"encoder"`` or ``"all"`` (encoder + decoder).
        uafs: add UAFS blocks after the decoder stages (before loading).

    Returns:
        the backbone and a one-line note on where its weights came from.

    Raises:
        InputError: naming the file: unreadable, unsupported architecture, wrong dimension, or encoder weights
            that do not fit (missing, unexpected or shape-mismatched keys, listed).
    """
    from volcontrast.nets import backbone_from_config

    kind = external_init_kind(init)
    path = Path(init)
    if kind == "bundle":
        from volcontrast.engine.export import read_bundle_network_def

        config_path = path / "configs" / "inference.json"
        network_def = read_bundle_network_def(path)
        net = backbone_from_network_def(network_def, config_path, in_channels=in_channels, num_classes=num_classes,
                                        deep_supervision=deep_supervision)
        weights_path = path / "models" / "model.pt"
        if not weights_path.is_file():
            raise InputError(weights_path, "file not found (a MONAI bundle keeps its weights in models/model.pt)")
        raw = _network_weights(load_checkpoint_file(weights_path), weights_path)
        state = (from_monai_swin_state_dict(raw, len(net.seg_head)) if net.name == "swin_unetr"
                 else from_dna_state_dict(raw))
        source, what = weights_path, "MONAI bundle"
    elif kind == "checkpoint":
        ckpt = load_checkpoint_file(path)
        raw = _network_weights(ckpt, path)
        arch = _arch_from_checkpoint(ckpt, path) if isinstance(ckpt, dict) else None
        if arch is not None:
            name, preset, kwargs = arch
            arch_dim = int(kwargs.pop("dim"))
            if arch_dim != dim:
                raise InputError(path, f"the checkpoint's network is {arch_dim}D but fine-tuning is {dim}D (--dim)")
            net = build_backbone(name, dim=dim, in_channels=in_channels, num_classes=num_classes, preset=preset,
                                 deep_supervision=deep_supervision, **kwargs)
            what = "nnssl checkpoint" if "nnssl_adaptation_plan" in ckpt else "nnU-Net v2 checkpoint"
        else:
            net = backbone_from_config(model_config, dim=dim, in_channels=in_channels, num_classes=num_classes,
                                       deep_supervision=deep_supervision)
            what = "weights file (architecture from the config's model)"
        state = from_dna_state_dict(raw) if net.name != "swin_unetr" else from_monai_swin_state_dict(
            raw, len(net.seg_head))
        source = path
    else:
        raise InputError(init, "is neither a checkpoint file nor a MONAI bundle folder")
    if uafs:
        from volcontrast.nets.uafs import add_uafs

        add_uafs(net)
    try:
        report = load_encoder_state(net, state, strict=True)
    except ValueError as exc:
        raise InputError(source, str(exc)) from None
    if load == "all":
        decoder = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
        try:
            result = net.decoder.load_state_dict(decoder, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise InputError(source, f"decoder weights do not fit: {' '.join(str(exc).split())[:300]}") from None
        if result.missing_keys or result.unexpected_keys:
            raise InputError(source, f"decoder weights do not fit: missing {result.missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    parts = f"{len(report.loaded)} encoder tensors" + (", decoder" if load == "all" else "")
    return net, f"{what} {path} ({parts})"


def plans_patch_size(plans: str | os.PathLike, configuration: str = "3d_fullres") -> list[int] | None:
    """The ``patch_size`` of an nnU-Net v2 plans configuration (``inherits_from`` followed), in the plans' axis
    order (the order of the network built from them); None when the configuration names none.

    Raises:
        InputError: unreadable plans, unknown configuration, or a patch size that is not positive integers.
    """
    import json

    from volcontrast.nets.plans import _configuration

    try:
        data = json.loads(Path(plans).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(plans, f"cannot read plans: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(plans, "is not a plans object")
    patch = _configuration(data, configuration, str(plans)).get("patch_size")
    if patch is None:
        return None
    if not isinstance(patch, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in patch):
        raise InputError(plans, f"configuration {configuration!r}: patch_size must be positive integers, got {patch}")
    return [int(v) for v in patch]
