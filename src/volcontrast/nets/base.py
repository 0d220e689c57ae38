"""The uniform backbone interface the training engine relies on.

Every backbone is an encoder–decoder segmentation network whose state dict is split by
prefix into four groups:

``encoder.*``
    everything that computes the encoder stages (what pretraining transfers);
``decoder.*``
    the decoder stages (up-sampling + merge convolutions);
``seg_head.*``
    the 1×1(×1) segmentation output layers, one per decoder stage (all built always,
    so a deep-supervision model and a plain one share a state dict); the only group
    whose shapes depend on ``num_classes``;
``post_decoder_blocks.*``
    optional modules applied after each decoder stage (identity by default, no
    parameters); e.g. UAFS blocks. Absent from checkpoints written before they were set,
    so such checkpoints load with ``strict=False`` restricted to these keys
    (:func:`load_backbone_state`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."
SEG_HEAD_PREFIX = "seg_head."
POST_DECODER_PREFIX = "post_decoder_blocks."


class Backbone(nn.Module, abc.ABC):
    """Encoder–decoder segmentation network with uniform multi-scale feature access.

    Subclasses set the attributes below and implement :meth:`encode` and :meth:`decode`.

    Attributes:
        dim: number of spatial dimensions (2 or 3).
        in_channels: input channels C_in.
        num_classes: output channels of the segmentation logits.
        deep_supervision: if True, :meth:`segment` returns one logit map per decoder stage.
        encoder_channels: channels of each encoder stage output, shallow → deep.
        encoder_strides: cumulative down-sampling factor (per spatial axis) of each encoder
            stage output relative to the input, shallow → deep; e.g. ``(1, 1, 1), (2, 2, 2), ...``.
        decoder_channels: channels of each decoder stage output, deep → shallow.
        decoder_strides: cumulative down-sampling factor of each decoder stage output,
            deep → shallow; the last is all ones (full resolution).
        min_input_multiple: every input spatial size must be a multiple of this, per axis.
        encoder, decoder, seg_head, post_decoder_blocks: the four parameter groups.
    """

    dim: int
    in_channels: int
    num_classes: int
    deep_supervision: bool
    encoder_channels: list[int]
    encoder_strides: list[tuple[int, ...]]
    decoder_channels: list[int]
    decoder_strides: list[tuple[int, ...]]
    min_input_multiple: tuple[int, ...]
    encoder: nn.Module
    decoder: nn.Module
    seg_head: nn.ModuleList
    post_decoder_blocks: nn.ModuleList

    def __init__(self, name: str, preset: str | None, resolved_kwargs: dict[str, Any]):
        super().__init__()
        self.name = name
        self.preset = preset
        self._resolved_kwargs = resolved_kwargs

    # ------------------------------------------------------------------ interface
    @abc.abstractmethod
    def encode(self, x: Tensor) -> list[Tensor]:
        """Encoder stage outputs, shallow → deep.

        Args:
            x: (B, C_in, *spatial) input; spatial sizes multiples of :attr:`min_input_multiple`.

        Returns:
            ``len(encoder_channels)`` tensors; tensor i is
            (B, encoder_channels[i], *(spatial // encoder_strides[i])).
        """

    @abc.abstractmethod
    def decode(self, skips: Sequence[Tensor]) -> list[Tensor]:
        """Decoder stage outputs, deep → shallow (last = full resolution).

        Each stage output passes through ``post_decoder_blocks[i]`` before it is returned
        and before it feeds the next stage.

        Args:
            skips: the list returned by :meth:`encode`.

        Returns:
            ``len(decoder_channels)`` tensors; tensor i is
            (B, decoder_channels[i], *(spatial // decoder_strides[i])).
        """

    def segment(self, decoder_features: Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Segmentation logits from decoder features (the list returned by :meth:`decode`).

        Returns:
            (B, num_classes, *spatial) logits at full resolution; with deep supervision a list
            of logits, one per decoder stage, full resolution first (then ½, ¼, ...).
        """
        if len(decoder_features) != len(self.seg_head):
            raise ValueError(f"expected {len(self.seg_head)} decoder features, got {len(decoder_features)}")
        if not self.deep_supervision:
            return self.seg_head[-1](decoder_features[-1])
        return [head(f) for head, f in zip(self.seg_head, decoder_features)][::-1]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """(B, C_in, *spatial) → logits, ``segment(decode(encode(x)))``."""
        return self.segment(self.decode(self.encode(x)))

    # ------------------------------------------------------------------ helpers
    def arch_config(self) -> dict[str, Any]:
        """JSON-serialisable architecture; ``build_backbone(**arch_config())`` rebuilds it exactly."""
        import copy

        return {
            "name": self.name,
            "dim": self.dim,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "preset": self.preset,
            "deep_supervision": self.deep_supervision,
            **copy.deepcopy(self._resolved_kwargs),
        }

    def set_post_decoder_blocks(self, blocks: Sequence[nn.Module] | None) -> None:
        """Install one module per decoder stage (applied to that stage's output), or reset to identity.

        Module i receives and must return a (B, decoder_channels[i], *spatial_i) tensor.
        """
        n = len(self.decoder_channels)
        if blocks is None:
            blocks = [nn.Identity() for _ in range(n)]
        if len(blocks) != n:
            raise ValueError(f"need one post-decoder block per decoder stage ({n}), got {len(blocks)}")
        self.post_decoder_blocks = nn.ModuleList(blocks)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by group (``encoder``, ``decoder``, ``seg_head``, ``post_decoder_blocks``),
        e.g. for per-group learning rates or freezing the encoder."""
        return {
            "encoder": list(self.encoder.parameters()),
            "decoder": list(self.decoder.parameters()),
            "seg_head": list(self.seg_head.parameters()),
            "post_decoder_blocks": list(self.post_decoder_blocks.parameters()),
        }

    def input_size_problems(self, spatial_shape: Sequence[int]) -> list[str]:
        """Every way ``spatial_shape`` does not fit the network (empty when it fits): the number of axes, each
        axis that is not a multiple of the total stride (with the nearest sizes that are), and, in training
        mode with instance norm, a one-voxel bottleneck."""
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != self.dim:
            return [f"needs {self.dim} spatial axes, got {len(shape)}"]
        problems = []
        for axis, (size, stride) in enumerate(zip(shape, self.min_input_multiple)):
            if size % stride or size <= 0:
                lower, upper = size // stride * stride, (size // stride + 1) * stride
                use = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                problems.append(f"axis {axis}: {size} is not a multiple of the total stride {stride} (use {use})")
        if self.training and self._has_instance_norm():
            bottleneck = math.prod(max(s // f, 1) for s, f in zip(shape, self.encoder_strides[-1]))
            if bottleneck <= 1:
                problems.append(
                    f"the bottleneck (down-sampling {self.encoder_strides[-1]}) would be 1 voxel, which instance "
                    f"norm cannot train on (1-voxel bottleneck): make at least one axis "
                    f"{2 * max(self.min_input_multiple)} or larger")
        return problems

    def check_input_size(self, spatial_shape: Sequence[int]) -> None:
        """Raise ValueError listing every problem of :meth:`input_size_problems` in one message."""
        problems = self.input_size_problems(spatial_shape)
        if problems:
            raise ValueError(
                f"{self.name}: input spatial shape {tuple(int(s) for s in spatial_shape)} does not fit the network "
                f"(each axis a multiple of {self.min_input_multiple}): " + "; ".join(problems)
            )

    def _has_instance_norm(self) -> bool:
        if not hasattr(self, "_instance_norm"):
            self._instance_norm = any(isinstance(m, _InstanceNorm) for m in self.encoder.modules())
        return self._instance_norm


def cumulative_strides(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per-stage strides → cumulative down-sampling factor after each stage."""
    out: list[tuple[int, ...]] = []
    acc: tuple[int, ...] | None = None
    for s in strides:
        acc = tuple(s) if acc is None else tuple(a * b for a, b in zip(acc, s))
        out.append(acc)
    return out


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    params = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


# ---------------------------------------------------------------------- loading
def alias_map(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """Key → canonical key (the first key sharing its storage, shape and strides).

    dynamic-network-architectures registers every conv twice (``convs.0.conv`` and
    ``convs.0.all_modules.0``), so its state dicts hold aliased tensors; safetensors keeps one name each.
    """
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for key, value in state_dict.items():
        if value.numel() == 0:
            out[key] = key
            continue
        ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        out[key] = first.setdefault(ident, key)
    return out


def deduplicated_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without aliased duplicate keys — what ``safetensors.torch.save_file`` accepts.

    Loads back with :func:`load_backbone_state` / :func:`load_encoder_state` (both alias-aware).
    """
    state = model.state_dict()
    return {k: v for k, v in state.items() if alias_map(state)[k] == k}


@dataclass
class EncoderLoadReport:
    """What :func:`load_encoder_state` did.

    Attributes:
        loaded: ``encoder.*`` keys copied into the model.
        missing: model ``encoder.*`` keys absent from the source.
        unexpected: source ``encoder.*`` keys the model does not have.
        mismatched: ``(key, source_shape, model_shape)`` for keys present in both with different shapes.
        ignored: number of source keys outside ``encoder.*`` (decoder, heads, ...), not loaded.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: int = 0

    @property
    def ok(self) -> bool:
        """True when every encoder key matched in name and shape."""
        return bool(self.loaded) and not (self.missing or self.unexpected or self.mismatched)

    def summary(self, max_keys: int = 8) -> str:
        """One line: counts plus the first offending keys of each kind."""

        def head(keys: Sequence[Any]) -> str:
            shown = ", ".join(str(k) for k in keys[:max_keys])
            return shown + (f", ... (+{len(keys) - max_keys})" if len(keys) > max_keys else "")

        parts = [f"loaded {len(self.loaded)} encoder tensors", f"ignored {self.ignored} non-encoder keys"]
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {head(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {head(self.unexpected)}")
        if self.mismatched:
            mm = [f"{k} {tuple(a)}≠{tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"shape-mismatched {len(mm)}: {head(mm)}")
        return "; ".join(parts)


def load_encoder_state(
    model: Backbone, state_dict: Mapping[str, Tensor], *, source_prefix: str = "", strict: bool = True
) -> EncoderLoadReport:
    """Copy the ``encoder.*`` tensors of ``state_dict`` into ``model``; leave everything else alone.

    Args:
        model: the backbone to initialise (its decoder / heads stay as they are).
        state_dict: source tensors, e.g. a pretraining run's ``model.safetensors``.
        source_prefix: prefix in front of ``encoder.`` in the source (e.g. ``"backbone."``
            when a method wrapper stored the backbone under that name). A uniform
            ``module.`` prefix (DDP) is stripped automatically.
        strict: if True (default), raise when any encoder key is missing, unexpected or
            shape-mismatched; if False, load the matching keys and report the rest.

    Returns:
        an :class:`EncoderLoadReport`.

    Raises:
        ValueError: listing the offending keys, when nothing matches (always) or when
            anything does not match (``strict=True``); the model is then left unchanged.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    full_prefix = source_prefix + ENCODER_PREFIX
    source = {k[len(full_prefix):]: v for k, v in state_dict.items() if k.startswith(full_prefix)}
    target = model.encoder.state_dict()
    report = EncoderLoadReport(ignored=len(state_dict) - len(source))
    to_load: dict[str, Tensor] = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(ENCODER_PREFIX + key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((ENCODER_PREFIX + key, tuple(value.shape), tuple(target[key].shape)))
        else:
            to_load[key] = value
    aliases = alias_map(target)
    present = {aliases[k] for k in source if k in target}  # alias groups the source covers
    report.missing = [ENCODER_PREFIX + k for k in target if k not in source and aliases[k] not in present]
    report.loaded = [ENCODER_PREFIX + k for k in to_load]
    if not to_load:
        raise ValueError(f"no encoder weights match (looked for keys starting with {full_prefix!r}): "
                         + report.summary())
    if strict and not report.ok:
        raise ValueError("encoder weights do not match this architecture: " + report.summary())
    with torch.no_grad():
        for key, value in to_load.items():
            target[key].copy_(value)
    return report


def load_backbone_state(model: Backbone, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load a full backbone state dict strictly, except that ``post_decoder_blocks.*`` keys may be
    absent (checkpoints written before those blocks were added).

    Returns:
        the model's ``post_decoder_blocks.*`` keys that were missing and kept their values.

    Raises:
        RuntimeError: any other missing / unexpected / mismatched key.
    """
    aliases = alias_map(model.state_dict())
    result = model.load_state_dict(dict(state_dict), strict=False)
    loaded = {aliases[k] for k in state_dict if k in aliases}
    missing = [k for k in result.missing_keys if not k.startswith(POST_DECODER_PREFIX) and aliases[k] not in loaded]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"state dict does not match {model.name}: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return [k for k in result.missing_keys if k.startswith(POST_DECODER_PREFIX)]
