"""Reading the preprocessing cache written by ``volcontrast prepare`` (memory-mapped, nothing loaded eagerly).

Layout (DESIGN.md): ``CACHE/manifest.json``; per case ``CACHE/cases/<id>/image.npy`` (C, X, Y, Z) float32
in canonical RAS+ axes, ``label.npy`` (X, Y, Z) unsigned int if labelled, ``body.npy`` (X, Y, Z) uint8 body
mask, ``meta.json`` (``affine``, ``spacing``, ``source``, ``body_bbox``, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from volcontrast.errors import InputError
from volcontrast.utils.files import read_json


@dataclass(frozen=True)
class CaseMeta:
    """Geometry of one cached case (all voxel quantities refer to the cached array)."""

    id: str
    affine: np.ndarray  # (4, 4) voxel index -> RAS world mm
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    channels: int
    body_bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # half-open voxel box of the body
    has_label: bool
    crop_offset: tuple[int, int, int]  # cached voxel (0,0,0) is this voxel of the resampled full volume
    resampled_shape: tuple[int, int, int]  # shape of the resampled volume before the body crop
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseMeta:
        return cls(
            id=data["case_id"],
            affine=np.asarray(data["affine"], dtype=np.float64),
            spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
            shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
            channels=int(data.get("channels", 1)),
            body_bbox=tuple((int(a), int(b)) for a, b in data["body_bbox"]),  # type: ignore[arg-type]
            has_label=bool(data.get("has_label", False)),
            crop_offset=tuple(int(v) for v in data.get("crop_offset", (0, 0, 0))),  # type: ignore[arg-type]
            resampled_shape=tuple(int(v) for v in data.get("resampled_shape", data["shape"])),  # type: ignore[arg-type]
            raw=data,
        )


class Cache:
    """A prepared dataset. ``image(id)`` etc. return read-only memory maps."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise InputError(self.root, "not a volcontrast cache (no manifest.json); run `volcontrast prepare` first")
        self.manifest: dict[str, Any] = read_json(manifest_path)
        self.ids: list[str] = list(self.manifest.get("cases", []))
        if not self.ids:
            raise InputError(manifest_path, "the cache holds no prepared cases")
        self._meta: dict[str, CaseMeta] = {}

    # dataset-level facts
    @property
    def modality(self) -> str:
        return str(self.manifest.get("modality", "mr"))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.manifest["spacing"])  # type: ignore[return-value]

    @cached_property
    def label_names(self) -> dict[int, str]:
        names = self.manifest.get("dataset", {}).get("label_names", {})
        return {int(k): str(v) for k, v in names.items()}

    @property
    def num_classes(self) -> int:
        """Number of label values including background (max label + 1)."""
        if self.label_names:
            return max(self.label_names) + 1
        present = [v for cid in self.labelled_ids for v in self.meta(cid).raw.get("labels_present", [])]
        return max(present, default=1) + 1

    @property
    def channels(self) -> int:
        return len(self.manifest.get("dataset", {}).get("channel_names", ["image"]))

    @cached_property
    def labelled_ids(self) -> list[str]:
        return [cid for cid in self.ids if self.meta(cid).has_label]

    def case_dir(self, case_id: str) -> Path:
        """``cases/<id>``, or the folder the manifest's ``case_dirs`` names (a case redone by a rerun)."""
        return self.root / "cases" / str((self.manifest.get("case_dirs") or {}).get(case_id, case_id))

    def meta(self, case_id: str) -> CaseMeta:
        if case_id not in self._meta:
            self._meta[case_id] = CaseMeta.from_json(read_json(self.case_dir(case_id) / "meta.json"))
        return self._meta[case_id]

    def _array(self, case_id: str, name: str, mmap: bool) -> np.ndarray:
        path = self.case_dir(case_id) / name
        if not path.is_file():
            raise InputError(path, "missing from the cache; rerun `volcontrast prepare`")
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except (ValueError, OSError) as exc:
            raise InputError(path, f"corrupt cache array: {exc}") from None

    def image(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """(C, X, Y, Z) float32 normalised intensities."""
        return self._array(case_id, "image.npy", mmap)

    def label(self, case_id: str, mmap: bool = True) -> np.ndarray | None:
        """(X, Y, Z) integer labels, or None for an unlabelled case."""
        return self._array(case_id, "label.npy", mmap) if self.meta(case_id).has_label else None

    def body(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """(X, Y, Z) uint8 body mask."""
        return self._array(case_id, "body.npy", mmap)

    def check_min_size(self, size: tuple[int, ...], case_ids: list[str] | None = None) -> None:
        """Raise InputError naming the first case whose array is smaller than ``size`` on a compared axis.

        ``size`` has 3 entries (3D crops) or 2 (2D slices: compared with X and Y).
        """
        for cid in case_ids or self.ids:
            shape = self.meta(cid).shape
            if any(s < c for s, c in zip(shape, size)):
                raise InputError(
                    self.case_dir(cid) / "image.npy",
                    f"case {cid} has shape {tuple(shape)}, smaller than the requested crop {tuple(size)};"
                    " use a smaller crop or a finer --spacing in prepare",
                )


def open_cache(path: str | os.PathLike) -> Cache:
    return Cache(path)
