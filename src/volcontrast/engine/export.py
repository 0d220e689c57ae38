"""``volcontrast export``: a run's network as files nnU-Net v2 and MONAI load without volcontrast.

``--to nnunet``
    ``{"network_weights": state_dict}`` in the layout of the network nnU-Net v2 builds from a plans file
    (dynamic-network-architectures, every key except the ``.seg_layers.`` ones, including the aliased
    ``decoder.encoder.*`` and ``all_modules`` keys), CPU tensors only, so ``torch.load(weights_only=True)``
    reads it and ``nnUNetv2_train ... -pretrained_weights FILE.pth`` accepts it. The run's architecture is
    checked against the plans' configuration key by key first.
``--to monai``
    a MONAI bundle folder: ``configs/metadata.json``, ``configs/inference.json`` (``network_def`` builds the
    upstream network: MONAI ``SwinUNETR`` or dynamic-network-architectures' ``PlainConvUNet`` /
    ``ResidualEncoderUNet``; preprocessing repeats the run's resampling and intensity normalisation with MONAI
    transforms; sliding-window inference; results saved in each scan's geometry) and ``models/model.pt`` (a
    plain state dict of that network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from volcontrast import __version__
from volcontrast.engine.run import MODEL_FILE, MODEL_JSON, load_model_json, load_weights
from volcontrast.errors import InputError
from volcontrast.nets import build_backbone
from volcontrast.nets.base import ENCODER_PREFIX, SEG_HEAD_PREFIX, Backbone, alias_map
from volcontrast.utils.files import atomic_save, atomic_write_json

NNUNET_SEG_KEY = ".seg_layers."
CNN_CLASSES = {
    "plain_unet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "resenc_unet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}


def _shape(value: Tensor | None) -> str:
    return "absent" if value is None else str(tuple(int(s) for s in value.shape))


def load_run_backbone(run_dir: str | os.PathLike) -> tuple[Backbone, dict[str, Any]]:
    """The backbone of a pretraining or segmentation run folder (CPU, eval mode) and its ``model.json``.

    The encoder and decoder must be complete in the run's weights; a missing segmentation head (some
    pretraining wrappers keep none) keeps its fresh initialisation.

    Raises:
        InputError: not a run folder, an unknown architecture, or weights that do not fit it.
    """
    run = Path(run_dir)
    if not (run / MODEL_JSON).is_file():
        raise InputError(run, "not a volcontrast run folder (no model.json)")
    meta = load_model_json(run)
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(arch, dict):
        raise InputError(run / MODEL_JSON, "has no 'architecture'")
    try:
        net = build_backbone(**{**arch, "deep_supervision": False})
    except (InputError, TypeError, ValueError) as exc:
        raise InputError(run / MODEL_JSON, f"invalid architecture: {getattr(exc, 'problem', exc)}") from None
    if meta.get("uafs"):
        from volcontrast.nets.uafs import add_uafs

        add_uafs(net)
    weights = load_weights(run)
    prefix = str(meta.get("backbone_prefix", "")) if meta.get("kind") == "pretrain" else ""
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    target = net.state_dict()
    aliases = alias_map(target)
    covered = {aliases[k] for k in state if k in target}
    missing = [k for k in target if aliases[k] not in covered and not k.startswith(SEG_HEAD_PREFIX)]
    mismatched = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or mismatched:
        raise InputError(run / MODEL_FILE, f"weights do not fit the architecture in {MODEL_JSON}: missing "
                         f"{missing[:3]}, shape-mismatched {mismatched[:3]}")
    net.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    return net.eval(), meta


# ------------------------------------------------------------------------------------------------ nnU-Net


def _upstream_state_dict(net: Backbone) -> dict[str, Tensor]:
    from volcontrast.nets.unet import to_nnunet_state_dict

    try:
        return to_nnunet_state_dict(net)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InputError("--to", str(exc)) from None


def nnunet_weights(net: Backbone, plans: str | os.PathLike, configuration: str = "3d_fullres", *,
                   run_name: str = "the run") -> dict[str, Tensor]:
    """The non-seg tensors of ``net`` in the layout of the network nnU-Net builds from ``plans``.

    Raises:
        InputError: naming the plans file: not a CNN backbone, or the first key (in the plans network's order)
            whose presence or shape differs, with both shapes.
    """
    from volcontrast.nets.plans import backbone_from_nnunet_plans

    if net.name not in CNN_CLASSES:
        raise InputError("--to", f"nnU-Net builds plain_unet/resenc_unet networks; {run_name} is a {net.name} "
                         "(export it with --to monai)")
    expected = backbone_from_nnunet_plans(plans, configuration, in_channels=net.in_channels,
                                          num_classes=net.num_classes)
    want = {k: v for k, v in _upstream_state_dict(expected).items() if NNUNET_SEG_KEY not in k}
    ours = {k: v for k, v in _upstream_state_dict(net).items() if NNUNET_SEG_KEY not in k}
    order = list(want) + [k for k in ours if k not in want]
    for key in order:
        a, b = ours.get(key), want.get(key)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            raise InputError(plans, f"configuration {configuration!r} does not match {run_name}: first mismatching "
                             f"key {key}: run {_shape(a)}, plans {_shape(b)}")
    return {k: ours[k].detach().cpu() for k in want}


def _check_dataset_channels(net: Backbone, plans: str | os.PathLike) -> None:
    """nnU-Net keeps the dataset's ``dataset.json`` next to its plans (``nnUNet_preprocessed/DatasetXXX/``); its
    channel count must be the run's, or nnU-Net refuses the first convolution."""
    path = Path(plans).parent / "dataset.json"
    if not path.is_file():
        return
    try:
        channels = json.loads(path.read_text(encoding="utf-8")).get("channel_names") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    if channels and len(channels) != net.in_channels:
        names = ", ".join(map(str, channels.values()))
        raise InputError(path, f"the dataset has {len(channels)} input channel(s) ({names}) but the run's network "
                         f"takes {net.in_channels}; nnU-Net would refuse its first convolution")


def export_nnunet(run_dir: str | os.PathLike, plans: str | os.PathLike, out: str | os.PathLike,
                  configuration: str = "3d_fullres") -> Path:
    """Write ``{"network_weights": ...}`` for ``nnUNetv2_train ... -pretrained_weights out``; returns ``out``."""
    net, _ = load_run_backbone(run_dir)
    _check_dataset_channels(net, plans)
    weights = nnunet_weights(net, plans, configuration, run_name=f"run {run_dir}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda tmp: torch.save({"network_weights": weights}, tmp))
    return path


# -------------------------------------------------------------------------------------------------- MONAI


def monai_network_def(net: Backbone) -> dict[str, Any]:
    """The bundle's ``network_def``: the upstream class and keyword arguments of ``net`` (no deep supervision)."""
    arch = net.arch_config()
    kwargs = {k: v for k, v in arch.items()
              if k not in ("name", "dim", "in_channels", "num_classes", "preset", "deep_supervision")}
    if net.name == "swin_unetr":
        return {"_target_": "monai.networks.nets.SwinUNETR", "in_channels": net.in_channels,
                "out_channels": net.num_classes, "spatial_dims": net.dim, **kwargs}
    ops = {k: (None if v is None else f"${v}") for k, v in kwargs.items() if k in ("norm_op", "dropout_op", "nonlin")}
    return {"_target_": CNN_CLASSES[net.name], "input_channels": net.in_channels, "num_classes": net.num_classes,
            "deep_supervision": False, "conv_op": f"$torch.nn.Conv{net.dim}d", **kwargs, **ops}


def monai_state_dict(net: Backbone) -> dict[str, Tensor]:
    """``net``'s tensors in the layout of the network ``monai_network_def(net)`` builds."""
    if net.name == "swin_unetr":
        from volcontrast.nets.swin import to_monai_state_dict

        try:
            state = to_monai_state_dict(net)  # type: ignore[arg-type]
        except ValueError as exc:
            raise InputError("--to", str(exc)) from None
    else:
        state = _upstream_state_dict(net)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# Multi-channel bundles normalise each channel as ``prepare`` does (data/preprocess.py): a CT channel is clipped to
# its own window, then (x - mean) / std; any other channel is z-scored over the case's body mask. The body mask is
# channel 0's: for CT, voxels above the HU threshold, largest face-connected component, holes filled (as
# ``body_mask``); an MR channel 0 (an Otsu mask in ``prepare``) gives the whole scan, as a single-channel MR bundle.
# Plain numpy/scipy expressions on the loaded array; the result keeps the MetaTensor's metadata so that ``Invertd``
# still maps predictions back to the scan.
BODY_MASK_EXPR = ("$lambda a: ndimage.binary_fill_holes((lambda lab, n: lab == 1 + numpy.argmax(numpy.bincount("
                  "lab.ravel())[1:]) if n else numpy.ones(a.shape, bool))(*ndimage.label(a > @body_threshold))) "
                  "if @body_from_ct else numpy.ones(a.shape, bool)")
NORMALISE_CHANNEL_EXPR = ("$lambda a, c, body: (numpy.clip(a, c['clip_low'], c['clip_high']) - c['mean']) / c['std'] "
                          "if c['scheme'] == 'ct' else (a - a[body].mean()) / max(float(a[body].std()), 1e-8)")
NORMALISE_EXPR = ("$lambda x: (lambda arr: monai.data.MetaTensor(torch.as_tensor(numpy.stack([@normalise_channel("
                  "a, c, body) for body in [@body_mask(arr[0])] for a, c in zip(arr, @channel_normalisation)]).astype("
                  "numpy.float32)), meta=x.meta, applied_operations=x.applied_operations))(numpy.asarray("
                  "x.as_tensor().detach().cpu(), dtype=numpy.float32))")


def _channel_normalisation(preprocessing: dict[str, Any], channels: int) -> list[dict[str, Any]] | None:
    """Per-channel schemes of a multi-channel cache (``resolved['channel_modalities']``), else None."""
    modalities = preprocessing.get("channel_modalities")
    if not modalities or len(modalities) < 2:
        return None
    if len(modalities) != channels:
        raise InputError("--to", f"the run's preprocessing has {len(modalities)} channel(s) but its network takes "
                                 f"{channels}")
    stats = preprocessing.get("channel_ct_stats") or [None] * len(modalities)
    out: list[dict[str, Any]] = []
    for modality, st in zip(modalities, stats):
        if modality == "ct" and st:
            out.append({"scheme": "ct", **{k: float(st[k]) for k in ("clip_low", "clip_high", "mean", "std")}})
        else:
            out.append({"scheme": "zscore-body"})
    return out


def _intensity_transform(preprocessing: dict[str, Any] | None) -> dict[str, Any] | None:
    if not preprocessing:
        return None
    if preprocessing.get("channel_modalities") and len(preprocessing["channel_modalities"]) > 1:
        return {"_target_": "Lambdad", "keys": "image", "func": "@normalise_image"}
    stats = preprocessing.get("ct_stats")
    if preprocessing.get("modality") == "ct" and stats:
        lo, hi, mean, std = (float(stats[k]) for k in ("clip_low", "clip_high", "mean", "std"))
        # clip to [lo, hi], then (x - mean) / std: one linear map of the clipped range
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
                "b_min": (lo - mean) / std, "b_max": (hi - mean) / std, "clip": True}
    return {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True}


def monai_inference_config(net: Backbone, meta: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json`` of the bundle (MONAI model-zoo layout; runs without pytorch-ignite)."""
    preprocessing = meta.get("preprocessing") or {}
    patch = [int(v) for v in (meta.get("patch_size") or meta.get("crop_size") or [96] * net.dim)][:net.dim]
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    ]
    if preprocessing.get("spacing"):
        transforms.append({"_target_": "Spacingd", "keys": "image",
                           "pixdim": [float(s) for s in preprocessing["spacing"]], "mode": "bilinear"})
    intensity = _intensity_transform(preprocessing)
    if intensity:
        transforms.append(intensity)
    transforms.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    if net.dim == 3:
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": patch, "sw_batch_size": 4, "overlap": 0.5,
                   "mode": "gaussian", "sigma_scale": 0.125, "padding_mode": "constant", "cval": 0.0}
    else:  # a 2D network segments the volume slice by slice (axial slices: spatial axis 2 of X, Y, Z)
        inferer = {"_target_": "SliceInferer", "roi_size": patch, "spatial_dim": 2, "sw_batch_size": 4,
                   "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125, "padding_mode": "constant"}
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": monai_network_def(net),
        "network": "$@network_def.to(@device).eval()",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$torch.uint8", "resample": False, "separate_folder": False},
        ]},
        "predict": ("$torch.no_grad()(lambda batch: [@postprocessing(item) for item in monai.data.decollate_batch("
                    "{**batch, 'pred': @inferer(batch['image'].to(@device), @network)})])"),
        "initialize": ["@load_weights"],
        "run": ["$[@predict(batch) for batch in @dataloader]"],
    }
    channels = _channel_normalisation(preprocessing, net.in_channels)
    if channels is not None:
        settings = preprocessing.get("settings") or {}
        config["imports"] += ["$import re", "$import numpy", "$from scipy import ndimage"]
        # one case = the files <case>_0000.nii.gz, <case>_0001.nii.gz, ... (nnU-Net naming), stacked as channels
        config["datalist"] = (f"$[[re.sub(r'_0000(?=\\.nii)', '_%04d' % c, p) for c in range({net.in_channels})] "
                              "for p in sorted(glob.glob(os.path.join(@dataset_dir, '*_0000.nii*')))]")
        config["body_from_ct"] = preprocessing.get("modality") == "ct"
        config["body_threshold"] = float(settings.get("ct_body_threshold", -500.0))
        config["channel_normalisation"] = channels
        config["body_mask"] = BODY_MASK_EXPR
        config["normalise_channel"] = NORMALISE_CHANNEL_EXPR
        config["normalise_image"] = NORMALISE_EXPR
    return config


def monai_metadata(net: Backbone, meta: dict[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: version, inputs/outputs, labels and where the weights came from."""
    labels = meta.get("label_names") or {}
    channels = meta.get("channel_names") or {}
    spatial = ["x", "y", "z"][: net.dim] if net.dim == 3 else ["x", "y"]
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by volcontrast {__version__}"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": _version("numpy"),
        "required_packages_version": ({"dynamic-network-architectures": _version("dynamic_network_architectures")}
                                      if net.name in CNN_CLASSES else {}),
        "name": f"volcontrast {meta.get('kind', 'run')} ({net.name})",
        "task": "segmentation" if meta.get("kind") == "segmentation" else "pretrained encoder (segmentation net)",
        "description": f"{net.name} exported by volcontrast; method {meta.get('method', meta.get('init', '?'))}",
        "authors": "volcontrast",
        "copyright": "see the source run",
        "volcontrast": {k: meta.get(k) for k in ("kind", "method", "init", "dim", "preprocessing") if k in meta},
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "num_channels": net.in_channels,
                "spatial_shape": [int(v) for v in (meta.get("patch_size") or meta.get("crop_size") or [])],
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(k): v for k, v in channels.items()}}},
            "outputs": {"pred": {
                "type": "probabilities", "format": "segmentation", "num_channels": net.num_classes,
                "spatial_shape": spatial, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {str(k): v for k, v in labels.items()}}},
        },
    }


def _version(module: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export_monai(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a MONAI bundle of the run into ``out_dir`` (created; existing bundle files are replaced)."""
    net, meta = load_run_backbone(run_dir)
    if any(not isinstance(m, torch.nn.Identity) for m in net.post_decoder_blocks):
        raise InputError("--to", "the run has UAFS blocks after the decoder stages; MONAI/nnU-Net networks have "
                         "none (fine-tune without --uafs to export)")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder")
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    state = monai_state_dict(net)
    atomic_save(root / "models" / "model.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_json(root / "configs" / "inference.json", monai_inference_config(net, meta))
    atomic_write_json(root / "configs" / "metadata.json", monai_metadata(net, meta))
    return root


def read_bundle_network_def(bundle: str | os.PathLike) -> dict[str, Any]:
    """``network_def`` of a bundle's ``configs/inference.json`` (plain JSON, nothing evaluated)."""
    path = Path(bundle) / "configs" / "inference.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read the bundle config: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("network_def"), dict):
        raise InputError(path, "has no 'network_def' object")
    return config["network_def"]


__all__ = ["ENCODER_PREFIX", "export_monai", "export_nnunet", "load_run_backbone", "monai_inference_config",
           "monai_network_def", "monai_state_dict", "nnunet_weights", "read_bundle_network_def"]
