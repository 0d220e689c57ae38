"""CPU side of the view pipeline: cut boxes out of memory-mapped cached volumes, nothing else.

A sampler is a map-style dataset indexed by the **training step**: ``sampler[step]`` returns the whole batch
of boxes for that step, drawn with ``np.random.default_rng([seed, step, rank])``. Data order is therefore a
pure function of (seed, step, rank): a resumed run sees exactly the batches an uninterrupted run would have,
and DataLoader workers (``batch_size=None``) prefetch whole steps in parallel.

Each loaded volume gives several boxes (``crops_per_volume``) so one page-cache read is amortised over many
crops. A box is larger than the final crop (``box_size`` >= ``crop_size``) to leave room for the rotation and
scaling done later on the training device (:mod:`volcontrast.views.augment`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from volcontrast.data.cache import Cache


def cut_box(array: np.ndarray, lower: np.ndarray, size: tuple[int, ...], pad_value: float,
            out: np.ndarray | None = None) -> np.ndarray:
    """``array[..., lower:lower+size]`` over the last ``len(size)`` axes, padding outside with ``pad_value``.

    ``out`` (float32, ``array.shape[:-nd] + size``, e.g. one row of a preallocated batch) receives the box
    instead of a new array: one copy from the memory map, and the padding fill only for boxes that leave it.
    """
    nd = len(size)
    spatial = array.shape[-nd:]
    shape = array.shape[:-nd] + tuple(size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    src, dst = [], []
    for lo, n, dim in zip(lower, size, spatial):
        a, b = max(int(lo), 0), min(int(lo) + n, dim)
        if b <= a:
            out.fill(pad_value)
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(lo), b - int(lo)))
    if any(s.start != 0 or s.stop != n for s, n in zip(dst, size)):
        out.fill(pad_value)
    lead = (slice(None),) * (array.ndim - nd)
    out[(*lead, *dst)] = array[(*lead, *src)]
    return out


def batch_buffer(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | torch.Tensor]:
    """A float32 batch to fill in place: ``(array to write into, object to return)``.

    In a DataLoader worker the buffer is a tensor already in shared memory, so handing it to the main process
    costs no copy (the DataLoader would otherwise copy every returned array into shared memory; what it yields
    is a tensor either way). Elsewhere it is a plain NumPy array.
    """
    if torch.utils.data.get_worker_info() is not None:
        t = torch.empty(shape, dtype=torch.float32).share_memory_()
        return t.numpy(), t
    a = np.empty(shape, dtype=np.float32)
    return a, a


@dataclass
class BoxSamplerConfig:
    """How boxes are drawn for one step."""

    crop_size: tuple[int, ...]  # final view size (3 values for 3D, 2 for 2D)
    box_size: tuple[int, ...]  # box cut on the CPU (>= crop_size): context for device-side augmentation
    volumes_per_batch: int = 2
    crops_per_volume: int = 4
    dim: int = 3  # 3: crops; 2: axial slices (paper parity)
    pad_small: bool = False  # 3D: a scan smaller than the crop on an axis is centred and padded (VoCo regions)


class StepSampler(torch.utils.data.Dataset):
    """Base of the step-indexed samplers: ``len`` = number of steps, and a lazily opened :class:`Cache`
    per process (DataLoader workers reopen their own memory maps instead of pickling them)."""

    def __init__(self, cache_root: str | os.PathLike, case_ids: list[str], *, seed: int, rank: int, steps: int):
        self.root = Path(cache_root)
        self.case_ids = list(case_ids)
        self.seed, self.rank, self.steps = int(seed), int(rank), int(steps)
        self._cache: Cache | None = None
        self._pad: dict[str, float] = {}

    def pad_value(self, case_id: str) -> float:
        """The case's minimum intensity (air / background), read once per process, used outside the volume."""
        if case_id not in self._pad:
            self._pad[case_id] = float(np.min(self.cache.image(case_id)))
        return self._pad[case_id]

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = Cache(self.root)
        return self._cache

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __len__(self) -> int:
        return self.steps


class BoxSampler(StepSampler):
    """Step-indexed batches of boxes from cached volumes.

    ``sampler[step]`` -> dict of arrays:
        ``boxes``: (M, C, *box_size) float32, M = volumes_per_batch * crops_per_volume;
        ``box_lower``: (M, 3) int64, cached voxel index of the box's first voxel (2D: (x0, y0, z));
        ``case_index``: (M,) int64, index into ``case_ids``;
        ``crop_lower``: (M, 3) int64, cached voxel index where the *unaugmented* crop would start.
    """

    def __init__(self, cache_root: str | os.PathLike, case_ids: list[str], config: BoxSamplerConfig, *,
                 seed: int = 0, rank: int = 0, steps: int = 1):
        if len(config.crop_size) != config.dim or len(config.box_size) != config.dim:
            raise ValueError(f"crop_size and box_size need {config.dim} values")
        if any(b < c for b, c in zip(config.box_size, config.crop_size)):
            raise ValueError("box_size must be >= crop_size on every axis")
        super().__init__(cache_root, case_ids, seed=seed, rank=rank, steps=steps)
        self.config = config
        # check sizes once, in the main process (clear error naming the case)
        if not config.pad_small:
            self.cache.check_min_size(config.crop_size, self.case_ids)

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), self.rank, 0x5A3])

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        cfg = self.config
        rng = self.rng(step)
        n = len(self.case_ids)
        volumes = rng.choice(n, size=cfg.volumes_per_batch, replace=n < cfg.volumes_per_batch)
        box_lower, crop_lower, case_index = [], [], []
        boxes: np.ndarray | None = None  # (M, C, *box) filled in place: no per-box array, no stacking copy
        handed: np.ndarray | torch.Tensor | None = None
        i = 0
        for v in volumes:
            cid = self.case_ids[int(v)]
            image = self.cache.image(cid)
            shape = np.asarray(image.shape[1:])
            pad_value = self.pad_value(cid)
            if boxes is None:
                m = cfg.volumes_per_batch * cfg.crops_per_volume
                boxes, handed = batch_buffer((m, image.shape[0], *cfg.box_size))
            for _ in range(cfg.crops_per_volume):
                if cfg.dim == 3:
                    lo_crop = np.array([rng.integers(0, s - c + 1) if s >= c else (s - c) // 2
                                        for s, c in zip(shape, cfg.crop_size)])
                    lo_box = lo_crop - (np.asarray(cfg.box_size) - np.asarray(cfg.crop_size)) // 2
                    cut_box(image, lo_box, cfg.box_size, pad_value, out=boxes[i])
                    lower3 = lo_box
                    crop3 = lo_crop
                else:
                    z = int(rng.integers(0, shape[2]))
                    lo_crop = np.array([rng.integers(0, s - c + 1) for s, c in zip(shape[:2], cfg.crop_size)])
                    lo_box = lo_crop - (np.asarray(cfg.box_size) - np.asarray(cfg.crop_size)) // 2
                    cut_box(image[..., z], lo_box, cfg.box_size, pad_value, out=boxes[i])
                    lower3 = np.array([lo_box[0], lo_box[1], z])
                    crop3 = np.array([lo_crop[0], lo_crop[1], z])
                i += 1
                box_lower.append(lower3)
                crop_lower.append(crop3)
                case_index.append(int(v))
        return {
            "boxes": handed,
            "box_lower": np.asarray(box_lower, dtype=np.int64),
            "crop_lower": np.asarray(crop_lower, dtype=np.int64),
            "case_index": np.asarray(case_index, dtype=np.int64),
        }


def box_size_for(crop_size: tuple[int, ...], context: float) -> tuple[int, ...]:
    """Box size giving ``context`` x the crop (rounded up to even extra margins)."""
    out = []
    for c in crop_size:
        extra = int(np.ceil(c * (context - 1.0) / 2.0)) * 2
        out.append(c + max(extra, 0))
    return tuple(out)
