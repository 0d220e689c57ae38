"""PDCR: patch-dragsaw contrastive regularisation of hidden features by label content (METHODS.md §4).

A supervised auxiliary loss on encoder feature maps (Li/Liu et al., TMI 2022). Feature vectors are sampled on
a regular grid of input voxels (every ``grid_spacing`` voxels, the same lattice for every chosen stage); each
stands for a patch of the label map around its centre: its receptive-field cube (RF-PDCR) or a series of
windows of several sizes (H-PDCR, one loss per size, averaged). All pairs are within one image.

Per image, with N samples ``i``, features ``f_i``, and ``h_i ∈ [0, 1]^{K+1}`` the label histogram of patch i
(voxel fraction of every class, background included; the descriptor of the paper is its foreground part
``φ_i = h_i[1:]``)::

    d_ij = ½ ‖h_i − h_j‖₁ = ½ (‖φ_i − φ_j‖₁ + |Σ_c (φ_i − φ_j)_c|)  ∈ [0, 1]   (divergence="tv", default)
    d_ij =    ‖φ_i − φ_j‖₁                                             ∈ [0, 2]   (divergence="foreground_l1")
    a_ij = 1 − d_ij                                                    (affinity)
    s_ij = (cos(f_i, f_j) − 1) / τ   = cos/τ − max_j cos/τ  (the row maximum is the diagonal, cos_ii = 1)
    L    = − mean_{i,j} log [ exp(a_ij · s_ij) / Σ_k exp(d_ik · s_ik) ]
         =   mean_i [ logsumexp_k(d_ik · s_ik) − mean_j a_ij · s_ij ]

The sums and means run over **all** N samples, self-pairs included (as in the released 3D code): a self-pair
has ``s_ii = 0``, ``d_ii = 0``, so it adds 0 to the numerator and ``exp(0) = 1`` to the denominator (which keeps
the loss ≥ 0 with ``"tv"``). The shift by the constant ``1/τ`` is the row maximum up to rounding; using the
constant makes it exact and gradient-free. This is the *3D release* form: the numerator (pull) is weighted by
the affinity, the denominator (push) by the divergence. The released 2D code swaps the two weights, which pulls
patches of *different* labels together — not reproduced here (tests/test_pdcr.py shows the difference).

``"tv"`` is the total-variation distance of the two label histograms: with one foreground class it equals
``|φ_i − φ_j|``, the paper's foreground-ratio distance; with several it stays in [0, 1], so ``a_ij ≥ 0``
(full class 1 vs full class 2 gives d = 1, a = 0). ``"foreground_l1"`` is the released 3D descriptor distance
(L1 over foreground fractions, not halved): there that pair has d = 2 and a negative affinity a = −1.

Descriptors come from average pooling of the one-hot label at the sample centres only (``stride =
grid_spacing``). A window is divided by the number of its voxels that lie **inside** the image
(``count_include_pad=False`` semantics; the released code divided by the full cube). Voxels whose label is
outside ``[0, num_classes)`` (an ignore label such as 255 or −1) are excluded from the counts.

Loss = ``layer_weight · mean over layers`` of the per-layer L, plus, in :class:`PDCRLoss` with ``cross_layer``,
``cross_weight ·`` a cross-layer term between two stages projected to a common width (rows from one stage, keys
from the other, each side keeping its own window's descriptor, the same shift 1/τ; symmetrised). Math in
float32 (float64 for float64 input) with autocast disabled.

Example::

    pdcr = PDCRLoss.for_backbone(model, stages=(2, 3), grid_spacing=32)
    skips = model.encode(x)
    logits = model.segment(model.decode(skips))
    loss = dice_ce(logits, y) + pdcr(pdcr.select(skips), y).loss
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PDCRLoss", "PDCROutput", "SampleGrid", "patch_label_fractions", "pdcr_loss", "receptive_field_sizes",
           "sample_grid"]

Size = int | Sequence[int]
Divergence = Literal["tv", "foreground_l1"]


def _per_axis(value: Size, dim: int, name: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * dim
    if len(out) != dim or min(out) < 1:
        raise ValueError(f"{name} must be a positive int or {dim} positive ints, got {value!r}")
    return out


@dataclass(frozen=True)
class SampleGrid:
    """Sample centres in input voxels: along axis ``ax`` at ``offset[ax] + g · spacing[ax]``, ``g < counts[ax]``.

    Samples are ordered row-major over the grid (the order of ``tensor.flatten``).
    """

    offset: tuple[int, ...]
    spacing: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        """N, samples per image."""
        return math.prod(self.counts)


def sample_grid(spatial_shape: Sequence[int], grid_spacing: Size, strides: Sequence[Size],
                generator: torch.Generator | None = None) -> SampleGrid:
    """The regular sampling lattice shared by all chosen stages.

    Args:
        spatial_shape: input (label) spatial size, e.g. ``(D, H, W)``.
        grid_spacing: distance between samples in input voxels (per axis or one int); must be a multiple of
            every stage's stride so each centre is a feature voxel of every stage.
        strides: cumulative down-sampling of each chosen stage (feature voxel ``p`` is centred on input voxel
            ``p · stride``, as for nnU-Net's stride-2 3×3 convolutions with padding 1).
        generator: a CPU ``torch.Generator``: draw the offset uniformly among the lattice-aligned values in
            ``[0, grid_spacing)``; None: the centred offset (the aligned value nearest ``grid_spacing / 2``
            from below), deterministic.

    Raises:
        ValueError: a spacing that is not a multiple of the strides, or fewer than 2 samples per image.
    """
    dim = len(spatial_shape)
    spacing = _per_axis(grid_spacing, dim, "grid_spacing")
    stride_t = [_per_axis(s, dim, "stride") for s in strides]
    offset, counts = [], []
    for ax in range(dim):
        lattice = math.lcm(*(s[ax] for s in stride_t))
        if spacing[ax] % lattice:
            raise ValueError(f"grid_spacing {spacing} must be a multiple of the stage strides (lcm {lattice}) "
                             f"along axis {ax}")
        choices = spacing[ax] // lattice
        pick = int(torch.randint(choices, (1,), generator=generator)) if generator is not None else choices // 2
        offset.append(pick * lattice)
        counts.append(max(0, -(-(spatial_shape[ax] - offset[ax]) // spacing[ax])))
    if math.prod(counts) < 2:
        raise ValueError(f"grid_spacing {spacing} leaves {math.prod(counts)} sample(s) in an input of "
                         f"{tuple(spatial_shape)}; PDCR needs at least 2 — use a smaller grid_spacing")
    return SampleGrid(tuple(offset), spacing, tuple(counts))


def patch_label_fractions(labels: Tensor, num_classes: int, window: Size, grid: SampleGrid,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """Label histogram of the window around every grid centre, by average pooling of the one-hot label.

    The window along an axis covers input voxels ``[c − w//2, c − w//2 + w)`` (centred for odd ``w``),
    clipped to the image; fractions are relative to the voxels inside the image with a label in
    ``[0, num_classes)``.

    Args:
        labels: (B, *spatial) integer label map.
        num_classes: classes including background (label 0).
        window: window side in input voxels (one int or one per axis).
        grid: the sample centres (:func:`sample_grid`).
        dtype: float dtype of the pooling and the result.

    Returns:
        (B, N, num_classes) fractions; rows sum to 1 (0 if a window holds only ignored labels).
    """
    dim = labels.dim() - 1
    w = _per_axis(window, dim, "window")
    index: list[slice] = [slice(None)]
    pads: list[int] = []
    for ax in range(dim):
        size = labels.shape[1 + ax]
        start = grid.offset[ax] - w[ax] // 2
        end = start + (grid.counts[ax] - 1) * grid.spacing[ax] + w[ax]
        index.append(slice(max(start, 0), min(end, size)))
        pads = [max(0, -start), max(0, end - size), *pads]  # F.pad wants the last axis first
    crop = labels[tuple(index)]
    if crop.dtype == torch.uint8 and num_classes > 255:
        crop = crop.to(torch.int16)
    crop = F.pad(crop, pads, value=num_classes)  # outside the image: in no class, not counted
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, *([1] * dim))
    pooled = (crop.unsqueeze(1) == classes).to(dtype)  # one-hot (B, C, *window span)
    pool = F.avg_pool2d if dim == 2 else F.avg_pool3d
    for ax in reversed(range(dim)):  # a box mean is separable: 1-D passes, innermost axis first (fastest)
        kernel, stride = [1] * dim, [1] * dim
        kernel[ax], stride[ax] = w[ax], grid.spacing[ax]
        pooled = pool(pooled, kernel_size=kernel, stride=stride)  # finally (B, C, *counts); 1/|w| cancels below
    inside = pooled.sum(dim=1, keepdim=True)
    fractions = pooled / inside.clamp_min(torch.finfo(pooled.dtype).tiny)
    return fractions.flatten(2).transpose(1, 2)


def receptive_field_sizes(backbone: nn.Module, stages: Sequence[int]) -> list[tuple[int, ...]]:
    """Theoretical receptive-field side (input voxels, per axis) of the chosen encoder stages' outputs.

    Walks the convolutions of a convolutional encoder (``encoder.stem`` then ``encoder.stages``, as in the
    dynamic-network-architectures U-Nets): ``rf += (k − 1) · dilation · jump``, ``jump *= stride``. For
    nnU-Net's 3d_fullres plan this gives 23 and 47 for stages 3 and 4, the released values.

    Raises:
        ValueError: an encoder without conv stages (e.g. SwinUNETR, whose receptive field is global) or whose
            conv strides do not reproduce ``backbone.encoder_strides`` — pass window sizes instead.
    """
    encoder = backbone.encoder
    stage_modules = getattr(encoder, "stages", None)
    name = getattr(backbone, "name", type(backbone).__name__)
    if not isinstance(stage_modules, nn.Module):
        raise ValueError(f"{name}: receptive fields are only derived for convolutional encoders; pass rf_sizes "
                         "or H-PDCR window sizes")
    dim = backbone.dim
    rf, jump = [1] * dim, [1] * dim

    def walk(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                k, s, dl = (_per_axis(v, dim, "conv") for v in (m.kernel_size, m.stride, m.dilation))
                for ax in range(dim):
                    rf[ax] += (k[ax] - 1) * dl[ax] * jump[ax]
                    jump[ax] *= s[ax]

    if isinstance(getattr(encoder, "stem", None), nn.Module):
        walk(encoder.stem)
    sizes = []
    for i, stage in enumerate(stage_modules):
        walk(stage)
        if tuple(jump) != tuple(backbone.encoder_strides[i]):
            raise ValueError(f"{name}: conv strides give down-sampling {tuple(jump)} at stage {i}, expected "
                             f"{tuple(backbone.encoder_strides[i])} (pooling layers?); pass rf_sizes explicitly")
        sizes.append(tuple(rf))
    return [sizes[s] for s in stages]


@dataclass
class PDCROutput:
    """Result of :func:`pdcr_loss` / :class:`PDCRLoss`.

    Attributes:
        loss: 0-dim float32 (float64 for float64 input), already weighted — add it to the segmentation loss.
        terms: detached 0-dim tensors: ``layer{l}`` (unweighted L of chosen layer l), ``cross`` (unweighted
            cross-layer L, if any), ``affinity_cosine`` / ``divergence_cosine`` (mean off-diagonal cosine
            weighted by max(a, 0) and by d, over the layers: should rise / fall during training), ``n_samples``.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def scalars(self, prefix: str = "pdcr_") -> dict[str, float]:
        """Loss and terms as Python floats (one host sync), e.g. for a log row."""
        out = {f"{prefix}loss": float(self.loss.detach())}
        out.update({f"{prefix}{k}": float(v) for k, v in self.terms.items()})
        return out


def _divergence(h_rows: Tensor, h_cols: Tensor, divergence: str) -> Tensor:
    """(B, N, C), (B, M, C) histograms → (B, N, M) divergence."""
    if divergence == "tv":
        return 0.5 * torch.cdist(h_rows, h_cols, p=1)
    return torch.cdist(h_rows[..., 1:], h_cols[..., 1:], p=1)


def _pair_loss(z_rows: Tensor, z_cols: Tensor, h_rows: Tensor, h_cols: Tensor, temperature: float,
               divergence: str) -> tuple[Tensor, Tensor, Tensor]:
    """L for normalised rows/keys (B, N, D)/(B, M, D) and histograms; also returns detached cos and d."""
    cos = z_rows @ z_cols.transpose(1, 2)  # (B, N, M)
    s = (cos - 1.0) / temperature
    d = _divergence(h_rows, h_cols, divergence)
    a = 1.0 - d
    loss = (torch.logsumexp(d * s, dim=2) - (a * s).mean(dim=2)).mean()
    return loss, cos.detach(), d


def _sample_features(feature: Tensor, stride: tuple[int, ...], grid: SampleGrid) -> Tensor:
    """(B, C, *spatial/stride) → (B, N, C) vectors at the grid centres."""
    index = [slice(None), slice(None)]
    index += [slice(o // s, None, g // s) for o, s, g in zip(grid.offset, stride, grid.spacing)]
    return feature[tuple(index)].flatten(2).transpose(1, 2)


def _check_inputs(features: Sequence[Tensor], labels: Tensor, num_classes: int, strides: Sequence[Size],
                  temperature: float, divergence: str) -> tuple[Tensor, list[tuple[int, ...]]]:
    if not features or len(features) != len(strides):
        raise ValueError(f"need one stride per feature map, got {len(features)} maps and {len(strides)} strides")
    if labels.dim() >= 3 and labels.dim() == features[0].dim() and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer label map, got dtype {labels.dtype}")
    dim = labels.dim() - 1
    if dim not in (2, 3):
        raise ValueError(f"labels must be (B, H, W) or (B, D, H, W), got shape {tuple(labels.shape)}")
    stride_t = [_per_axis(s, dim, "stride") for s in strides]
    for layer, (f, s) in enumerate(zip(features, stride_t)):
        want = (labels.shape[0], *(n // k for n, k in zip(labels.shape[1:], s)))
        if f.dim() != dim + 2 or (f.shape[0], *f.shape[2:]) != want or any(n % k for n, k in zip(labels.shape[1:], s)):
            raise ValueError(f"feature {layer} has shape {tuple(f.shape)}; with labels {tuple(labels.shape)} and "
                             f"stride {s} expected (B, C, *spatial) = ({want[0]}, C, {', '.join(map(str, want[1:]))})")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in ("tv", "foreground_l1"):
        raise ValueError(f"divergence must be 'tv' or 'foreground_l1', got {divergence!r}")
    return labels, stride_t


def _layer_windows(n_layers: int, windows: str | Sequence[Size], rf_sizes: Sequence[Size] | None) -> list[list[Size]]:
    if isinstance(windows, str):
        if windows != "rf":
            raise ValueError(f"windows must be 'rf' or a list of window sizes, got {windows!r}")
        if rf_sizes is None or len(rf_sizes) != n_layers:
            raise ValueError(f"windows='rf' needs rf_sizes, one per feature map ({n_layers}), got {rf_sizes!r}")
        return [[w] for w in rf_sizes]
    if len(windows) == 0:
        raise ValueError("windows must not be empty")
    return [list(windows) for _ in range(n_layers)]


def _project(linear: nn.Module, x: Tensor) -> Tensor:
    """``linear`` applied in ``x``'s dtype (float32, or float64 for gradcheck), whatever the parameters' dtype."""
    return F.linear(x, linear.weight.to(x.dtype), None if linear.bias is None else linear.bias.to(x.dtype))


def _pdcr(features: Sequence[Tensor], labels: Tensor, num_classes: int, strides: Sequence[Size],
          windows: str | Sequence[Size], rf_sizes: Sequence[Size] | None, grid_spacing: Size,
          generator: torch.Generator | None, temperature: float, layer_weight: float, divergence: str,
          cross: tuple[int, int, nn.Module, nn.Module, float] | None = None) -> PDCROutput:
    labels, stride_t = _check_inputs(features, labels, num_classes, strides, temperature, divergence)
    layer_windows = _layer_windows(len(features), windows, rf_sizes)
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
    with torch.autocast(device_type=labels.device.type, enabled=False):
        grid = sample_grid(labels.shape[1:], grid_spacing, stride_t, generator)
        cache: dict[tuple[int, ...], Tensor] = {}
        hists: list[list[Tensor]] = []
        for wins in layer_windows:
            keys = [_per_axis(w, labels.dim() - 1, "window") for w in wins]
            for key in keys:
                if key not in cache:
                    cache[key] = patch_label_fractions(labels, num_classes, key, grid, dtype)
            hists.append([cache[key] for key in keys])
        samples = [_sample_features(f.to(dtype), s, grid) for f, s in zip(features, stride_t)]

        terms: dict[str, Tensor] = {}
        layer_losses, aff_cos, div_cos = [], [], []
        off_diag = ~torch.eye(grid.num_samples, dtype=torch.bool, device=labels.device)
        for layer, (x, hs) in enumerate(zip(samples, hists)):
            z = F.normalize(x, dim=2)
            per_window = []
            for h in hs:
                loss, cos, d = _pair_loss(z, z, h, h, temperature, divergence)
                per_window.append(loss)
                a_pos = (1.0 - d).clamp_min(0) * off_diag
                aff_cos.append((a_pos * cos).sum() / a_pos.sum().clamp_min(1e-12))
                div_cos.append((d * off_diag * cos).sum() / (d * off_diag).sum().clamp_min(1e-12))
            layer_losses.append(torch.stack(per_window).mean())
            terms[f"layer{layer}"] = layer_losses[-1].detach()
        total = layer_weight * torch.stack(layer_losses).mean()

        if cross is not None:
            ia, ib, proj_a, proj_b, cross_weight = cross
            za = F.normalize(_project(proj_a, samples[ia]), dim=2)
            zb = F.normalize(_project(proj_b, samples[ib]), dim=2)
            per_window = []
            for ha, hb in zip(hists[ia], hists[ib]):
                ab = _pair_loss(za, zb, ha, hb, temperature, divergence)[0]
                ba = _pair_loss(zb, za, hb, ha, temperature, divergence)[0]
                per_window.append(0.5 * (ab + ba))
            cross_loss = torch.stack(per_window).mean()
            terms["cross"] = cross_loss.detach()
            total = total + cross_weight * cross_loss

        terms["affinity_cosine"] = torch.stack(aff_cos).mean()
        terms["divergence_cosine"] = torch.stack(div_cos).mean()
        terms["n_samples"] = torch.tensor(float(grid.num_samples), device=labels.device)
    return PDCROutput(loss=total, terms=terms)


def pdcr_loss(features: Sequence[Tensor], labels: Tensor, num_classes: int, strides: Sequence[Size], *,
              windows: Literal["rf"] | Sequence[Size] = "rf", rf_sizes: Sequence[Size] | None = None,
              grid_spacing: Size = 32, generator: torch.Generator | None = None, temperature: float = 0.5,
              layer_weight: float = 0.01, divergence: Divergence = "tv") -> PDCROutput:
    """PDCR on the chosen feature maps, without the cross-layer term (see the module docstring).

    Args:
        features: one (B, C_l, *spatial_l) map per chosen stage (2D or 3D), ``spatial_l = spatial / strides[l]``.
        labels: (B, *spatial) (or (B, 1, *spatial)) integer label map at input resolution.
        num_classes: classes including background.
        strides: cumulative down-sampling of each map (int or per axis), e.g. ``backbone.encoder_strides[s]``.
        windows: ``"rf"``: one cube per stage of side ``rf_sizes[l]`` (RF-PDCR); or a list of window sides
            shared by all stages (H-PDCR, e.g. ``[5, 7, 9]``): one loss per side, averaged.
        rf_sizes: per-stage receptive-field side for ``"rf"`` (:func:`receptive_field_sizes`).
        grid_spacing: sample every this many input voxels (a multiple of every stride).
        generator: CPU generator for a random grid offset (same for the whole batch); None: centred grid.
        temperature: τ.
        layer_weight: factor on the mean over layers.
        divergence: ``"tv"`` (default, d ∈ [0, 1]) or ``"foreground_l1"`` (released 3D, d ∈ [0, 2]).

    Returns:
        :class:`PDCROutput`; ``loss = layer_weight · mean_l L_l``.
    """
    return _pdcr(features, labels, num_classes, strides, windows, rf_sizes, grid_spacing, generator,
                 temperature, layer_weight, divergence)


class PDCRLoss(nn.Module):
    """PDCR with stored settings and, optionally, the cross-layer term with its learned 1×1 projections.

    The projections are 1×1(×1) convolutions (no norm, no ReLU — a ReLU would confine cosines to [0, 1]),
    applied as ``nn.Linear`` to the sampled vectors only (identical to convolving then sampling, N× cheaper).
    Add :meth:`parameters` to the optimiser when ``cross_layer`` is set.

    Args:
        num_classes, strides, windows, rf_sizes, grid_spacing, temperature, layer_weight, divergence: as in
            :func:`pdcr_loss`.
        channels: channels of each chosen map (needed for ``cross_layer``).
        stages: encoder stage indices the maps come from (used by :meth:`select`).
        cross_layer: indices (into the chosen maps) of the two maps to contrast with each other, or None.
        cross_width: common projection width.
        cross_weight: factor on the cross-layer term (0.005: the released 0.01 halved).
    """

    def __init__(self, num_classes: int, strides: Sequence[Size], *, channels: Sequence[int] | None = None,
                 stages: Sequence[int] | None = None, windows: Literal["rf"] | Sequence[Size] = "rf",
                 rf_sizes: Sequence[Size] | None = None, grid_spacing: Size = 32, temperature: float = 0.5,
                 layer_weight: float = 0.01, cross_layer: tuple[int, int] | None = None, cross_width: int = 128,
                 cross_weight: float = 0.005, divergence: Divergence = "tv") -> None:
        super().__init__()
        _layer_windows(len(strides), windows, rf_sizes)  # validate early
        self.num_classes, self.strides = num_classes, list(strides)
        self.stages = None if stages is None else list(stages)
        self.windows, self.rf_sizes, self.grid_spacing = windows, rf_sizes, grid_spacing
        self.temperature, self.layer_weight, self.divergence = temperature, layer_weight, divergence
        self.cross_layer, self.cross_weight = cross_layer, cross_weight
        self.projections = nn.ModuleList()
        if cross_layer is not None:
            ia, ib = cross_layer
            if channels is None or len(channels) != len(strides) or ia == ib or not (
                    0 <= ia < len(strides) and 0 <= ib < len(strides)):
                raise ValueError(f"cross_layer {cross_layer} needs two distinct map indices and channels per map, "
                                 f"got channels={channels!r} for {len(strides)} maps")
            self.projections.extend([nn.Linear(channels[ia], cross_width), nn.Linear(channels[ib], cross_width)])

    @classmethod
    def for_backbone(cls, backbone: nn.Module, stages: Sequence[int] = (2, 3), *, num_classes: int | None = None,
                     windows: Literal["rf"] | Sequence[Size] = "rf", cross_layer: bool = False,
                     **kwargs: object) -> PDCRLoss:
        """Settings from a :class:`~volcontrast.nets.base.Backbone`: strides, channels and (for ``"rf"``)
        receptive fields of encoder ``stages`` (default the 3rd and 4th); ``cross_layer=True`` contrasts the
        first two chosen stages. Other keyword arguments go to the constructor."""
        if windows == "rf" and kwargs.get("rf_sizes") is None:
            kwargs["rf_sizes"] = receptive_field_sizes(backbone, stages)
        strides = [backbone.encoder_strides[s] for s in stages]
        return cls(backbone.num_classes if num_classes is None else num_classes, strides,
                   channels=[backbone.encoder_channels[s] for s in stages], stages=stages, windows=windows,
                   cross_layer=(0, 1) if cross_layer else None, **kwargs)  # type: ignore[arg-type]

    def select(self, skips: Sequence[Tensor]) -> list[Tensor]:
        """The chosen maps from all encoder outputs (``backbone.encode(x)``)."""
        if self.stages is None:
            raise ValueError("PDCRLoss was built without stages; pass the chosen maps to forward directly")
        return [skips[s] for s in self.stages]

    def forward(self, features: Sequence[Tensor], labels: Tensor, generator: torch.Generator | None = None
                ) -> PDCROutput:
        """Loss on the chosen maps (B, C_l, *spatial_l) for the (B, *spatial) labels; see :func:`pdcr_loss`."""
        cross = None
        if self.cross_layer is not None:
            cross = (*self.cross_layer, self.projections[0], self.projections[1], self.cross_weight)
        return _pdcr(features, labels, self.num_classes, self.strides, self.windows, self.rf_sizes,
                     self.grid_spacing, generator, self.temperature, self.layer_weight, self.divergence, cross)

    def extra_repr(self) -> str:
        return (f"stages={self.stages}, windows={self.windows!r}, rf_sizes={self.rf_sizes}, grid_spacing="
                f"{self.grid_spacing}, temperature={self.temperature}, layer_weight={self.layer_weight}, "
                f"cross_layer={self.cross_layer}, divergence={self.divergence!r}")
