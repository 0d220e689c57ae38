"""How well a correspondence provider matches anatomy across scans, measured on landmarks in mm.

For an ordered pair of scans (A, B) and a landmark present in both, the landmark's world position in A
(``landmarks/<A>.json``, as written by ``volcontrast synth``) goes to A's cached voxel coordinates (inverse
of A's cached affine), into the reference frame (``to_reference``), into B's cached voxel coordinates
(``from_reference``) and to world mm through B's cached affine; the error is the distance to the landmark's
true world position in B. :func:`landmark_error` reports the provider next to the slice-index baseline
(:class:`~volcontrast.spatial.correspondence.IndexProvider`, PCL's positions) on the same pairs and landmarks.

:func:`correspond` is what ``volcontrast correspond CACHE --provider NAME [--landmarks DIR]`` runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from volcontrast.data.cache import Cache
from volcontrast.errors import InputError
from volcontrast.spatial.correspondence import (
    CorrespondenceProvider,
    FitReport,
    get_provider,
    voxel_to_world,
    world_to_voxel,
)
from volcontrast.utils.files import atomic_write_json, read_json

__all__ = ["correspond", "landmark_error", "load_landmarks"]

Landmarks = dict[str, dict[str, tuple[np.ndarray, bool]]]  # case -> name -> (world mm (3,), in field of view)


def load_landmarks(landmarks_dir: str | os.PathLike, case_ids: list[str]) -> Landmarks:
    """Read ``landmarks_dir/<case>.json`` for the cases that have one.

    Raises:
        InputError: the folder does not exist, a file is malformed, or fewer than two cases have landmarks.
    """
    folder = Path(landmarks_dir)
    if not folder.is_dir():
        raise InputError(folder, "landmarks folder not found")
    out: Landmarks = {}
    for cid in case_ids:
        path = folder / f"{cid}.json"
        if not path.is_file():
            continue
        data = read_json(path)
        try:
            out[cid] = {name: (np.asarray(v["world_mm"], dtype=np.float64).reshape(3), bool(v.get("in_fov", True)))
                        for name, v in data["landmarks"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(path, f"malformed landmarks file ({exc!r}); expected "
                                   '{"landmarks": {name: {"world_mm": [x, y, z], "in_fov": bool}}}') from None
    if len(out) < 2:
        raise InputError(folder, f"landmarks for {len(out)} of the cache's cases found (<case>.json); need 2 or more")
    return out


def _summary(errors: np.ndarray) -> dict[str, float]:
    if errors.size == 0:
        return {"median_mm": float("nan"), "p90_mm": float("nan"), "mean_mm": float("nan")}
    return {"median_mm": float(np.median(errors)), "p90_mm": float(np.percentile(errors, 90)),
            "mean_mm": float(errors.mean())}


def _pairs(case_ids: list[str], pairs: str | int, seed: int) -> list[tuple[str, str]]:
    every = [(a, b) for a in case_ids for b in case_ids if a != b]
    if pairs == "all":
        return every
    if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
        raise InputError("pairs", f"must be 'all' or a positive integer, got {pairs!r}")
    if pairs >= len(every):
        return every
    pick = np.sort(np.random.default_rng(seed).choice(len(every), size=pairs, replace=False))
    return [every[i] for i in pick]


def landmark_error(cache: Cache, provider: CorrespondenceProvider | str, landmarks_dir: str | os.PathLike, *,
                   pairs: str | int = "all", only_in_fov: bool = True, seed: int = 0) -> dict[str, Any]:
    """Landmark transfer error (mm) of ``provider`` and of the slice-index baseline over pairs of cached scans.

    Args:
        cache: the prepared cache (the provider must be fitted on it).
        provider: a provider or its name (e.g. ``"body"``).
        landmarks_dir: folder of ``<case>.json`` landmark files (world RAS mm, the frame of the scans' affines).
        pairs: ``"all"`` ordered pairs (A, B), A != B, or that many of them drawn with ``seed``.
        only_in_fov: use a landmark only if it is inside the field of view of both A and B.

    Returns:
        ``{"provider", "units", "cases", "pairs", "landmarks" (compared points), "error": {median_mm, p90_mm,
        mean_mm}, "index_baseline": {...}, "per_landmark_median_mm": {name: mm}}``.
    """
    if isinstance(provider, str):
        provider = get_provider(provider, cache)
    baseline = get_provider("index", cache)
    marks = load_landmarks(landmarks_dir, cache.ids)
    ids = [cid for cid in cache.ids if cid in marks]
    chosen = _pairs(ids, pairs, seed)
    errors: dict[str, list[np.ndarray]] = {"provider": [], "index": []}
    names_used: list[str] = []
    for a, b in chosen:
        names = [n for n, (_, fov) in marks[a].items()
                 if n in marks[b] and (not only_in_fov or (fov and marks[b][n][1]))]
        if not names:
            continue
        truth = np.stack([marks[b][n][0] for n in names])
        voxels_a = world_to_voxel(cache.meta(a), np.stack([marks[a][n][0] for n in names]))
        for key, prov in (("provider", provider), ("index", baseline)):
            voxels_b = prov.from_reference(b, prov.to_reference(a, voxels_a))
            errors[key].append(np.linalg.norm(voxel_to_world(cache.meta(b), voxels_b) - truth, axis=-1))
        names_used.extend(names)
    err = {k: np.concatenate(v) if v else np.zeros(0) for k, v in errors.items()}
    per_landmark: dict[str, float] = {}
    for name in dict.fromkeys(names_used):
        per_landmark[name] = float(np.median(err["provider"][np.asarray(names_used) == name]))
    return {
        "provider": provider.name, "units": provider.units, "cases": len(ids),
        "pairs": len(chosen), "landmarks": int(err["provider"].size), "only_in_fov": only_in_fov,
        "error": _summary(err["provider"]), "index_baseline": _summary(err["index"]),
        "per_landmark_median_mm": per_landmark,
    }


def _dense_map_seconds(provider: CorrespondenceProvider, cache: Cache, case_id: str) -> float:
    """Seconds to map every voxel of one cached scan to the reference frame (a full coordinate map)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in cache.meta(case_id).shape), indexing="ij"), axis=-1)
    t0 = time.perf_counter()
    provider.to_reference(case_id, grid.reshape(-1, 3))
    return time.perf_counter() - t0


def correspond(cache_dir: str | os.PathLike, provider: str = "body", landmarks: str | os.PathLike | None = None,
               progress: bool = True, **options: Any) -> dict[str, Any]:
    """Fit ``provider`` on the cache (stored there), time it, and measure landmark errors if ``landmarks`` given.

    Writes ``CACHE/correspondence/<provider>/report.json`` (fit timing, and the landmark errors of the provider
    and of the slice-index baseline) and, with ``progress``, prints a table. ``options`` go to the provider
    (e.g. ``settings=AffineSettings(...)`` for ``affine``).

    Raises:
        InputError: not a cache, unknown provider, or a missing/malformed landmarks folder (checked before fitting).
    """
    cache = Cache(cache_dir)
    prov = get_provider(provider, cache, **options)
    if landmarks is not None:
        load_landmarks(landmarks, cache.ids)  # fail fast, before a long fit
    t0 = time.perf_counter()
    fit: FitReport = prov.fit(progress=progress)
    # per registered scan (the reference's own identity record takes no registration)
    seconds = np.asarray([t for cid, t in fit.computed.items() if cid != fit.reference], dtype=np.float64)
    report: dict[str, Any] = {
        "provider": prov.name, "units": prov.units, "cache": str(cache.root), "cases": len(cache.ids),
        "reference": fit.reference, "computed": len(fit.computed), "reused": len(fit.reused), "failed": fit.failed,
        "fit_seconds": time.perf_counter() - t0,
        "seconds_per_scan": None if not seconds.size else {  # of the cases computed in this run
            "mean": float(seconds.mean()), "median": float(np.median(seconds)), "max": float(seconds.max())},
        "dense_map_seconds": _dense_map_seconds(prov, cache, cache.ids[0]),
    }
    if landmarks is not None:
        report["landmark_error"] = landmark_error(cache, prov, landmarks)
    atomic_write_json(prov.store / "report.json", report)
    if progress:
        _print_report(report)
    return report


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    per = report["seconds_per_scan"]
    timing = f"{per['mean'] * 1000:.1f} ms/scan mean, {per['max'] * 1000:.1f} ms max" if per else "nothing to do"
    reference = f", reference {report['reference']}" if report["reference"] else ""
    console.print(f"[bold]{report['provider']}[/] correspondences for {report['cases']} cases "
                  f"({report['computed']} computed, {report['reused']} reused{reference}): {timing}")
    for cid, why in report["failed"].items():
        console.print(f"[yellow]warning[/]: {cid}: registration {why} (confidence 0)")
    if "landmark_error" not in report:
        return
    le = report["landmark_error"]
    table = Table(title=f"landmark error over {le['pairs']} scan pairs, {le['landmarks']} landmarks (mm)")
    for col in ("positions", "median", "90th pct", "mean"):
        table.add_column(col, justify="left" if col == "positions" else "right")
    for label, row in (("slice index (PCL)", le["index_baseline"]), (report["provider"], le["error"])):
        table.add_row(label, *(f"{row[k]:.1f}" for k in ("median_mm", "p90_mm", "mean_mm")))
    console.print(table)
