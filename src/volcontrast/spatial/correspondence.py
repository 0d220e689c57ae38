"""Correspondence providers: map any voxel of any cached scan to a common reference frame and back.

A provider gives every scan of a cache a map ``c = f_case(v)`` from cached voxel coordinates ``v`` (fractional
indices into ``cache.image(case)``, axis order X, Y, Z) to reference coordinates ``c`` in R³, and its inverse.
Two voxels of different scans correspond when their reference coordinates are close; :func:`map_points`
chains ``f_dst⁻¹ ∘ f_src``. Spade measures distances ``‖c_a − c_b‖`` in this frame; Alice finds the voxel of
scan B that matches a point of scan A (METHODS.md §2-3).

Providers (:func:`get_provider`), cheapest first:

=========  ======  ==========================================================================================
name       units   reference coordinate
=========  ======  ==========================================================================================
``index``  index   PCL's position: ``(v + crop_offset + 0.5) / resampled_shape`` per axis, the voxel's place in
                   the whole resampled scan (field of view included). The baseline, not a real correspondence.
``body``   body    normalised body box: ``(v + 0.5 - lo) / (hi - lo)`` per axis (:func:`body_position`); [0, 1]³
                   inside the body box. Exact inverse, nothing stored.
``affine`` mm      world mm of one reference scan, through an affine registration of each scan to it
                   (:mod:`volcontrast.spatial.registration`), computed once and stored in the cache.
=========  ======  ==========================================================================================

A learned anatomical embedding plugs in the same way: subclass :class:`CorrespondenceProvider` and decorate it
with ``@register_provider("name")``.

``affine`` storage (``CACHE/correspondence/affine/``): ``reference.json`` (the reference case, chosen once:
the scan whose body box is longest along z, in mm, so every other scan's anatomy tends to lie inside it;
ties -> the larger body box, then the first id; with its Mattes self-information) and ``<case>.json`` per case
with ``to_reference`` (4x4, case world mm -> reference world mm), ``status`` ("ok" or "failed: ..."), the final
Mattes metric and its ratio to the reference's self-information (-> :meth:`AffineProvider.quality`), the
settings and their fingerprint and the case's and reference's cache fingerprints. ``fit`` skips a case whose
file matches all of those. Adding cases keeps the stored reference (if it is still in the cache), so old
transforms stay valid; other settings recompute every case (one settings version is stored at a time).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk
from torch import Tensor

from volcontrast.data.cache import Cache, CaseMeta
from volcontrast.errors import InputError
from volcontrast.spatial.positions import body_position
from volcontrast.spatial.registration import AffineSettings, metric_value, register_affine, sitk_image, world_box
from volcontrast.utils.files import atomic_write_json, read_json

__all__ = [
    "CorrespondenceProvider",
    "FitReport",
    "get_provider",
    "map_points",
    "provider_names",
    "register_provider",
    "voxel_to_world",
    "world_to_voxel",
]

PointsLike = np.ndarray | Tensor | list
# (bad, good) mutual-information ratio -> registration quality 0..1, per modality (see AffineProvider)
QUALITY_RATIO: dict[str, tuple[float, float]] = {"ct": (0.15, 0.35), "mr": (0.08, 0.24)}


@dataclass
class FitReport:
    """What :meth:`CorrespondenceProvider.fit` did: seconds per computed case, reused and failed cases."""

    provider: str
    computed: dict[str, float] = field(default_factory=dict)  # case id -> seconds
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # case id -> one-line reason (confidence 0)
    reference: str | None = None


# ---------------------------------------------------------------------------------------- coordinates


def as_points(points: PointsLike) -> np.ndarray:
    """(..., 3) float64 NumPy copy of points given as an array, a tensor (any device) or nested lists."""
    if isinstance(points, Tensor):
        points = points.detach().cpu().double().numpy()
    out = np.array(points, dtype=np.float64)
    if out.ndim == 0 or out.shape[-1] != 3:
        raise ValueError(f"points must have shape (..., 3), got {out.shape}")
    return out


def voxel_to_world(meta: CaseMeta, voxels: PointsLike) -> np.ndarray:
    """(..., 3) world RAS mm of cached voxel coordinates (..., 3)."""
    v = as_points(voxels)
    return v @ meta.affine[:3, :3].T + meta.affine[:3, 3]


def world_to_voxel(meta: CaseMeta, world: PointsLike) -> np.ndarray:
    """(..., 3) cached voxel coordinates of world RAS mm points (..., 3)."""
    w = as_points(world)
    return np.linalg.solve(meta.affine[:3, :3], (w - meta.affine[:3, 3]).reshape(-1, 3).T).T.reshape(w.shape)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


# ------------------------------------------------------------------------------------------ interface


class CorrespondenceProvider(ABC):
    """Maps cached voxels of every scan of one cache to a common reference frame (see the module docstring).

    All point arguments are ``(..., 3)`` arrays or tensors in cached voxel coordinates of ``case_id``
    (fractional indices, axis order X, Y, Z); results are ``(..., 3)`` float64 arrays (``(...)`` for
    :meth:`confidence`).
    """

    name: ClassVar[str]
    units: ClassVar[str]  # "index" | "body" (normalised, [0, 1] inside the box) | "mm"

    def __init__(self, cache: Cache, **options: Any):
        if options:
            raise InputError("provider", f"{self.name} takes no options, got {sorted(options)}")
        self.cache = cache
        self._body: dict[str, np.ndarray] = {}

    @property
    def store(self) -> Path:
        """Folder of this provider's files in the cache: ``CACHE/correspondence/<name>``."""
        return self.cache.root / "correspondence" / self.name

    def fit(self, case_ids: list[str] | None = None, *, progress: bool = False) -> FitReport:
        """Compute and store whatever the maps need (default: check the cases' geometry); idempotent."""
        report = FitReport(self.name)
        for cid in self._case_ids(case_ids):
            t0 = time.perf_counter()
            self._check_case(cid)
            report.computed[cid] = time.perf_counter() - t0
        return report

    @abstractmethod
    def to_reference(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        """(..., 3) reference coordinates of cached voxel coordinates (..., 3) of ``case_id``."""

    @abstractmethod
    def from_reference(self, case_id: str, ref: PointsLike) -> np.ndarray:
        """(..., 3) cached voxel coordinates of ``case_id`` at reference coordinates (..., 3)."""

    def confidence(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        """(...) in [0, 1]: 1 for voxels inside the scan and its body mask, 0 elsewhere (nearest voxel)."""
        return self._in_body(case_id, as_points(voxels))

    def reference_box(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` (3,) of the reference frame's body, in its units: positions normalised by it lie
        in [0, 1]³ inside the reference body (PCL/GCL positions from a provider). Default: the unit cube."""
        return np.zeros(3), np.ones(3)

    def normalised(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        """(..., 3) reference coordinates scaled by :meth:`reference_box` (0 and 1 at the reference body's
        bounds on each axis)."""
        lo, hi = self.reference_box()
        return (self.to_reference(case_id, voxels) - lo) / np.maximum(hi - lo, 1e-9)

    # helpers shared by the providers
    def _case_ids(self, case_ids: list[str] | None) -> list[str]:
        ids = list(self.cache.ids if case_ids is None else case_ids)
        unknown = [c for c in ids if c not in self.cache.ids]
        if unknown:
            raise InputError(self.cache.root / "manifest.json", f"unknown case id(s): {', '.join(unknown)}")
        return ids

    def _check_case(self, case_id: str) -> CaseMeta:
        meta = self.cache.meta(case_id)
        lo, hi = self._box(meta)
        if np.any(hi <= lo):
            raise InputError(self.cache.case_dir(case_id) / "meta.json", f"empty body box {meta.body_bbox}")
        return meta

    @staticmethod
    def _box(meta: CaseMeta) -> tuple[np.ndarray, np.ndarray]:
        box = np.asarray(meta.body_bbox, dtype=np.float64)
        return box[:, 0], box[:, 1]

    def _in_body(self, case_id: str, voxels: np.ndarray) -> np.ndarray:
        if case_id not in self._body:
            self._body[case_id] = np.asarray(self.cache.body(case_id))
        body = self._body[case_id]
        idx = np.rint(voxels).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(body.shape)), axis=-1)
        out = np.zeros(voxels.shape[:-1], dtype=np.float64)
        hit = idx[inside]
        out[inside] = body[hit[:, 0], hit[:, 1], hit[:, 2]] > 0
        return out


_REGISTRY: dict[str, type[CorrespondenceProvider]] = {}


def register_provider(name: str):
    """Class decorator adding a provider to the registry of :func:`get_provider` under ``name``."""

    def add(cls: type[CorrespondenceProvider]) -> type[CorrespondenceProvider]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def provider_names() -> list[str]:
    return sorted(_REGISTRY)


def get_provider(name: str, cache: Cache, **options: Any) -> CorrespondenceProvider:
    """The provider ``name`` (``index``, ``body``, ``affine``, or a registered one) for ``cache``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise InputError("--provider", f"unknown correspondence provider {name!r} (choose {known})")
    return _REGISTRY[name](cache, **options)


def map_points(provider: CorrespondenceProvider, src_case: str, voxels: PointsLike,
               dst_case: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of ``src_case`` -> the corresponding voxels of ``dst_case`` through the reference frame.

    Args:
        voxels: (..., 3) cached voxel coordinates of ``src_case``.

    Returns:
        ``(dst_voxels (..., 3), confidence (...))``; confidence is the product of the source point's and the
        mapped point's confidence, so it is 0 where either falls outside its scan or body.
    """
    v = as_points(voxels)
    dst = provider.from_reference(dst_case, provider.to_reference(src_case, v))
    return dst, provider.confidence(src_case, v) * provider.confidence(dst_case, dst)


# ------------------------------------------------------------------------------------------ providers


@register_provider("index")
class IndexProvider(CorrespondenceProvider):
    """PCL's slice-index positions: ``(v + crop_offset + 0.5) / resampled_shape`` (the baseline)."""

    units = "index"

    def to_reference(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        meta = self.cache.meta(case_id)
        return (as_points(voxels) + np.asarray(meta.crop_offset) + 0.5) / np.asarray(meta.resampled_shape)

    def from_reference(self, case_id: str, ref: PointsLike) -> np.ndarray:
        meta = self.cache.meta(case_id)
        return as_points(ref) * np.asarray(meta.resampled_shape) - 0.5 - np.asarray(meta.crop_offset)


@register_provider("body")
class BodyProvider(CorrespondenceProvider):
    """Normalised body-box coordinates ``(v + 0.5 - lo) / (hi - lo)`` (:func:`body_position`); exact inverse."""

    units = "body"

    def to_reference(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        lo, hi = self._box(self.cache.meta(case_id))
        return np.asarray(body_position(as_points(voxels), lo, hi))

    def from_reference(self, case_id: str, ref: PointsLike) -> np.ndarray:
        lo, hi = self._box(self.cache.meta(case_id))
        return as_points(ref) * (hi - lo) + lo - 0.5


@register_provider("affine")
class AffineProvider(CorrespondenceProvider):
    """Affine registration of every scan (channel 0) to one reference scan; reference frame = its world mm.

    A registration that SimpleITK cannot finish is stored as ``status: "failed: <reason>"`` with the body-box
    centre alignment as its map and quality 0, so every confidence for that scan is 0 (never silently trusted).

    Args:
        cache: the cache whose scans are mapped (transforms are stored in ``CACHE/correspondence/affine``).
        settings: registration settings (:class:`~volcontrast.spatial.registration.AffineSettings`).
        quality_ratio: ``(bad, good)`` ratios of a case's final mutual information to the reference's
            self-information; the registration quality ramps from 0 at ``bad`` to 1 at ``good``. Default by
            the cache's modality (:data:`QUALITY_RATIO`), calibrated on the synthetic cohort: CT registrations
            reach 0.38-0.58 and the same scans 120 mm off 0.06-0.18; MR 0.24-0.35 and failed ones mostly
            0.08-0.10 (one 70 mm failure reached 0.25, so for MR the quality is a coarse flag only).
    """

    units = "mm"

    def __init__(self, cache: Cache, settings: AffineSettings | None = None,
                 quality_ratio: tuple[float, float] | None = None):
        super().__init__(cache)
        self.settings = settings or AffineSettings()
        self.quality_ratio = quality_ratio or QUALITY_RATIO.get(cache.modality, QUALITY_RATIO["ct"])
        self._records: dict[str, dict[str, Any]] = {}
        self._reference: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------- reference
    def choose_reference(self) -> str:
        """The case whose body box is longest along z (mm); ties -> larger body box, then the first id."""

        def extent(cid: str) -> tuple[float, float]:
            meta = self._check_case(cid)
            size = np.ptp(world_box(meta.affine, meta.body_bbox), axis=0)
            return float(np.round(size[2], 3)), float(np.round(np.prod(size), 3))

        return max(self.cache.ids, key=lambda cid: (*extent(cid), -self.cache.ids.index(cid)))

    @property
    def reference(self) -> str:
        """Id of the reference scan (as stored by :meth:`fit`)."""
        return str(self._reference_record()["reference"])

    def _reference_record(self) -> dict[str, Any]:
        if self._reference is None:
            path = self.store / "reference.json"
            if not path.is_file():
                raise InputError(path, "no affine correspondences in this cache; run "
                                       "`volcontrast correspond CACHE --provider affine` first")
            self._reference = read_json(path)
        return self._reference

    def _stored_reference_valid(self) -> bool:
        path = self.store / "reference.json"
        if not path.is_file():
            return False
        record = read_json(path)
        ref = record.get("reference")
        return (record.get("settings_fingerprint") == self.settings.fingerprint() and ref in self.cache.ids
                and record.get("reference_fingerprint") == self._fingerprint(ref))

    def _fingerprint(self, case_id: str) -> str:
        return str(self.cache.meta(case_id).raw.get("fingerprint", ""))

    def _image(self, case_id: str) -> sitk.Image:
        meta = self.cache.meta(case_id)
        return sitk_image(np.asarray(self.cache.image(case_id)[0]), meta.affine)

    def _world_box(self, case_id: str) -> np.ndarray:
        meta = self.cache.meta(case_id)
        return world_box(meta.affine, meta.body_bbox)

    def reference_box(self) -> tuple[np.ndarray, np.ndarray]:
        """The reference scan's body box in world mm (RAS): ``(lower, upper)``."""
        box = np.asarray(self._world_box(self.reference), dtype=np.float64)
        return box.min(axis=0), box.max(axis=0)

    # ----------------------------------------------------------------------------------------- fit
    def fit(self, case_ids: list[str] | None = None, *, progress: bool = False) -> FitReport:
        """Register every case (default all) to the reference and store the transforms; skips cases done."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        ids = self._case_ids(case_ids)
        fp = self.settings.fingerprint()
        if not self._stored_reference_valid():
            ref = self.choose_reference()
            self_metric = metric_value(self._image(ref), self._image(ref), np.eye(4), self.settings)
            atomic_write_json(self.store / "reference.json", {
                "reference": ref, "reference_fingerprint": self._fingerprint(ref), "self_metric": self_metric,
                "chosen_by": "longest body box along z (mm)", "settings": asdict(self.settings),
                "settings_fingerprint": fp})
        self._reference, self._records = None, {}
        ref = self.reference
        report = FitReport(self.name, reference=ref)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task(f"affine -> {ref}", total=len(ids))
            for cid in ids:
                path = self.store / f"{cid}.json"
                if path.is_file() and self._is_current(read_json(path), cid, ref, fp):
                    report.reused.append(cid)
                else:
                    record = self._register(cid, ref)
                    atomic_write_json(path, record)
                    report.computed[cid] = record["seconds"]
                    if record["status"] != "ok":
                        report.failed[cid] = record["status"]
                bar.advance(task)
        return report

    def _is_current(self, record: dict[str, Any], cid: str, ref: str, fp: str) -> bool:
        return (record.get("reference") == ref and record.get("settings_fingerprint") == fp
                and record.get("case_fingerprint") == self._fingerprint(cid)
                and record.get("reference_fingerprint") == self._fingerprint(ref))

    def _register(self, cid: str, ref: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        self_metric = float(self._reference_record()["self_metric"])
        status, shift, iterations = "ok", 0.0, []
        if cid == ref:
            matrix, metric = np.eye(4), self_metric
        else:
            fixed_box, moving_box = self._world_box(cid), self._world_box(ref)
            try:
                result = register_affine(self._image(cid), self._image(ref), self.settings,
                                         fixed_box=fixed_box, moving_box=moving_box)
                matrix, metric, shift, iterations = (result.matrix, result.metric, result.search_shift_mm,
                                                     result.iterations)
            except RuntimeError as exc:  # kept explicit: box-centre alignment, quality 0 -> confidence 0
                matrix, metric = np.eye(4), 0.0
                matrix[:3, 3] = moving_box.mean(axis=0) - fixed_box.mean(axis=0)
                status = "failed: " + " ".join(str(exc).split())[-300:]
        return {
            "case": cid, "reference": ref, "status": status,
            "to_reference": np.round(matrix, 10).tolist(),
            "frame": "to_reference maps this case's world RAS mm to the reference case's world RAS mm",
            "metric": metric, "mi_ratio": metric / self_metric if self_metric else 0.0,
            "search_shift_mm": shift, "iterations": iterations, "seconds": time.perf_counter() - t0,
            "settings": asdict(self.settings), "settings_fingerprint": self.settings.fingerprint(),
            "case_fingerprint": self._fingerprint(cid), "reference_fingerprint": self._fingerprint(ref),
        }

    # ---------------------------------------------------------------------------------------- maps
    def record(self, case_id: str) -> dict[str, Any]:
        """The stored registration of ``case_id`` (``CACHE/correspondence/affine/<case>.json``)."""
        if case_id not in self._records:
            path = self.store / f"{case_id}.json"
            hint = "; run `volcontrast correspond CACHE --provider affine`"
            if not path.is_file():
                raise InputError(path, f"no affine correspondence for case {case_id}{hint}")
            record = read_json(path)
            if record.get("reference") != self.reference or \
                    record.get("settings_fingerprint") != self.settings.fingerprint():
                raise InputError(path, f"stale affine correspondence (other reference or settings){hint}")
            record["matrix"] = np.asarray(record["to_reference"], dtype=np.float64)
            record["inverse"] = np.linalg.inv(record["matrix"])
            self._records[case_id] = record
        return self._records[case_id]

    def quality(self, case_id: str) -> float:
        """Registration quality in [0, 1] from the stored mutual-information ratio (0 for a failed one)."""
        record = self.record(case_id)
        if record["status"] != "ok":
            return 0.0
        bad, good = self.quality_ratio
        return float(np.clip((record["mi_ratio"] - bad) / (good - bad), 0.0, 1.0))

    def to_reference(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        return _apply(self.record(case_id)["matrix"], voxel_to_world(self.cache.meta(case_id), voxels))

    def from_reference(self, case_id: str, ref: PointsLike) -> np.ndarray:
        return world_to_voxel(self.cache.meta(case_id), _apply(self.record(case_id)["inverse"], as_points(ref)))

    def confidence(self, case_id: str, voxels: PointsLike) -> np.ndarray:
        """(...) quality × [voxel in the scan's body] × [its reference point in the reference's body]."""
        v = as_points(voxels)
        ref_voxels = world_to_voxel(self.cache.meta(self.reference), self.to_reference(case_id, v))
        return self.quality(case_id) * self._in_body(case_id, v) * self._in_body(self.reference, ref_voxels)
