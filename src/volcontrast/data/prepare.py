"""``volcontrast prepare``: any accepted dataset -> the preprocessing cache (DESIGN.md contract).

Per case: load in canonical RAS+ -> check label geometry -> resample to the target spacing -> body mask and
box -> crop to it -> normalise -> write ``cases/<id>/{image,label,body}.npy`` + ``meta.json`` (which records
each array's size and sha256) into a temporary folder that is renamed into place when complete. A rerun skips
cases whose fingerprint (sources, settings, dataset statistics) is unchanged *and* whose files still match what
was written; missing or truncated ones are redone. Cases run in parallel worker processes; each holds one volume.

A rerun never damages a good cache: ``manifest.json`` is the commit. A case whose folder the current manifest
uses is redone into a new folder ``cases/<id>@<fingerprint>`` (the manifest's ``case_dirs`` names it), and the
manifest is replaced only when the whole run succeeded; until then the old manifest and its cases stay valid.
The cache folder is locked (``.lock``) for the whole run: a second ``prepare`` on it stops with exit 2.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volcontrast import __version__
from volcontrast.config import from_dict, to_dict
from volcontrast.data.dataset import Case, Dataset, open_dataset
from volcontrast.data.preprocess import (
    CTStats,
    body_mask,
    bounding_box,
    crop_affine,
    ct_stats,
    normalize_ct,
    normalize_zscore,
    resample_grid,
    resample_image,
    resample_label,
    sample_voxels,
)
from volcontrast.errors import InputError
from volcontrast.io.readers import check_same_grid, geometry_mismatch, load_volume, read_geometry
from volcontrast.io.volume import Volume
from volcontrast.utils.files import (
    as_input_error,
    atomic_write_json,
    check_digest,
    claim_folder,
    file_digest,
    read_json,
    release_folder,
    remove_quietly,
    stable_hash,
)

CACHE_FORMAT = 1


@dataclass
class PrepareSettings:
    """What ``prepare`` does; saved in the manifest. ``None`` fields are resolved from the dataset."""

    spacing: tuple[float, float, float] | None = None  # mm; None = median spacing of the dataset
    # "ct" | "mr" per channel, comma-separated ("ct", "mr,mr"); None = from dataset.json or the list's modality
    # column, else detected per case from intensities (a dataset whose cases disagree is an error)
    modality: str | None = None
    image_order: int = 1  # 1 linear, 3 cubic
    label_interpolation: str = "linear"  # "linear" (one-hot linear, nnU-Net) | "nearest"
    ct_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_foreground: str = "auto"  # "label" | "body" | "auto" (label if every case is labelled, else body)
    ct_body_threshold: float = -500.0  # HU
    crop_margin: int = 0  # voxels kept around the body box
    stats_samples_per_case: int = 20000

    def __post_init__(self) -> None:
        if self.modality is not None:
            words = [w.strip().lower() for w in str(self.modality).split(",")]
            bad = [w for w in words if w not in ("ct", "mr")]
            if bad:
                raise InputError("--modality", f"must be ct or mr (one per channel), got {bad[0]!r}")
            self.modality = ",".join(words)
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise InputError("--spacing", f"needs three positive numbers (mm), got {self.spacing}")
        if self.image_order not in (1, 3):
            raise InputError("image_order", "must be 1 (linear) or 3 (cubic)")
        if self.label_interpolation not in ("linear", "nearest"):
            raise InputError("label_interpolation", "must be 'linear' or 'nearest'")
        if self.ct_foreground not in ("auto", "label", "body"):
            raise InputError("ct_foreground", "must be auto, label or body")


@dataclass
class PrepareReport:
    out: Path
    prepared: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> one-line error
    seconds: float = 0.0
    bytes_written: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the dataset at a glance (format_fingerprint)


# ------------------------------------------------------------------------------------------- helpers


def _source_signature(case: Case) -> list[list[Any]]:
    sig = []
    for p in case.sources():
        st = p.stat()
        sig.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return sig


def _load_image(case: Case, ds_channels: int, channels_in_file: int) -> Volume:
    """All channels of a case as one (C, X, Y, Z) volume (separate files or one 4D file)."""
    if channels_in_file > 1:
        vol = load_volume(case.images[0], channels=channels_in_file)
        if vol.array.ndim == 3:
            vol.array = vol.array[None]
        if vol.array.shape[0] != ds_channels:
            raise InputError(case.images[0], f"expected {ds_channels} channels, found {vol.array.shape[0]}")
        return vol
    vols = [load_volume(p) for p in case.images]
    for v in vols[1:]:
        why = geometry_mismatch(vols[0].shape, vols[0].affine, v.shape, v.affine)
        if why:
            raise InputError(v.path, f"channel does not match {vols[0].path}: {why}")
    first = vols[0]
    first.array = np.stack([v.array for v in vols])
    return first


def _load_label(case: Case, image: Volume, label_names: dict[int, str]) -> np.ndarray | None:
    if case.label is None:
        return None
    lab = load_volume(case.label, label=True)
    check_same_grid(Volume(image.array[0], image.affine, path=image.path), lab)
    if label_names:
        extra = sorted(set(np.unique(lab.array).tolist()) - set(label_names))
        if extra:
            raise InputError(
                case.label, f"label values {extra} are not among the dataset's labels {sorted(label_names)}"
            )
    return lab.array


CT_AIR_HU = -500.0  # a CT scan has air: its darkest 1 % lies below this (HU); an MR scan's does not


def _case_darkest(case: Case, ds: Dataset, stats_dir: str) -> float:
    """The 1st intensity percentile of a case's first channel (cached on disk by source signature)."""
    path = Path(stats_dir) / f"{case.id}-p1-{stable_hash(_source_signature(case))}.npy"
    if path.exists():
        return float(np.load(path))
    image = _load_image(case, ds.num_channels, ds.channels_in_file)
    p1 = float(np.percentile(image.array[0], 1))
    _save_quietly(path, np.asarray(p1))
    return p1


def _save_quietly(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a read-only cache: the user's to fix
        remove_quietly(tmp)
        err = as_input_error(exc, path.parent)
        if err is exc:
            raise
        raise err from None


def _resolve_modalities(ds: Dataset, settings: PrepareSettings, good: list[Case], runner: _Runner, stats_dir: str,
                        on_error) -> tuple[list[str], str, list[Case]]:
    """(modality per channel, why it was chosen, the cases still readable). ``--modality`` wins over what the
    dataset says (a list's modality column may not contradict it); else dataset.json's channel names or the
    list's column; else each case's intensities, which must agree."""
    n = ds.num_channels
    listed = {c.id: ds.case_modalities[c.id] for c in good if c.id in ds.case_modalities}
    if settings.modality:
        words = settings.modality.split(",")
        if len(words) != n:
            example = ",".join(["mr"] * n)
            raise InputError("--modality", f"gives {len(words)} value(s) but the dataset has {n} channel(s) "
                                           f"({', '.join(ds.channel_names)}); give one per channel, e.g. {example}")
        clash = next((cid for cid, m in listed.items() if m != words[0]), None)
        if clash is not None:
            raise InputError(ds.root, f"case {clash} is listed as {listed[clash].upper()} but --modality says "
                                      f"{words[0].upper()}")
        return words, "--modality", good
    if ds.modalities:
        return list(ds.modalities), ds.modality_why, good
    todo = [c for c in good if c.id not in listed]
    darkest = runner.map("modality", _case_darkest, todo, ds, stats_dir, on_error=on_error)
    good = [c for c in good if c.id in listed or c.id in darkest]
    if not good:
        raise InputError(ds.root, "no readable cases")
    found = {**{cid: ("ct" if p1 < CT_AIR_HU else "mr") for cid, p1 in darkest.items()}, **listed}
    groups = {m: [c.id for c in good if found[c.id] == m] for m in ("ct", "mr")}
    if groups["ct"] and groups["mr"]:
        def some(ids: list[str]) -> str:
            return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        raise InputError(ds.root, f"cases look like CT ({some(groups['ct'])}) and MR ({some(groups['mr'])}) (CT: "
                                  f"darkest 1 % below {CT_AIR_HU:.0f} HU{', or listed' if listed else ''}); give "
                                  "--modality ct or --modality mr, or split the dataset")
    modality = "ct" if groups["ct"] else "mr"
    where = "below" if modality == "ct" else "above"
    why = f"detected: darkest 1 % {where} {CT_AIR_HU:.0f} HU in all {len(darkest)} case(s)"
    if listed:
        why = (f"{len(listed)} case(s) listed in {ds.root.name}, {len(darkest)} detected (darkest 1 % {where} "
               f"{CT_AIR_HU:.0f} HU)") if darkest else f"{ds.root.name} modality column"
    return [modality] * n, why, good


# ------------------------------------------------------------------------------------ worker functions


def _case_samples(case: Case, ds: Dataset, settings: PrepareSettings, foreground: str,
                  stats_dir: str, channels: tuple[int, ...] = (0,)) -> tuple[str, dict[int, np.ndarray]]:
    """Foreground intensity samples of a case's CT ``channels`` (cached on disk by source signature)."""
    key = stable_hash(
        [_source_signature(case), foreground, settings.ct_body_threshold, settings.stats_samples_per_case]
    )
    paths = {c: Path(stats_dir) / (f"{case.id}-{key}.npy" if c == 0 else f"{case.id}-{key}-c{c}.npy")
             for c in channels}
    if all(p.exists() for p in paths.values()):
        return case.id, {c: np.load(p) for c, p in paths.items()}
    image = _load_image(case, ds.num_channels, ds.channels_in_file)
    label = _load_label(case, image, ds.label_names) if foreground == "label" and case.label is not None else None
    out = {}
    for c, path in paths.items():
        raw = image.array[c]
        mask = label > 0 if label is not None else None
        if mask is None or not mask.any():
            mask = body_mask(raw, "ct", ct_threshold=settings.ct_body_threshold)
        # the draw depends on the case id only, so the same data gives the same statistics wherever it lives
        out[c] = sample_voxels(raw, mask, settings.stats_samples_per_case, seed=int(stable_hash(case.id)[:8], 16))
        _save_quietly(path, out[c])
    return case.id, out


@dataclass
class PreparedCase:
    """One case after preprocessing, in memory (what ``prepare`` writes and ``predict`` feeds the model)."""

    image: np.ndarray  # (C, X, Y, Z) float32, normalised
    label: np.ndarray | None  # (X, Y, Z) or None
    body: np.ndarray  # (X, Y, Z) bool
    meta: dict[str, Any]  # the cache's meta.json fields


def preprocess_case(image: Volume, label: np.ndarray | None, resolved: dict[str, Any]) -> PreparedCase:
    """Resample, find the body, crop to it and normalise one loaded case (``image.array`` is (C, X, Y, Z)).

    ``resolved`` holds the dataset-level decisions: ``settings``, ``spacing``, ``modality``, ``ct_stats``
    (as stored in the cache manifest). Pure: nothing is read or written.
    """
    settings = from_dict(PrepareSettings, resolved["settings"])
    modality = resolved["modality"]  # channel 0's: the body mask
    n_channels = image.array.shape[0]
    modalities = resolved.get("channel_modalities") or [modality] * n_channels
    channel_stats = resolved.get("channel_ct_stats") or [resolved["ct_stats"]] * n_channels
    canonical_shape = image.shape
    grid = resample_grid(canonical_shape, image.affine, tuple(resolved["spacing"]))
    data = resample_image(image.array, grid, order=settings.image_order)
    if label is not None:
        label = resample_label(label, grid, settings.label_interpolation)
    body = body_mask(data[0], modality, ct_threshold=settings.ct_body_threshold)
    box = bounding_box(body, settings.crop_margin)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    lower = tuple(lo for lo, _ in box)
    data = data[(slice(None), *sl)]
    body = body[sl]
    label = label[sl] if label is not None else None
    affine = crop_affine(grid.affine, lower)  # type: ignore[arg-type]
    intensity = []
    for c in range(data.shape[0]):
        if modalities[c] == "ct" and channel_stats[c] is not None:
            data[c] = normalize_ct(data[c], CTStats(**channel_stats[c]))
            intensity.append({"scheme": "ct", **channel_stats[c]})
        else:
            data[c], mean, std = normalize_zscore(data[c], body)
            intensity.append({"scheme": "zscore-body", "mean": mean, "std": std})
    meta = {
        "affine": affine.tolist(),
        "spacing": [float(s) for s in resolved["spacing"]],
        "shape": [int(s) for s in data.shape[1:]],
        "channels": int(data.shape[0]),
        "body_bbox": [[int(lo), int(hi)] for lo, hi in bounding_box(body)],
        "has_label": label is not None,
        "labels_present": sorted(int(v) for v in np.unique(label)) if label is not None else [],
        "crop_offset": [int(v) for v in lower],
        "resampled_shape": [int(v) for v in grid.shape],
        "resampled_affine": grid.affine.tolist(),
        "canonical_shape": [int(v) for v in canonical_shape],
        "canonical_affine": image.affine.tolist(),
        "original_affine": image.original_affine.tolist(),
        "original_shape": [int(v) for v in image.original_shape],
        "original_axcodes": "".join(image.original_axcodes),
        "intensity": intensity,
    }
    return PreparedCase(np.ascontiguousarray(data, dtype=np.float32), label, body, meta)


def _process_case(case: Case, ds: Dataset, resolved: dict[str, Any], out: str, fingerprint: str,
                  dirname: str | None = None) -> tuple[str, int]:
    """Preprocess one case and move its finished folder into ``out/cases/<dirname>`` (default: its id).
    Returns (id, bytes)."""
    try:
        return _process_case_unchecked(case, ds, resolved, out, fingerprint, dirname or case.id)
    except OSError as exc:  # a full disk or a read-only cache: the user's to fix
        err = as_input_error(exc, Path(out) / "cases")
        if err is exc:
            raise
        raise err from None


def _process_case_unchecked(case: Case, ds: Dataset, resolved: dict[str, Any], out: str, fingerprint: str,
                            dirname: str) -> tuple[str, int]:
    image = _load_image(case, ds.num_channels, ds.channels_in_file)
    label = _load_label(case, image, ds.label_names)
    prepared = preprocess_case(image, label, resolved)
    data, body, label = prepared.image, prepared.body, prepared.label
    meta = {
        "case_id": case.id,
        "source": {"images": [str(p) for p in case.images], "label": str(case.label) if case.label else None},
        **prepared.meta,
        "fingerprint": fingerprint,
    }
    cases_dir = Path(out) / "cases"
    tmp = cases_dir / f".tmp-{dirname}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "image.npy", np.ascontiguousarray(data, dtype=np.float32))
        np.save(tmp / "body.npy", np.ascontiguousarray(body, dtype=np.uint8))
        if label is not None:
            np.save(tmp / "label.npy", np.ascontiguousarray(label))
        meta["files"] = {f.name: file_digest(f) for f in sorted(tmp.iterdir()) if f.suffix == ".npy"}
        atomic_write_json(tmp / "meta.json", meta)
    except BaseException:
        remove_quietly(tmp)
        raise
    nbytes = sum(f.stat().st_size for f in tmp.iterdir())
    final = cases_dir / dirname
    if final.exists():
        old = cases_dir / f".old-{dirname}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return case.id, nbytes


# ------------------------------------------------------------------------------------------- driver


class _Runner:
    """Runs a function over cases in-process (workers <= 1) or in a process pool, with a progress bar."""

    def __init__(self, workers: int, progress: bool):
        self.workers = workers
        self.progress = progress

    def map(self, label: str, fn, cases: list[Case], *args, on_error=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        results = {}
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not self.progress, transient=False) as bar:
            task = bar.add_task(label, total=len(cases))
            if self.workers <= 1:
                for case in cases:
                    try:
                        results[case.id] = fn(case, *args)
                    except InputError as exc:
                        on_error(case, exc)
                    bar.advance(task)
                return results
            with ProcessPoolExecutor(max_workers=self.workers) as pool:
                futures: dict[Future, Case] = {pool.submit(fn, case, *args): case for case in cases}
                try:
                    for fut in as_completed(futures):
                        case = futures[fut]
                        try:
                            results[case.id] = fut.result()
                        except InputError as exc:
                            on_error(case, exc)
                        bar.advance(task)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        return results


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


def prepare_dataset(
    data: str | os.PathLike,
    out: str | os.PathLike,
    settings: PrepareSettings | None = None,
    *,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    allow_outside: bool = False,
) -> PrepareReport:
    """Preprocess dataset ``data`` (any accepted layout) into the cache folder ``out``, holding its lock.

    Raises:
        InputError: the first bad case (unless ``skip_bad``): every case finished before it stays in the cache
            (and a cache that was complete before stays as it was); another process is writing ``out``.
    """
    try:
        return _prepare_dataset(data, out, settings, workers=workers, skip_bad=skip_bad, progress=progress,
                                allow_outside=allow_outside)
    finally:
        release_folder(out)


def _prepare_dataset(
    data: str | os.PathLike,
    out: str | os.PathLike,
    settings: PrepareSettings | None,
    *,
    workers: int | None,
    skip_bad: bool,
    progress: bool,
    allow_outside: bool,
) -> PrepareReport:
    t0 = time.perf_counter()
    settings = settings or PrepareSettings()
    out = Path(out)
    ds = open_dataset(data, allow_outside=allow_outside)
    report = PrepareReport(out=out)
    claim_folder(out)  # one writer per cache (released when prepare_dataset returns)
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise as_input_error(exc, out / "cases") from None
    existing = _read_manifest(out)
    committed = existing if existing and existing.get("complete") else None
    in_use = _case_dirs(existing) if existing else set()  # folders the current manifest reads: never rewritten
    for stale in [*(out / "cases").glob(".tmp-*"), *(out / "cases").glob(".old-*"), *out.glob(".tmp-*"),
                  *(out / ".stats").glob(".tmp-*")]:
        remove_quietly(stale)  # left by a killed run (this process holds the lock)
    runner = _Runner(workers if workers is not None else default_workers(), progress)

    def on_error(case: Case, exc: InputError) -> None:
        if not skip_bad:
            raise exc
        report.skipped[case.id] = exc.line()

    # 1. geometry (headers) -> target spacing
    geometries: dict[str, Any] = {}
    for case in ds.cases:
        try:
            geometries[case.id] = read_geometry(case.images[0])
        except InputError as exc:
            on_error(case, exc)
    good = [c for c in ds.cases if c.id in geometries]
    if not good:
        raise InputError(ds.root, "no readable cases")
    spacing = settings.spacing or tuple(float(v) for v in np.median([geometries[c.id].spacing for c in good], axis=0))
    modalities, modality_why, good = _resolve_modalities(ds, settings, good, runner, str(out / ".stats"), on_error)
    modality = modalities[0]

    # 2. dataset intensity statistics (each CT channel)
    channel_stats: list[dict[str, float] | None] = [None] * len(modalities)
    ct_channels = tuple(c for c, m in enumerate(modalities) if m == "ct")
    if ct_channels:
        all_labelled = all(c.labelled for c in good)
        foreground = settings.ct_foreground
        if foreground == "auto":
            foreground = "label" if all_labelled else "body"
        samples = runner.map("statistics", _case_samples, good, ds, settings, foreground, str(out / ".stats"),
                             ct_channels, on_error=on_error)
        good = [c for c in good if c.id in samples]
        if not good:
            raise InputError(ds.root, "no readable cases")
        for ch in ct_channels:
            pooled = np.concatenate([samples[c.id][1][ch] for c in good])
            channel_stats[ch] = to_dict(ct_stats(pooled, settings.ct_percentiles))
    ct = channel_stats[0]
    resolved = {"settings": to_dict(settings), "spacing": list(spacing), "modality": modality, "ct_stats": ct,
                "format": CACHE_FORMAT}
    if len(modalities) > 1:  # one entry per channel (a single channel keeps the older, shorter form)
        resolved["channel_modalities"] = list(modalities)
        resolved["channel_ct_stats"] = channel_stats
    # everything preprocess_case needs to repeat this preprocessing on a new scan (predict)
    settings_hash = stable_hash(resolved)

    manifest: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "volcontrast_version": __version__,
        "versions": _versions(),
        "dataset": {
            "root": str(ds.root),
            "layout": ds.layout,
            "label_names": {str(k): v for k, v in ds.label_names.items()},
            "channel_names": ds.channel_names,
            "modality": modality,
            "modalities": list(modalities),
        },
        "settings": to_dict(settings),
        "resolved": resolved,
        "spacing": list(spacing),
        "modality": modality,
        "ct_stats": ct,
        "settings_hash": settings_hash,
        "complete": False,
        "cases": [],
        "skipped": {},
    }
    fingerprint = _fingerprint(ds, good, geometries, modalities, modality_why, spacing)
    report.fingerprint = manifest["fingerprint"] = fingerprint

    # 3. cases: reuse unchanged ones whose files are intact, process the rest (into a folder that the committed
    # manifest does not use, so that a failure leaves the old cache valid)
    fingerprints = {c.id: stable_hash([settings_hash, _source_signature(c)]) for c in good}
    dirs: dict[str, str] = {}
    todo = []
    for case in good:
        found = _find_case_dir(out / "cases", case.id, fingerprints[case.id])
        if found is not None:
            dirs[case.id] = found
            report.reused.append(case.id)
            continue
        dirs[case.id] = case.id if case.id not in in_use else f"{case.id}@{fingerprints[case.id][:8]}"
        todo.append(case)

    def write_manifest(complete: bool) -> None:
        done = set(report.reused) | set(report.prepared)
        manifest["cases"] = [c.id for c in ds.cases if c.id in done]
        manifest["case_dirs"] = {cid: dirs[cid] for cid in manifest["cases"] if dirs[cid] != cid}
        manifest["skipped"] = dict(report.skipped)
        manifest["complete"] = complete
        fingerprint["cases"] = len(manifest["cases"])
        fingerprint["labelled"] = sum(c.labelled for c in ds.cases if c.id in done)
        fingerprint["skipped"] = len(report.skipped)
        fingerprint["labels_found"] = _labels_found(out / "cases", {cid: dirs[cid] for cid in manifest["cases"]})
        manifest["dataset_fingerprint"] = stable_hash(sorted(fingerprints.values()))
        atomic_write_json(out / "manifest.json", manifest)

    try:
        results = runner.map("prepare", _process_case_entry, todo, ds, resolved, str(out), fingerprints, dirs,
                             on_error=on_error)
    except BaseException:
        if committed is None:
            # a first run: keep every finished case usable (an incomplete manifest), then re-raise
            report.prepared = sorted(
                c.id for c in todo if _case_ok(out / "cases" / dirs[c.id], fingerprints[c.id], hash=False))
            write_manifest(False)
        raise  # else the committed manifest and its cases stay as they were; the finished cases are reused next time
    for cid, (_, nbytes) in results.items():
        report.prepared.append(cid)
        report.bytes_written += nbytes
    write_manifest(True)
    _remove_superseded(out / "cases", {cid: dirs[cid] for cid in manifest["cases"]})
    report.seconds = time.perf_counter() - t0
    return report


def _fingerprint(ds: Dataset, good: list[Case], geometries: dict[str, Any], modalities: list[str], why: str,
                 spacing: tuple[float, ...]) -> dict[str, Any]:
    """The dataset at a glance (nnU-Net's dataset fingerprint, short): stored in the manifest, printed by the CLI."""
    spacings = np.array([geometries[c.id].spacing for c in good], dtype=np.float64)
    shapes = np.array([geometries[c.id].shape for c in good], dtype=np.int64)
    return {
        "source": str(ds.root),
        "layout": ds.layout,
        "cases": len(good),
        "labelled": sum(c.labelled for c in good),
        "skipped": 0,
        "channels": [{"name": name, "modality": m, "why": why} for name, m in zip(ds.channel_names, modalities)],
        "spacing": {"median": [round(float(v), 4) for v in np.median(spacings, axis=0)],
                    "min": [round(float(v), 4) for v in spacings.min(axis=0)],
                    "max": [round(float(v), 4) for v in spacings.max(axis=0)],
                    "target": [round(float(v), 4) for v in spacing]},
        "shape": {"min": [int(v) for v in shapes.min(axis=0)], "max": [int(v) for v in shapes.max(axis=0)]},
        "label_names": {str(k): v for k, v in sorted(ds.label_names.items())},
        "labels_found": [],
    }


def _labels_found(cases: Path, dirs: dict[str, str]) -> list[int]:
    """Label values present in any prepared case (from each case's meta.json)."""
    found: set[int] = set()
    for name in dirs.values():
        try:
            meta = read_json(cases / name / "meta.json")
        except InputError:
            continue
        if isinstance(meta, dict):
            found.update(int(v) for v in meta.get("labels_present") or [])
    return sorted(found)


def format_fingerprint(fp: dict[str, Any]) -> list[str]:
    """The fingerprint as the lines ``prepare`` prints."""
    def axes(values: list, fmt: str = "{:g}") -> str:
        return " x ".join(fmt.format(v) for v in values)

    def ranges(lo: list, hi: list) -> str:
        return " x ".join(f"{a:g}" if a == b else f"{a:g}-{b:g}" for a, b in zip(lo, hi))

    unlabelled = fp["cases"] - fp["labelled"]
    lines = [f"dataset: {fp['cases']} case(s) ({fp['labelled']} labelled, {unlabelled} unlabelled"
             + (f", {fp['skipped']} skipped" if fp.get("skipped") else "") + f"), layout {fp['layout']}"]
    for i, ch in enumerate(fp["channels"]):
        lines.append(f"channel {i} ({ch['name']}): {ch['modality'].upper()} ({ch['why']})")
    sp = fp["spacing"]
    lines.append(f"spacing (mm): median {axes(sp['median'])}, range {ranges(sp['min'], sp['max'])}; "
                 f"resampled to {axes(sp['target'])}")
    lines.append(f"shape (voxels): {ranges(fp['shape']['min'], fp['shape']['max'])}")
    names = fp.get("label_names") or {}
    found = fp.get("labels_found") or []
    shown = ", ".join(f"{k} {v}" for k, v in names.items()) if names else "no names given"
    lines.append(f"labels: {shown}" + (f" (values found: {', '.join(str(v) for v in found)})" if found else ""))
    return lines


def _read_manifest(out: Path) -> dict[str, Any] | None:
    """The cache's current manifest, if readable (a complete one is what a rerun must not break before it
    succeeds)."""
    try:
        manifest = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else None
    except InputError:
        return None
    return manifest if isinstance(manifest, dict) else None


def _case_dirs(manifest: dict[str, Any]) -> set[str]:
    named = manifest.get("case_dirs") or {}
    return {str(named.get(cid, cid)) for cid in manifest.get("cases", [])}


def _case_ok(folder: Path, fingerprint: str, hash: bool = True) -> bool:
    """Whether ``folder`` holds the case prepared with ``fingerprint``, every array as it was written (size and,
    with ``hash``, the sha256 recorded in meta.json)."""
    try:
        meta = read_json(folder / "meta.json") if (folder / "meta.json").is_file() else None
    except InputError:
        return False
    if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
        return False
    files = meta.get("files")
    if not isinstance(files, dict):  # written before digests were recorded: the arrays must at least exist
        names = ["image.npy", "body.npy"] + (["label.npy"] if meta.get("has_label") else [])
        return all((folder / n).is_file() for n in names)
    return all(check_digest(folder / name, digest, hash=hash) is None for name, digest in files.items())


def _find_case_dir(cases: Path, case_id: str, fingerprint: str) -> str | None:
    """The folder (``<id>`` or ``<id>@...``) holding an intact copy of the case with ``fingerprint``, if any."""
    for name in [case_id, f"{case_id}@{fingerprint[:8]}"]:
        if (cases / name).is_dir() and _case_ok(cases / name, fingerprint):
            return name
    return None


def _remove_superseded(cases: Path, dirs: dict[str, str]) -> None:
    """After a successful run: remove the other folders of each case (older versions, ``<id>`` vs ``<id>@...``)."""
    for cid, keep in dirs.items():
        for name in {cid, *(p.name for p in cases.glob(f"{_glob_escape(cid)}@*"))}:
            if name != keep and (cases / name).is_dir():
                shutil.rmtree(cases / name, ignore_errors=True)


def _glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def _process_case_entry(case: Case, ds: Dataset, resolved: dict, out: str, fingerprints: dict[str, str],
                        dirs: dict[str, str]):
    return _process_case(case, ds, resolved, out, fingerprints[case.id], dirs[case.id])


def _versions() -> dict[str, str]:
    import nibabel
    import SimpleITK

    return {"numpy": np.__version__, "nibabel": nibabel.__version__, "SimpleITK": SimpleITK.Version.VersionString()}
