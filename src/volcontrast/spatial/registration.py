"""Affine registration of two scans with SimpleITK (the engine behind the ``affine`` correspondence provider).

:func:`register_affine` finds the affine map ``fixed world mm -> moving world mm`` that maximises Mattes mutual
information between two scans resampled to an isotropic working grid (``AffineSettings.spacing_mm``, 6 mm by
default):

1. **initialisation**: the centres of the two body boxes are aligned in x and y (RAS left-right and
   antero-posterior); along z (the body's long axis, where fields of view differ most: a chest scan and an
   abdomen scan share no body-box centre) a translation search on a 2x coarser copy evaluates the metric every
   ``search_step_mm`` over every shift that keeps the fixed box centre inside the moving box (or vice versa);
2. **multi-start**: the ``search_candidates`` best shifts (at least ``search_separation_mm`` apart) are each
   refined by a similarity transform at the coarsest level and the best final metric wins (a translation-only
   metric is flat along the trunk, so its single best shift is sometimes 200 mm off);
3. **similarity** stage (7 dof: rotation, translation, isotropic scale), then an **affine** stage (12 dof),
   each multi-resolution (``shrink_factors`` / ``smoothing_sigmas`` in working-grid voxels), with regular
   step gradient descent and scales from physical shifts.

The metric samples a fixed regular grid (``REGULAR`` strategy, fixed seed) and runs on one ITK thread by
default (with more, its multi-threaded sums change order from run to run, ~1e-4 mm), so repeated runs give
bit-identical transforms. Physical coordinates are the cache's RAS world mm throughout (SimpleITK does not
care which physical frame an image lives in as long as both images use the same one).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from volcontrast.utils.files import stable_hash

__all__ = ["REGISTRATION_VERSION", "AffineRegistration", "AffineSettings", "itk_threads", "metric_value",
           "register_affine", "sitk_image", "working_image", "world_box"]

REGISTRATION_VERSION = 1  # bump when the algorithm changes so cached transforms are recomputed
STAGES = ("similarity", "affine")


@dataclass(frozen=True)
class AffineSettings:
    """Settings of the affine registration (their fingerprint is stored with every cached transform)."""

    spacing_mm: float = 6.0  # isotropic working grid; the z search runs at twice this spacing
    histogram_bins: int = 32  # Mattes mutual information
    metric_samples: int = 20000  # regular samples of the fixed grid at the finest level (all voxels if fewer)
    seed: int = 42  # of the regular sampling's jitter (fixed: deterministic)
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 0.0)  # working-grid voxels, per level
    iterations: int = 100  # at most, per level and stage
    learning_rate: float = 2.0  # initial step of regular step gradient descent (mm-equivalent)
    min_step: float = 0.01  # regular step gradient descent stops below this step (mm-equivalent)
    search_step_mm: float = 10.0  # z translation search
    search_candidates: int = 3  # best z offsets refined at the coarsest level; the best final metric wins
    search_separation_mm: float = 50.0  # between two candidates
    stages: tuple[str, ...] = STAGES  # "similarity" and/or "affine", in this order
    threads: int = 1  # ITK threads; with more, the metric's accumulation order varies (~1e-4 mm run to run)

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0 or self.search_step_mm <= 0:
            raise ValueError("spacing_mm and search_step_mm must be positive")
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise ValueError("shrink_factors and smoothing_sigmas need one entry per level")
        if not self.stages or tuple(s for s in STAGES if s in self.stages) != tuple(self.stages):
            raise ValueError(f"stages must be a non-empty subset of {STAGES} in that order, got {self.stages}")
        if self.search_candidates < 1:
            raise ValueError("search_candidates must be >= 1")
        if self.metric_samples < 1000:
            raise ValueError("metric_samples must be >= 1000")

    def fingerprint(self) -> str:
        return stable_hash({"version": REGISTRATION_VERSION, **asdict(self)})


@dataclass
class AffineRegistration:
    """Result of :func:`register_affine`."""

    matrix: np.ndarray  # (4, 4) fixed world mm -> moving world mm
    metric: float  # final Mattes MI (negative; lower is better)
    search_shift_mm: float  # z translation chosen by the initial search (relative to centre alignment)
    iterations: list[int] = field(default_factory=list)  # optimiser iterations of each stage (last level)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------- images


def sitk_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A float32 SimpleITK image of an (X, Y, Z) array whose voxel -> world mm map is ``affine`` (4, 4)."""
    affine = np.asarray(affine, dtype=np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0)), dtype=np.float32))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return image


def working_image(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` resampled to an isotropic ``spacing_mm`` grid covering the same extent (same direction).

    When coarsening, the image is first smoothed with a Gaussian whose FWHM makes up the difference between
    the old and the new voxel size (anti-aliasing). Outside the source the value is its minimum (air).
    """
    spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    fill = float(sitk.GetArrayViewFromImage(image).min())
    if spacing_mm > spacing.min():
        sigmas = np.sqrt(np.maximum(spacing_mm**2 - spacing**2, 0.0)) / 2.355  # FWHM -> sigma, mm
        image = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigmas])
    n = np.maximum(1, np.round(spacing * size / spacing_mm)).astype(int)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    origin = centre - direction @ ((n - 1) / 2 * spacing_mm)
    return sitk.Resample(image, n.tolist(), sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         [float(spacing_mm)] * 3, image.GetDirection(), fill, sitk.sitkFloat32)


def world_box(affine: np.ndarray, box: tuple[tuple[int, int], ...] | np.ndarray) -> np.ndarray:
    """(2, 3) world-mm axis-aligned bounds (lower, upper) of a half-open voxel box (its voxels' outer faces)."""
    box = np.asarray(box, dtype=np.float64)
    corners = np.array([[box[a, (k >> a) & 1] - 0.5 for a in range(3)] for k in range(8)])
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return np.stack([world.min(axis=0), world.max(axis=0)])


# ----------------------------------------------------------------------------------------- registration


@contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Set SimpleITK's global default thread count to ``n`` for the block (the metric ignores the method's own)."""
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def _method(settings: AffineSettings, fixed: sitk.Image, levels: bool = True) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    # the same fraction at every level: metric_samples at the finest, about 1/8 of that at a 2x coarser one
    reg.SetMetricSamplingPercentage(min(1.0, settings.metric_samples / float(np.prod(fixed.GetSize()))),
                                    settings.seed)
    reg.MetricUseFixedImageGradientFilterOff()  # central differences on the fly: 3x faster on small grids
    reg.MetricUseMovingImageGradientFilterOff()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=settings.learning_rate, minStep=settings.min_step,
                                                 numberOfIterations=settings.iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    if levels:
        reg.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
        reg.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetNumberOfThreads(settings.threads)
    return reg


def _z_search(fixed: sitk.Image, moving: sitk.Image, fixed_box: np.ndarray, moving_box: np.ndarray,
              settings: AffineSettings) -> list[tuple[float, np.ndarray]]:
    """Candidate translations fixed -> moving: box centres aligned in x/y, z searched on a 2x coarser grid.

    Returns up to ``settings.search_candidates`` ``(z offset from centre alignment mm, translation (3,))``, the
    best metric first, at least ``search_separation_mm`` apart in z.
    """
    coarse = 2 * settings.spacing_mm
    fixed_c, moving_c = working_image(fixed, coarse), working_image(moving, coarse)
    centre_shift = moving_box.mean(axis=0) - fixed_box.mean(axis=0)
    half = max(np.ptp(fixed_box[:, 2]), np.ptp(moving_box[:, 2])) / 2
    k_max = int(np.floor(half / settings.search_step_mm))
    reg = _method(settings, fixed_c, levels=False)
    scored: list[tuple[float, float]] = []
    for k in range(-k_max, k_max + 1):  # symmetric grid around centre alignment (k = 0 for a scan and itself)
        dz = k * settings.search_step_mm
        shift = centre_shift + np.array([0.0, 0.0, dz])
        reg.SetInitialTransform(sitk.TranslationTransform(3, shift.tolist()), inPlace=False)
        try:
            scored.append((reg.MetricEvaluate(fixed_c, moving_c), dz))
        except RuntimeError:  # too little overlap at this shift
            continue
    chosen: list[float] = []
    for _, dz in sorted(scored, key=lambda vd: (vd[0], abs(vd[1]))):
        if all(abs(dz - c) >= settings.search_separation_mm for c in chosen):
            chosen.append(dz)
        if len(chosen) == settings.search_candidates:
            break
    return [(dz, centre_shift + np.array([0.0, 0.0, dz])) for dz in chosen or [0.0]]


def _screen(fixed: sitk.Image, moving: sitk.Image, candidates: list[tuple[float, np.ndarray]],
            centre: np.ndarray, settings: AffineSettings) -> tuple[float, sitk.Transform]:
    """Refine each candidate with a similarity transform at the coarsest level; the best (z offset, transform)."""
    coarse = replace(settings, shrink_factors=settings.shrink_factors[:1],
                     smoothing_sigmas=settings.smoothing_sigmas[:1])
    scored: list[tuple[float, float, sitk.Transform]] = []
    error: RuntimeError | None = None
    for dz, shift in candidates:
        tf = sitk.Similarity3DTransform()
        tf.SetCenter(centre.tolist())
        tf.SetTranslation(shift.tolist())
        if len(candidates) == 1:
            return dz, tf
        reg = _method(coarse, fixed)
        reg.SetInitialTransform(tf, inPlace=True)
        try:
            reg.Execute(fixed, moving)
        except RuntimeError as exc:  # this start lost the overlap; the others may not
            error = exc
            continue
        scored.append((float(reg.GetMetricValue()), dz, tf))
    if not scored:
        raise error or RuntimeError("no registration start converged")
    _, dz, tf = min(scored, key=lambda s: s[0])
    return dz, tf


def _to_matrix(transform: sitk.Transform) -> np.ndarray:
    """(4, 4) homogeneous matrix of a SimpleITK matrix-offset transform ``A (x - c) + c + t``."""
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def register_affine(fixed: sitk.Image, moving: sitk.Image, settings: AffineSettings | None = None, *,
                    fixed_box: np.ndarray | None = None, moving_box: np.ndarray | None = None) -> AffineRegistration:
    """Affine map from ``fixed`` world mm to ``moving`` world mm (see the module docstring for the method).

    Args:
        fixed, moving: scans at any resolution (resampled here to ``settings.spacing_mm``).
        settings: registration settings (defaults: :class:`AffineSettings`).
        fixed_box, moving_box: (2, 3) world-mm bounds of each body (:func:`world_box`); default the image extents.

    Returns:
        the transform as a (4, 4) matrix with ``moving_point = M @ [fixed_point, 1]``, and the final metric.

    Raises:
        RuntimeError: SimpleITK failed (e.g. the scans do not overlap at any searched shift).
    """
    settings = settings or AffineSettings()
    with itk_threads(settings.threads):
        return _register(fixed, moving, settings, fixed_box, moving_box)


def _register(fixed: sitk.Image, moving: sitk.Image, settings: AffineSettings, fixed_box: np.ndarray | None,
              moving_box: np.ndarray | None) -> AffineRegistration:
    t0 = time.perf_counter()
    fixed_w, moving_w = working_image(fixed, settings.spacing_mm), working_image(moving, settings.spacing_mm)
    if fixed_box is None:
        fixed_box = _image_box(fixed_w)
    if moving_box is None:
        moving_box = _image_box(moving_w)
    centre = np.asarray(fixed_box).mean(axis=0)
    candidates = _z_search(fixed_w, moving_w, np.asarray(fixed_box), np.asarray(moving_box), settings)
    dz, transform = _screen(fixed_w, moving_w, candidates, centre, settings)
    iterations, metric = [], np.nan
    for stage in settings.stages:
        previous = _to_matrix(transform)
        stage_tf = sitk.Similarity3DTransform(transform) if stage == "similarity" else sitk.AffineTransform(3)
        if stage == "affine":
            stage_tf.SetCenter(centre.tolist())
            stage_tf.SetMatrix(previous[:3, :3].ravel().tolist())
            stage_tf.SetTranslation((previous[:3, 3] + previous[:3, :3] @ centre - centre).tolist())
        reg = _method(settings, fixed_w)
        reg.SetInitialTransform(stage_tf, inPlace=True)
        reg.Execute(fixed_w, moving_w)
        iterations.append(int(reg.GetOptimizerIteration()))
        metric = float(reg.GetMetricValue())
        transform = stage_tf
    return AffineRegistration(matrix=_to_matrix(transform), metric=metric, search_shift_mm=float(dz),
                              iterations=iterations, seconds=time.perf_counter() - t0)


def _image_box(image: sitk.Image) -> np.ndarray:
    size = np.asarray(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([size[a] - 0.5 if (k >> a) & 1 else -0.5
                                                              for a in range(3)]) for k in range(8)]
    corners = np.asarray(corners)
    return np.stack([corners.min(axis=0), corners.max(axis=0)])


def metric_value(fixed: sitk.Image, moving: sitk.Image, matrix: np.ndarray, settings: AffineSettings) -> float:
    """Mattes MI (negative) of ``moving`` seen through ``matrix`` (fixed world -> moving world), on working grids."""
    with itk_threads(settings.threads):
        fixed_w, moving_w = working_image(fixed, settings.spacing_mm), working_image(moving, settings.spacing_mm)
        tf = sitk.AffineTransform(3)
        tf.SetMatrix(np.asarray(matrix)[:3, :3].ravel().tolist())
        tf.SetTranslation(np.asarray(matrix)[:3, 3].tolist())
        reg = _method(settings, fixed_w, levels=False)
        reg.SetInitialTransform(tf, inPlace=False)
        return float(reg.MetricEvaluate(fixed_w, moving_w))
