"""Sliding-window inference: softmax probabilities of a segmentation network over a whole (cropped) volume.

Windows of ``patch_size`` voxels are cut with the given overlap, run through the network in batches and
blended with a Gaussian importance map (MONAI ``sliding_window_inference(mode="gaussian")``, σ = 1/8 of
the window, as nnU-Net does). Logits are blended, then one softmax gives the probabilities.

A 3D model sees (1, C, X, Y, Z) windows; a 2D model (``model.dim == 2``) sees the volume as a stack of
axial slices along Z and its (X, Y) windows are batched across slices.

The network is anything callable on a (B, C, *window) tensor that returns (B, K, *window) logits (or, for
deep supervision, a list whose first element is the full-resolution logits). A
:class:`~volcontrast.nets.Backbone` works as it is; other callables may set ``dim`` and
``min_input_multiple`` attributes (defaults: ``len(patch_size)`` axes, multiple 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

SegmentationNet = Callable[[Tensor], "Tensor | Sequence[Tensor]"]  # (B, C, *window) -> (B, K, *window) logits


def _model_device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def window_shape(model: Any, patch_size: Sequence[int]) -> tuple[int, ...]:
    """The window the network runs on: ``patch_size`` (its first ``model.dim`` axes) rounded up per axis to
    ``model.min_input_multiple``."""
    dim = int(getattr(model, "dim", len(patch_size)))
    if len(patch_size) < dim:
        raise ValueError(f"patch_size {tuple(patch_size)} has fewer than the model's {dim} spatial axes")
    multiple = tuple(getattr(model, "min_input_multiple", None) or (1,) * dim)
    return tuple(int(math.ceil(int(p) / int(m)) * int(m)) for p, m in zip(patch_size[:dim], multiple))


def _full_resolution_logits(model: SegmentationNet) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        out = model(x)
        if isinstance(out, (list, tuple)):  # deep supervision: full resolution first
            out = out[0]
        return out.float()

    return forward


def _blended_logits(
    net: Callable[[Tensor], Tensor], batch: Tensor, window: tuple[int, ...], overlap: float, batch_size: int,
    device: torch.device,
) -> Tensor:
    """Gaussian-blended logits (B, K, *spatial) of ``batch`` (B, C, *spatial), padded up to ``window``."""
    spatial = tuple(batch.shape[2:])
    pad: list[int] = []
    for size, win in zip(reversed(spatial), reversed(window)):  # F.pad order: last axis first
        pad += [0, max(0, win - size)]
    if any(pad):  # images smaller than the window: pad with 0 (the normalised mean), as nnU-Net does
        batch = torch.nn.functional.pad(batch, pad, mode="constant", value=0.0)
    out = sliding_window_inference(
        batch, roi_size=window, sw_batch_size=batch_size, predictor=net, overlap=overlap, mode="gaussian",
        sigma_scale=0.125, padding_mode="constant", cval=0.0, sw_device=device, device=device,
    )
    out = torch.as_tensor(out)  # plain tensor, not a MetaTensor
    return out[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def sliding_window_probabilities(
    model: SegmentationNet,
    image: Tensor | np.ndarray,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    amp: bool | str = "auto",
) -> Tensor:
    """Softmax probabilities of ``model`` over a whole preprocessed image.

    Args:
        model: a :class:`~volcontrast.nets.Backbone` (or any network callable, see the module docstring).
            It is switched to eval mode for the call and restored afterwards.
        image: (C, X, Y, Z) normalised image (e.g. :attr:`PreparedCase.image`), any size: axes smaller than
            the window are padded with 0 and cropped back.
        patch_size: window size in voxels, (X, Y, Z) for a 3D model, (X, Y) (or (X, Y, Z), Z ignored) for a
            2D one; rounded up to ``model.min_input_multiple``.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        batch_size: windows per forward pass.
        device: where the network runs and the windows are blended (default: the model's device).
        amp: bf16 autocast; ``"auto"`` = on CUDA only. Never used on CPU.

    Returns:
        (K, X, Y, Z) float32 probabilities on the CPU, summing to 1 over K at every voxel.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if isinstance(image, np.ndarray):
        image = np.asarray(image, dtype=np.float32)
        x = torch.from_numpy(image if image.flags.writeable else image.copy())  # memory maps are read-only
    else:
        x = image.float()
    if x.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {tuple(x.shape)}")
    dev = torch.device(device) if device is not None else _model_device(model)
    dim = int(getattr(model, "dim", len(patch_size)))
    window = window_shape(model, patch_size)
    use_amp = dev.type == "cuda" and (amp is True or amp == "auto")
    net = _full_resolution_logits(model)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    try:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
        with torch.inference_mode(), autocast:
            x = x.to(dev)
            if dim == 3:
                logits = _blended_logits(net, x[None], window, overlap, batch_size, dev)[0]  # (K, X, Y, Z)
            elif dim == 2:
                slices = x.permute(3, 0, 1, 2)  # (Z, C, X, Y): axial slices as a batch
                logits = _blended_logits(net, slices, window, overlap, batch_size, dev).permute(1, 2, 3, 0)
            else:
                raise ValueError(f"model.dim must be 2 or 3, got {dim}")
            probs = torch.softmax(logits.float(), dim=0)
    finally:
        if was_training:
            model.train()
    return probs.cpu().contiguous()


def predict_labels(
    model: SegmentationNet,
    image: Tensor | np.ndarray,
    patch_size: Sequence[int],
    **kwargs: Any,
) -> np.ndarray:
    """Argmax of :func:`sliding_window_probabilities` (same arguments): (X, Y, Z) uint8 class indices."""
    probs = sliding_window_probabilities(model, image, patch_size, **kwargs)
    return probabilities_to_labels(probs)


def probabilities_to_labels(probs: Tensor | np.ndarray) -> np.ndarray:
    """(K, X, Y, Z) probabilities -> (X, Y, Z) class indices (uint8, or uint16 beyond 255 classes)."""
    probs = torch.as_tensor(probs)
    dtype = np.uint8 if probs.shape[0] <= 256 else np.uint16
    return probs.argmax(dim=0).numpy().astype(dtype)
