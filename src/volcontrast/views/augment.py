"""Device side of the view pipeline: batched spatial + intensity augmentation with recorded transforms.

Every view is resampled from its box with one ``grid_sample`` call for the whole batch. The spatial transform
of view ``n`` is recorded as ``voxel_to_box[n]``, a ``(dim+1, dim+1)`` affine from the view's voxel index to
the box's voxel index (flip, then isotropic scale, then rotation, about the box centre), so it can be composed
with the box position into "view voxel -> cached voxel -> world mm" and inverted (Spade warps features back
with it). An optional smooth elastic displacement (the PCL paper's 2D augmentation) is added on top and
flagged in ``params["elastic"]``; such views are not exactly invertible by the affine alone.

All randomness comes from an explicit ``torch.Generator`` (seeded per step by the engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from volcontrast.errors import InputError


@dataclass
class AugmentConfig:
    """Per-view augmentation. Probabilities are per view; ranges are uniform draws."""

    flip_prob: float = 0.5  # per spatial axis in flip_axes
    flip_axes: tuple[int, ...] = (0, 1, 2)
    spatial_prob: float = 1.0  # probability that rotation + scale (+ elastic) are applied together
    rotation_deg: float = 15.0  # max |angle| per rotation axis (3D), or in-plane (2D; 180 = full circle)
    scale_range: tuple[float, float] = (0.8, 1.25)  # >1 zooms out (the view covers more anatomy)
    elastic_prob: float = 0.0  # given spatial fired
    elastic_alpha: tuple[float, float] = (100.0, 350.0)
    elastic_sigma: tuple[float, float] = (14.0, 17.0)  # voxels
    brightness_prob: float = 0.5
    brightness: float = 0.1  # additive, in normalised intensity units
    contrast_prob: float = 0.5
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.3
    noise_std: float = 0.1
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    remap_prob: float = 0.0  # random piecewise-linear intensity curve (MR contrast randomisation); off by default
    remap_points: int = 4  # interior control points of the curve
    remap_monotone: bool = False  # False: tissues may swap brightness order (another MR sequence); True: sorted
    context: float = 1.4  # box size / crop size cut on the CPU (room for rotation and zoom-out)

    def check(self) -> AugmentConfig:
        """Raise :class:`InputError` for settings no draw can honour."""
        for name in ("flip_prob", "spatial_prob", "elastic_prob", "brightness_prob", "contrast_prob", "gamma_prob",
                     "noise_prob", "blur_prob", "remap_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"augment.{name}", f"must be a probability in [0, 1], got {getattr(self, name)}")
        if self.remap_points < 0:
            raise InputError("augment.remap_points", f"must be >= 0, got {self.remap_points}")
        return self

    @classmethod
    def none(cls) -> AugmentConfig:
        """Identity: every view is the centre crop of its box."""
        return cls(flip_prob=0.0, spatial_prob=0.0, brightness_prob=0.0, contrast_prob=0.0, gamma_prob=0.0,
                   noise_prob=0.0, blur_prob=0.0, context=1.0)

    @classmethod
    def pcl_paper(cls) -> AugmentConfig:
        """PCL's 2D augmentation: flips, and with p=0.67 elastic + full rotation + scale 0.7-1.3; no intensity."""
        return cls(flip_prob=0.5, flip_axes=(0, 1), spatial_prob=0.67, rotation_deg=180.0, scale_range=(0.7, 1.3),
                   elastic_prob=1.0, brightness_prob=0.0, contrast_prob=0.0, gamma_prob=0.0, noise_prob=0.0,
                   blur_prob=0.0, context=1.5)


@dataclass
class AugmentedViews:
    views: Tensor  # (N, C, *crop_size)
    voxel_to_box: Tensor  # (N, dim+1, dim+1) float64: view voxel index -> box voxel index
    params: dict[str, Tensor] = field(default_factory=dict)
    clean: Tensor | None = None  # views before intensity augmentation (restoration targets)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _fires(n: int, p: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


def rotation_matrices(angles: Tensor) -> Tensor:
    """(N, 3) angles (rad) about axes 0, 1, 2 -> (N, 3, 3) R = R2 @ R1 @ R0; (N,) -> (N, 2, 2) in-plane."""
    if angles.ndim == 1:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    n = angles.shape[0]
    out = torch.eye(3, dtype=angles.dtype).repeat(n, 1, 1)
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        a, b = [i for i in range(3) if i != axis]
        r = torch.eye(3, dtype=angles.dtype).repeat(n, 1, 1)
        r[:, a, a], r[:, a, b], r[:, b, a], r[:, b, b] = c, -s, s, c
        out = r @ out
    return out


def draw_spatial(n: int, dim: int, cfg: AugmentConfig, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Random linear maps (N, dim, dim) float64 = rotation @ scale @ flip, and their parameters."""
    flips = torch.zeros(n, dim, dtype=torch.bool)
    for axis in cfg.flip_axes:
        if axis < dim:
            flips[:, axis] = _fires(n, cfg.flip_prob, gen)
    spatial = _fires(n, cfg.spatial_prob, gen)
    scale = torch.where(spatial, _uniform(n, *cfg.scale_range, gen), torch.ones(n, dtype=torch.float64))
    max_angle = math.radians(cfg.rotation_deg)
    if dim == 3:
        angles = torch.stack([_uniform(n, -max_angle, max_angle, gen) for _ in range(3)], -1)
        angles = angles * spatial[:, None]
    else:
        angles = _uniform(n, -max_angle, max_angle, gen) * spatial
    flip_diag = torch.diag_embed(1.0 - 2.0 * flips.double())
    linear = rotation_matrices(angles) @ (scale[:, None, None] * flip_diag)
    params = {"flip": flips, "scale": scale, "rotation": angles, "spatial": spatial}
    return linear, params


def voxel_maps(linear: Tensor, crop_size: tuple[int, ...], box_size: tuple[int, ...],
               shift: Tensor | None = None) -> Tensor:
    """(N, dim+1, dim+1) view voxel -> box voxel: ``b = L (o - c_view) + c_box + shift`` about the two centres.

    ``shift`` (N, dim) moves each view's centre off the box centre (in box voxels; default none).
    """
    n, dim = linear.shape[0], linear.shape[1]
    c_view = torch.tensor([(s - 1) / 2 for s in crop_size], dtype=torch.float64)
    c_box = torch.tensor([(s - 1) / 2 for s in box_size], dtype=torch.float64)
    out = torch.eye(dim + 1, dtype=torch.float64).repeat(n, 1, 1)
    out[:, :dim, :dim] = linear
    out[:, :dim, dim] = c_box - linear @ c_view
    if shift is not None:
        out[:, :dim, dim] += shift.to(torch.float64)
    return out


def _gaussian_kernel1d(sigma: float, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, *spatial) over the spatial axes (reflect padding where possible)."""
    dim = x.ndim - 2
    k = _gaussian_kernel1d(sigma, x.device).to(x.dtype)
    n, c = x.shape[:2]
    out = x.reshape(n * c, 1, *x.shape[2:])
    conv = F.conv3d if dim == 3 else F.conv2d
    for axis in range(dim):
        shape = [1, 1] + [1] * dim
        shape[2 + axis] = k.numel()
        pad = [0] * (2 * dim)
        r = k.numel() // 2
        # F.pad orders pads from the last axis backwards
        pad[2 * (dim - 1 - axis)] = r
        pad[2 * (dim - 1 - axis) + 1] = r
        mode = "reflect" if out.shape[2 + axis] > r else "replicate"
        out = conv(F.pad(out, pad, mode=mode), k.view(shape))
    return out.reshape(x.shape)


def elastic_displacement(n: int, crop_size: tuple[int, ...], alphas: Tensor, sigmas: Tensor,
                         gen: torch.Generator, device: torch.device) -> Tensor:
    """(N, dim, *crop_size) smooth displacement in voxels: ``gaussian(U(-1,1) noise, sigma) * alpha``."""
    dim = len(crop_size)
    noise = torch.rand((n, dim, *crop_size), generator=gen, dtype=torch.float32) * 2 - 1
    noise = noise.to(device)
    out = torch.empty_like(noise)
    for i in range(n):
        out[i] = gaussian_smooth(noise[i : i + 1], float(sigmas[i]))[0] * float(alphas[i])
    return out


def sample_views(boxes: Tensor, voxel_to_box: Tensor, crop_size: tuple[int, ...],
                 displacement: Tensor | None = None, mode: str = "bilinear") -> Tensor:
    """Resample views (N, C, *crop_size) from boxes (N, C, *box) through the recorded voxel maps.

    One ``grid_sample`` (align_corners=True) for the batch; outside the box the border value is repeated.
    """
    n, dim = boxes.shape[0], boxes.ndim - 2
    box_size = boxes.shape[2:]
    device = boxes.device
    axes = [torch.arange(s, device=device, dtype=torch.float32) for s in crop_size]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim)  # (P, dim) view voxels
    m = voxel_to_box.to(device=device, dtype=torch.float32)
    coords = base @ m[:, :dim, :dim].transpose(1, 2) + m[:, None, :dim, dim]  # (N, P, dim) box voxels
    if displacement is not None:
        coords = coords + displacement.reshape(n, dim, -1).transpose(1, 2)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in box_size], device=device)
    grid = (coords * scale - 1.0).flip(-1).reshape(n, *crop_size, dim)  # grid_sample wants (.., W, H, D)
    return F.grid_sample(boxes, grid.to(boxes.dtype), mode=mode, padding_mode="border", align_corners=True)


def remap_curves(n: int, cfg: AugmentConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(n, remap_points + 2) curve values at the evenly spaced knots 0, 1/(K+1), ..., 1 (identity where not fired),
    and the (n,) fired mask.

    Drawn only when ``remap_prob > 0``, so configurations without it keep their random stream.
    """
    k = cfg.remap_points + 2
    identity = torch.linspace(0.0, 1.0, k, dtype=torch.float64).expand(n, k)
    values = torch.rand(n, k, generator=gen, dtype=torch.float64)
    if cfg.remap_monotone:
        values = values.sort(dim=1).values
    fired = _fires(n, cfg.remap_prob, gen)
    return torch.where(fired[:, None], values, identity), fired


def apply_curves(x: Tensor, curves: Tensor) -> Tensor:
    """Map each view's intensities through its piecewise-linear curve over the view's own [min, max] range.

    ``u = (x - min) / (max - min)`` in [0, 1]; ``y = interp(u; knots, curves[n])``; returned as ``min + y (max -
    min)``, so the output stays inside the view's [min, max] (usually a narrower range, since the curve's end values
    are random too) and the identity curve returns ``x`` up to rounding. One range over all channels.
    """
    n, k = x.shape[0], curves.shape[1]
    flat = x.reshape(n, -1)
    lo = flat.amin(dim=1, keepdim=True)
    rng = (flat.amax(dim=1, keepdim=True) - lo).clamp_min(1e-6)
    t = ((flat - lo) / rng).clamp(0, 1) * (k - 1)
    idx = t.floor().long().clamp(max=k - 2)
    frac = t - idx
    c = curves.to(device=x.device, dtype=x.dtype)
    y = torch.gather(c, 1, idx) * (1 - frac) + torch.gather(c, 1, idx + 1) * frac
    return (lo + y * rng).reshape(x.shape)


def intensity_augment(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    """Remap curve, contrast, brightness, gamma, noise, blur per view; returns the new tensor and the parameters."""
    n = x.shape[0]
    dims = tuple(range(1, x.ndim))
    dev = x.device
    extra: dict[str, Tensor] = {}
    if cfg.remap_prob > 0:
        curves, fired = remap_curves(n, cfg, gen)
        extra["remap"] = curves
        if bool(fired.any()):
            x = torch.where(fired.to(dev).view((n,) + (1,) * (x.ndim - 1)), apply_curves(x, curves), x)
    def draw(p: float, lo: float, hi: float, neutral: float) -> Tensor:
        return torch.where(_fires(n, p, gen), _uniform(n, lo, hi, gen), torch.full((n,), neutral, dtype=torch.float64))

    contrast = draw(cfg.contrast_prob, *cfg.contrast_range, 1.0)
    bright = draw(cfg.brightness_prob, -cfg.brightness, cfg.brightness, 0.0)
    gamma = draw(cfg.gamma_prob, *cfg.gamma_range, 1.0)
    noise = draw(cfg.noise_prob, 0.0, cfg.noise_std, 0.0)
    blur = draw(cfg.blur_prob, *cfg.blur_sigma, 0.0)
    shape = (n,) + (1,) * (x.ndim - 1)
    to = {"device": dev, "dtype": x.dtype}
    if bool((gamma != 1).any()):
        lo = x.amin(dim=dims, keepdim=True)
        hi = x.amax(dim=dims, keepdim=True)
        rng = (hi - lo).clamp_min(1e-6)
        g = gamma.to(**to).view(shape)
        x = torch.where(g != 1, ((x - lo) / rng).clamp(0, 1) ** g * rng + lo, x)
    mean = x.mean(dim=dims, keepdim=True)
    x = (x - mean) * contrast.to(**to).view(shape) + mean + bright.to(**to).view(shape)
    if bool((noise > 0).any()):
        eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(**to)
        x = x + eps * noise.to(**to).view(shape)
    for i in torch.nonzero(blur > 0).flatten().tolist():
        x[i : i + 1] = gaussian_smooth(x[i : i + 1], float(blur[i]))
    return x, {"contrast": contrast, "brightness": bright, "gamma": gamma, "noise_std": noise, "blur_sigma": blur,
               **extra}


def augment(boxes: Tensor, crop_size: tuple[int, ...], cfg: AugmentConfig, gen: torch.Generator, *,
            keep_clean: bool = False, shift: Tensor | None = None) -> AugmentedViews:
    """Draw a spatial + intensity augmentation per box and resample the views on the boxes' device.

    Args:
        boxes: (N, C, *box_size) on the training device.
        crop_size: output view size (``dim`` ints).
        gen: CPU generator for all random draws (seed it per step for reproducibility).
        keep_clean: also return the views before intensity augmentation.
        shift: (N, dim) offsets of the view centres from the box centres, in box voxels (Spade's overlapping
            crop pairs); recorded in ``voxel_to_box``.
    """
    n, dim = boxes.shape[0], boxes.ndim - 2
    linear, params = draw_spatial(n, dim, cfg, gen)
    m = voxel_maps(linear, crop_size, tuple(boxes.shape[2:]), shift)
    displacement = None
    elastic = params["spatial"] & _fires(n, cfg.elastic_prob, gen)
    params["elastic"] = elastic
    if bool(elastic.any()):
        alphas = _uniform(n, *cfg.elastic_alpha, gen) * elastic
        sigmas = _uniform(n, *cfg.elastic_sigma, gen)
        displacement = elastic_displacement(n, crop_size, alphas, sigmas, gen, boxes.device)
    views = sample_views(boxes, m, crop_size, displacement)
    clean = views.clone() if keep_clean else None
    views, iparams = intensity_augment(views, cfg, gen)
    params.update(iparams)
    return AugmentedViews(views=views, voxel_to_box=m, params=params, clean=clean)
