"""Labelled boxes for supervised fine-tuning, with nnU-Net-style foreground oversampling.

``sampler[step]`` returns image boxes and the matching label boxes. With probability ``foreground_prob`` a
crop is centred on a voxel of a randomly chosen foreground class present in the case (class locations are
indexed once, subsampled), otherwise it is placed uniformly. A case smaller than the crop along an axis is
padded, as nnU-Net does: the crop is placed at a random offset that covers the whole case along that axis (image
padded with the case's minimum, labels with background). Like :class:`~volcontrast.views.sampler.BoxSampler`
it is a pure function of (seed, step, rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from volcontrast.views.sampler import StepSampler, cut_box


@dataclass
class LabelSamplerConfig:
    crop_size: tuple[int, ...]
    box_size: tuple[int, ...]
    batch_size: int = 2
    foreground_prob: float = 0.33
    dim: int = 3
    max_locations: int = 5000  # per class and case


def class_locations(label: np.ndarray, max_per_class: int, seed: int) -> dict[int, np.ndarray]:
    """Voxel coordinates (n, 3) of each foreground class, at most ``max_per_class`` each (reproducible)."""
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    flat = np.asarray(label).ravel()
    for value in np.unique(flat):
        if value == 0:
            continue
        idx = np.flatnonzero(flat == value)
        if idx.size > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        out[int(value)] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32)
    return out


def _lower_range(shape: np.ndarray, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Allowed crop origins per axis: ``[0, shape - crop]``, or ``[shape - crop, 0]`` where the case is smaller
    than the crop (the crop then holds the whole axis, padded)."""
    gap = np.asarray(shape) - np.asarray(crop)
    return np.minimum(gap, 0), np.maximum(gap, 0)


def _clip_lower(lower: np.ndarray, shape: np.ndarray, crop: np.ndarray) -> np.ndarray:
    lo, hi = _lower_range(shape, crop)
    return np.clip(lower, lo, hi)


def _uniform_lower(rng: np.random.Generator, shape: np.ndarray, crop: np.ndarray) -> np.ndarray:
    lo, hi = _lower_range(shape, crop)
    return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])


class LabelledBoxSampler(StepSampler):
    """Step-indexed labelled batches: ``boxes`` (B, C, *box), ``label_boxes`` (B, *box) uint8, ``box_lower``
    (B, 3), ``case_index`` (B,)."""

    def __init__(self, cache_root: str | os.PathLike, case_ids: list[str], config: LabelSamplerConfig, *,
                 seed: int = 0, rank: int = 0, steps: int = 1):
        super().__init__(cache_root, case_ids, seed=seed, rank=rank, steps=steps)
        self.config = config
        cache = self.cache
        missing = [cid for cid in self.case_ids if not cache.meta(cid).has_label]
        if missing:
            raise ValueError(f"cases without labels cannot be fine-tuned on: {missing[:5]}")
        self.locations = [class_locations(cache.label(cid), config.max_locations, seed) for cid in self.case_ids]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        cfg = self.config
        rng = np.random.default_rng([self.seed, int(step), self.rank, 0x1AB])
        boxes, labels, lowers, cases = [], [], [], []
        crop = np.asarray(cfg.crop_size)
        margin = (np.asarray(cfg.box_size) - crop) // 2
        for _ in range(cfg.batch_size):
            ci = int(rng.integers(len(self.case_ids)))
            cid = self.case_ids[ci]
            image, label = self.cache.image(cid), self.cache.label(cid)
            shape = np.asarray(image.shape[1:])
            locs = self.locations[ci]
            z = None
            if cfg.dim == 2:
                shape2 = shape[:2]
                if locs and rng.random() < cfg.foreground_prob:
                    pts = locs[list(locs)[int(rng.integers(len(locs)))]]
                    p = pts[int(rng.integers(len(pts)))]
                    z = int(p[2])
                    lo = _clip_lower(p[:2] - crop // 2, shape2, crop)
                else:
                    z = int(rng.integers(shape[2]))
                    lo = _uniform_lower(rng, shape2, crop)
                lo_box = lo - margin
                boxes.append(cut_box(image[..., z], lo_box, cfg.box_size, self.pad_value(cid)))
                labels.append(cut_box(label[None, ..., z], lo_box, cfg.box_size, 0.0)[0])
                lowers.append([lo_box[0], lo_box[1], z])
            else:
                if locs and rng.random() < cfg.foreground_prob:
                    pts = locs[list(locs)[int(rng.integers(len(locs)))]]
                    p = pts[int(rng.integers(len(pts)))]
                    lo = _clip_lower(p - crop // 2, shape, crop)
                else:
                    lo = _uniform_lower(rng, shape, crop)
                lo_box = lo - margin
                boxes.append(cut_box(image, lo_box, cfg.box_size, self.pad_value(cid)))
                labels.append(cut_box(label[None], lo_box, cfg.box_size, 0.0)[0])
                lowers.append(lo_box)
            cases.append(ci)
        return {
            "boxes": np.stack(boxes).astype(np.float32, copy=False),
            "label_boxes": np.stack(labels).astype(np.uint8),
            "box_lower": np.asarray(lowers, dtype=np.int64),
            "case_index": np.asarray(cases, dtype=np.int64),
        }
