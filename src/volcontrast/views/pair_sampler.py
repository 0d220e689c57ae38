"""Cross-scan view mining for Alice: pairs of boxes, one per scan, centred on anatomically corresponding points.

``sampler[step]`` returns ``pairs_per_batch`` pairs. For each pair a candidate is drawn as

1. case A and a different case B, uniformly among ``case_ids``;
2. a tissue point in A: a voxel drawn uniformly from A's body mask, plus a uniform jitter in [-0.5, 0.5) per
   axis so points are continuous (cached voxel coordinates, axis order X, Y, Z);
3. its match in B through the correspondence provider (:func:`~volcontrast.spatial.correspondence.map_points`).

A candidate is **rejected** (counted, and a whole new candidate drawn: A, its point and B) when the match's
confidence is below ``min_confidence`` or the matched point lies outside B's array. Nothing is ever accepted
silently: when ``max_tries`` candidates in a row are rejected for one pair, :class:`InputError` is raised
(the provider is unfitted, failed, or the threshold is too strict). Redrawing A as well means a scan whose
provider confidence is 0 everywhere (e.g. a failed affine registration) is simply never paired, instead of
stopping training whenever it is drawn.

Each accepted pair gives two boxes (``box_size`` >= ``crop_size``: context for the rotations and scalings done
later on the training device, :mod:`volcontrast.views.augment`) centred on the rounded points:
``lower = round(point) - box_size // 2``; outside the scan a box is padded with the case's minimum intensity.

Like every :class:`~volcontrast.views.sampler.StepSampler` the batch is a pure function of (seed, step, rank)
(``np.random.default_rng([seed, step, rank, tag])``). Per process, the sampler opens its own cache and builds
its own provider (by name, so it pickles into DataLoader workers), and indexes each case's body voxels once
(at most :data:`MAX_BODY_POINTS`, subsampled with a generator seeded by (seed, case index), so every process
sees the same list). Per step the only volume work is slicing the boxes out of the memory maps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from volcontrast.errors import InputError
from volcontrast.spatial.correspondence import CorrespondenceProvider, get_provider, map_points
from volcontrast.views.sampler import StepSampler, cut_box

__all__ = ["MAX_BODY_POINTS", "CrossScanPairSampler", "PairSamplerConfig"]

MAX_BODY_POINTS = 200_000  # body voxels indexed per case and process (uniform subsample beyond that)
_STEP_TAG = 0xA11CE  # stream tag of the per-step generator
_INDEX_TAG = 0xB0D7  # stream tag of the body-voxel subsample


@dataclass
class PairSamplerConfig:
    """How cross-scan pairs are mined for one step."""

    crop_size: tuple[int, ...]  # final view size (3 values)
    box_size: tuple[int, ...]  # box cut on the CPU (>= crop_size): context for device-side augmentation
    pairs_per_batch: int = 4
    provider: str = "body"  # correspondence provider name (get_provider)
    min_confidence: float = 0.5  # matches below this are rejected
    max_tries: int = 50  # candidates per pair before giving up with an InputError


class CrossScanPairSampler(StepSampler):
    """Step-indexed batches of anatomically matched box pairs from two different scans (Alice's views).

    ``sampler[step]`` -> dict of NumPy arrays, P = ``pairs_per_batch``:
        ``boxes_a``, ``boxes_b``: (P, C, *box_size) float32;
        ``box_lower_a``, ``box_lower_b``: (P, 3) int64, cached voxel index of each box's first voxel;
        ``case_a``, ``case_b``: (P,) int64, indices into ``case_ids`` (never equal);
        ``point_a``, ``point_b``: (P, 3) float64, the matched points in cached voxel coordinates;
        ``confidence``: (P,) float64, the provider's confidence of each match (>= ``min_confidence``);
        ``rejected``: () int64, candidates rejected in this step; ``tries``: () int64, candidates drawn.

    Raises (constructor):
        InputError: fewer than two distinct cases, unknown case ids, a case smaller than ``crop_size``, an
            unknown provider, or a provider whose stored data is missing (e.g. ``affine`` not fitted).
        ValueError: malformed ``config`` (sizes, counts, threshold).
    """

    def __init__(self, cache_root: str | os.PathLike, case_ids: list[str], config: PairSamplerConfig, *,
                 seed: int = 0, rank: int = 0, steps: int = 1):
        _check_config(config)
        super().__init__(cache_root, case_ids, seed=seed, rank=rank, steps=steps)
        self.config = config
        self._provider: CorrespondenceProvider | None = None
        self._points: dict[int, np.ndarray] = {}  # case index -> flat indices of (subsampled) body voxels
        cache = self.cache
        if len(set(self.case_ids)) < 2:
            raise InputError(self.root, f"cross-scan pairs need at least 2 distinct cases, got "
                                        f"{len(set(self.case_ids))}")
        if len(set(self.case_ids)) != len(self.case_ids):
            raise InputError(self.root, "case ids for cross-scan pairs must be distinct")
        unknown = [cid for cid in self.case_ids if cid not in cache.ids]
        if unknown:
            raise InputError(self.root / "manifest.json", f"unknown case id(s): {', '.join(unknown[:5])}")
        cache.check_min_size(config.crop_size, self.case_ids)
        # fail early, in the main process, with the provider's own error (unknown name, not fitted, stale, ...)
        provider = self.provider
        for cid in self.case_ids:
            provider.to_reference(cid, np.zeros((1, 3)))

    # ------------------------------------------------------------------------------------ per process
    @property
    def provider(self) -> CorrespondenceProvider:
        """The correspondence provider, built from its name once per process on this process's cache."""
        if self._provider is None:
            self._provider = get_provider(self.config.provider, self.cache)
        return self._provider

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_provider"] = None  # rebuilt (with its memory maps) in the worker
        state["_points"] = {}
        return state

    def body_points(self, case_index: int) -> np.ndarray:
        """Flat indices into the (X, Y, Z) array of case ``case_index``'s body voxels (sorted, at most
        :data:`MAX_BODY_POINTS`, the same in every process)."""
        if case_index not in self._points:
            cid = self.case_ids[case_index]
            flat = np.flatnonzero(np.asarray(self.cache.body(cid)).ravel())
            if flat.size == 0:
                raise InputError(self.cache.case_dir(cid) / "body.npy", f"case {cid} has an empty body mask; "
                                                                         "no tissue point can be drawn")
            if flat.size > MAX_BODY_POINTS:
                rng = np.random.default_rng([self.seed, case_index, _INDEX_TAG])
                flat = np.sort(rng.choice(flat, size=MAX_BODY_POINTS, replace=False))
            self._points[case_index] = flat.astype(np.int64 if flat.max() >= 2**31 else np.int32)
        return self._points[case_index]

    # ----------------------------------------------------------------------------------------- steps
    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), self.rank, _STEP_TAG])

    def _draw(self, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
        """One candidate: (case A, case B != A, continuous tissue point of A)."""
        n = len(self.case_ids)
        a = int(rng.integers(n))
        b = int(rng.integers(n - 1))
        b += b >= a
        shape = self.cache.meta(self.case_ids[a]).shape
        points = self.body_points(a)
        voxel = np.asarray(np.unravel_index(int(points[rng.integers(points.size)]), shape), dtype=np.float64)
        return a, b, voxel + rng.random(3) - 0.5

    def _match(self, step: int, pair: int, rng: np.random.Generator) -> tuple[int, int, np.ndarray, np.ndarray,
                                                                              float, int]:
        """Draw candidates until one is accepted: (a, b, point_a, point_b, confidence, rejected)."""
        cfg = self.config
        for tries in range(cfg.max_tries):
            a, b, point_a = self._draw(rng)
            cid_a, cid_b = self.case_ids[a], self.case_ids[b]
            dst, conf = map_points(self.provider, cid_a, point_a[None], cid_b)
            point_b, confidence = dst[0], float(conf[0])
            voxel_b = np.rint(point_b)
            inside = bool(np.all((voxel_b >= 0) & (voxel_b < np.asarray(self.cache.meta(cid_b).shape))))
            if inside and np.isfinite(confidence) and confidence >= cfg.min_confidence:
                return a, b, point_a, point_b, confidence, tries
        raise InputError(self.root, f"no confident match found after {cfg.max_tries} tries with provider "
                                    f"{cfg.provider!r} (confidence >= {cfg.min_confidence}, pair {pair} of step "
                                    f"{step}); lower min_confidence or fit the provider "
                                    f"(`volcontrast correspond CACHE --provider {cfg.provider}`)")

    def _box(self, case_index: int, point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cid = self.case_ids[case_index]
        size = np.asarray(self.config.box_size, dtype=np.int64)
        lower = np.rint(point).astype(np.int64) - size // 2
        return cut_box(self.cache.image(cid), lower, self.config.box_size, self.pad_value(cid)), lower

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        rng = self.rng(step)
        rows: list[tuple[int, int, np.ndarray, np.ndarray, float]] = []
        rejected = 0
        for pair in range(self.config.pairs_per_batch):
            a, b, point_a, point_b, confidence, failed = self._match(step, pair, rng)
            rows.append((a, b, point_a, point_b, confidence))
            rejected += failed
        out: dict[str, list] = {k: [] for k in ("boxes_a", "boxes_b", "box_lower_a", "box_lower_b")}
        for a, b, point_a, point_b, _ in rows:
            for side, case, point in (("a", a, point_a), ("b", b, point_b)):
                box, lower = self._box(case, point)
                out[f"boxes_{side}"].append(box)
                out[f"box_lower_{side}"].append(lower)
        return {
            "boxes_a": np.stack(out["boxes_a"]).astype(np.float32, copy=False),
            "boxes_b": np.stack(out["boxes_b"]).astype(np.float32, copy=False),
            "box_lower_a": np.asarray(out["box_lower_a"], dtype=np.int64),
            "box_lower_b": np.asarray(out["box_lower_b"], dtype=np.int64),
            "case_a": np.asarray([r[0] for r in rows], dtype=np.int64),
            "case_b": np.asarray([r[1] for r in rows], dtype=np.int64),
            "point_a": np.asarray([r[2] for r in rows], dtype=np.float64),
            "point_b": np.asarray([r[3] for r in rows], dtype=np.float64),
            "confidence": np.asarray([r[4] for r in rows], dtype=np.float64),
            "rejected": np.asarray(rejected, dtype=np.int64),
            "tries": np.asarray(rejected + len(rows), dtype=np.int64),
        }


def _check_config(config: PairSamplerConfig) -> None:
    if len(config.crop_size) != 3 or len(config.box_size) != 3:
        raise ValueError("crop_size and box_size need 3 values")
    if any(int(c) < 1 for c in config.crop_size):
        raise ValueError(f"crop_size must be positive, got {tuple(config.crop_size)}")
    if any(b < c for b, c in zip(config.box_size, config.crop_size)):
        raise ValueError("box_size must be >= crop_size on every axis")
    if int(config.pairs_per_batch) < 1:
        raise ValueError(f"pairs_per_batch must be >= 1, got {config.pairs_per_batch}")
    if int(config.max_tries) < 1:
        raise ValueError(f"max_tries must be >= 1, got {config.max_tries}")
    if not 0.0 <= float(config.min_confidence) <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {config.min_confidence}")
