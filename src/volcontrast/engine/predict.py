"""``volcontrast predict``: segment new scans with a fine-tuned run; each result is written in its scan's own geometry.

Per scan: load it in canonical RAS+ -> repeat the training data's preprocessing exactly
(:func:`~volcontrast.data.prepare.preprocess_case` with the run's recorded ``preprocessing``: resample to the
target spacing, body crop, normalise) -> sliding-window probabilities on the cropped grid -> back into the
resampled grid (background probability 1 outside the body crop) -> resampled to the canonical grid through
the recorded affines (linear, per class, as nnU-Net does) -> argmax -> written in the stored orientation, axis
order and affine of the scan (``save_volume(..., like=volume)``).

When the run's target spacing equals the scan's spacing nothing is interpolated: a perfect network gives
back the reference label map voxel for voxel.

Run folder contract (written by ``volcontrast finetune``): ``RUN/model.safetensors`` (backbone state dict)
and ``RUN/model.json`` with ``kind: "segmentation"``, ``architecture`` (``Backbone.arch_config()``),
``patch_size``, ``preprocessing`` (the cache manifest's ``resolved``); optional ``channel_names``,
``label_names``. Class index k of the network is written as label value k.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from volcontrast.data.prepare import PreparedCase, preprocess_case
from volcontrast.data.preprocess import resample_grid
from volcontrast.engine.inference import probabilities_to_labels, sliding_window_probabilities
from volcontrast.engine.run import MODEL_FILE, MODEL_JSON, load_weights
from volcontrast.errors import InputError
from volcontrast.io import Volume, load_volume, save_volume, scan_suffix, strip_scan_suffix
from volcontrast.nets import Backbone, build_backbone, load_backbone_state
from volcontrast.utils.files import read_json

SEGMENTATION_KIND = "segmentation"
REQUIRED_KEYS = ("architecture", "patch_size", "preprocessing")
PREPROCESSING_KEYS = ("settings", "spacing", "modality", "ct_stats")
# input suffix -> output suffix (formats we cannot or should not write as they came become NIfTI)
OUTPUT_SUFFIX = {".mgz": ".nii.gz", ".mgh": ".nii.gz", ".nhdr": ".nrrd", ".mhd": ".mha"}

# The seam between preprocessing and the network: (preprocessed case, loaded scan) -> (K, x, y, z)
# probabilities on the case's body-cropped grid (``case.image.shape[1:]``).
Predictor = Callable[[PreparedCase, Volume], "Tensor | np.ndarray"]


# ------------------------------------------------------------------------------------------ the model


def load_segmentation_model(
    run_dir: str | os.PathLike, *, device: torch.device | str | None = None
) -> tuple[Backbone, dict[str, Any]]:
    """The fine-tuned backbone of a segmentation run (eval mode, on ``device``) and its ``model.json``.

    Raises:
        InputError: naming ``model.json`` when the folder is not a segmentation run (e.g. a pretraining run)
            or its fields are missing/invalid; naming ``model.safetensors`` when the weights do not fit.
    """
    run = Path(run_dir)
    json_path = run / MODEL_JSON
    if not run.is_dir():
        raise InputError(run, "run folder not found")
    if not json_path.is_file():
        raise InputError(json_path, "file not found: not a volcontrast run folder")
    model_json = read_json(json_path)
    if not isinstance(model_json, dict):
        raise InputError(json_path, "must hold a JSON object")
    kind = model_json.get("kind")
    if kind != SEGMENTATION_KIND:
        what = f"a {kind!r} run" if kind else "a run without a 'kind'"
        method = f" (method {model_json['method']})" if model_json.get("method") else ""
        raise InputError(
            json_path,
            f"is {what}{method}, not a segmentation run; predict needs a run written by `volcontrast finetune` "
            "(fine-tune a pretraining run first: `volcontrast finetune CACHE --init RUN`)",
        )
    missing = [k for k in REQUIRED_KEYS if model_json.get(k) is None]
    preprocessing = model_json.get("preprocessing")
    if isinstance(preprocessing, dict):
        missing += [f"preprocessing.{k}" for k in PREPROCESSING_KEYS if k not in preprocessing]
    elif preprocessing is not None:
        missing.append("preprocessing (a JSON object)")
    if missing:
        raise InputError(json_path, f"segmentation run lacks {', '.join(missing)}")
    try:
        model = build_backbone(**model_json["architecture"])
        if model_json.get("uafs"):
            from volcontrast.nets.uafs import add_uafs

            add_uafs(model)
    except (InputError, TypeError) as exc:
        problem = exc.problem if isinstance(exc, InputError) else str(exc)
        raise InputError(json_path, f"invalid architecture: {problem}") from None
    try:
        load_backbone_state(model, load_weights(run))
    except RuntimeError as exc:
        raise InputError(run / MODEL_FILE, f"weights do not fit the architecture in {MODEL_JSON}: {exc}") from None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval(), model_json


# ---------------------------------------------------------------------------------------- one volume


def preprocess_scan(
    volume: Volume, preprocessing: dict[str, Any], *, label: np.ndarray | None = None, channels: int | None = None
) -> PreparedCase:
    """:func:`preprocess_case` of a loaded scan with a run's ``preprocessing`` (``volume`` is left unchanged).

    Args:
        volume: canonical scan, ``array`` (X, Y, Z) or (C, X, Y, Z).
        preprocessing: the cache manifest's ``resolved`` dict (``model.json["preprocessing"]``).
        label: optional (X, Y, Z) label map on the volume's canonical grid, preprocessed alongside.
        channels: channels the model expects (checked when given).

    Raises:
        InputError: naming the scan when its channel count differs from ``channels``.
    """
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    if channels is not None and array.shape[0] != channels:
        raise InputError(volume.path, f"the model expects {channels} channel(s), the scan has {array.shape[0]}")
    grid = resample_grid(volume.shape, volume.affine, tuple(preprocessing["spacing"]))
    if grid.is_identity():  # nothing to resample: preprocess_case would normalise the caller's array in place
        array = np.array(array, dtype=np.float32)
    return preprocess_case(dataclasses.replace(volume, array=array), label, preprocessing)


def training_data_mismatch(volume: Volume, preprocessing: dict[str, Any], *, samples: int = 200_000) -> str | None:
    """Why a scan does not look like the model's training data (one line), or None when it does.

    Checks the modality (a CT scan has air below -500 HU in its darkest 1 %, as ``prepare`` guesses it) and, for
    CT, whether the median of the scan's body voxels (above -500 HU) lies within the training data's intensity
    window (``preprocessing.ct_stats``: the clip range of the training foreground), widened by its own width on
    each side. MR models are z-scored per
    scan, so only the modality is checked for them.
    """
    modality = preprocessing.get("modality")
    array = volume.array if volume.array.ndim == 3 else volume.array[0]
    flat = np.asarray(array, dtype=np.float32).ravel()
    if flat.size > samples:  # a fixed, even subsample: fast on large scans and deterministic
        flat = flat[:: flat.size // samples]
    p1 = float(np.percentile(flat, 1))
    looks = "ct" if p1 < -500 else "mr"
    if modality in ("ct", "mr") and looks != modality:
        why = "air below -500 HU" if looks == "ct" else "no air below -500 HU"
        return (f"the model was trained on {modality.upper()} but this scan looks like {looks.upper()} ({why}: 1st "
                f"percentile {p1:.0f}); its segmentation may be meaningless")
    stats = preprocessing.get("ct_stats")
    if modality == "ct" and stats:
        body = flat[flat > -500]
        if body.size:
            median, lo, hi = float(np.median(body)), float(stats["clip_low"]), float(stats["clip_high"])
            width = hi - lo  # the training window is the foreground's; a body median may sit a little outside it
            if not lo - width <= median <= hi + width:
                return (f"the median body intensity {median:.0f} HU is far outside the training data's range "
                        f"{lo:.0f}..{hi:.0f} HU (wrong units or rescale?); its segmentation may be meaningless")
    return None


def canonical_voxel_map(meta: dict[str, Any]) -> np.ndarray:
    """(4, 4) canonical voxel index -> resampled voxel index, from the recorded affines of a prepared case."""
    resampled = np.asarray(meta["resampled_affine"], dtype=np.float64)
    canonical = np.asarray(meta["canonical_affine"], dtype=np.float64)
    return np.linalg.solve(resampled, canonical)


def labels_in_canonical_grid(probs: Tensor | np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Class map on the scan's canonical grid from probabilities on the body-cropped resampled grid.

    Args:
        probs: (K, x, y, z) probabilities on the cropped grid (``meta["shape"]``).
        meta: the prepared case's ``meta`` (``crop_offset``, ``resampled_shape``, ``resampled_affine``,
            ``canonical_shape``, ``canonical_affine``).

    Returns:
        (X, Y, Z) uint8 class indices (``canonical_shape``). Outside the body crop the probabilities are
        background 1; in between, each class is resampled linearly and the largest wins. When the two grids
        coincide (or differ by whole voxels) the cropped argmax is copied without interpolation.
    """
    probs = np.asarray(torch.as_tensor(probs).float().cpu())
    n_classes, crop_shape = probs.shape[0], np.asarray(probs.shape[1:])
    lo = np.asarray(meta["crop_offset"], dtype=int)
    hi = lo + crop_shape
    rshape = np.asarray(meta["resampled_shape"], dtype=int)
    cshape = tuple(int(v) for v in meta["canonical_shape"])
    if (lo < 0).any() or (hi > rshape).any():
        raise ValueError(f"probabilities {tuple(crop_shape)} at {tuple(lo)} do not fit the grid {tuple(rshape)}")
    dtype = np.uint8 if n_classes <= 256 else np.uint16
    labels = np.zeros(cshape, dtype=dtype)
    m = canonical_voxel_map(meta)
    shift = np.rint(m[:3, 3])
    if np.allclose(m[:3, :3], np.eye(3), atol=1e-6) and np.allclose(m[:3, 3], shift, atol=1e-6):
        # same spacing: canonical voxel i is resampled voxel i + shift; copy, no interpolation
        c_lo = np.maximum(lo - shift, 0).astype(int)
        c_hi = np.minimum(hi - shift, cshape).astype(int)
        if (c_hi > c_lo).all():
            src = tuple(slice(a + int(s) - b, c + int(s) - b) for a, c, s, b in zip(c_lo, c_hi, shift, lo))
            labels[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))] = probabilities_to_labels(probs[(slice(None), *src)])
        return labels

    # the resampled grid around the crop (one background voxel of margin where the grid goes on)
    r_lo, r_hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, rshape)
    source = np.zeros((n_classes, *(r_hi - r_lo)), dtype=np.float32)
    source[0] = 1.0
    source[(slice(None), *(slice(a - b, c - b) for a, c, b in zip(lo, hi, r_lo)))] = probs
    # canonical voxels that can see the crop: beyond it (and beyond the margin) everything is background
    big = 1e6
    box_lo = np.where(lo > 0, lo - 1, -big)
    box_hi = np.where(hi < rshape, hi, big)
    corners = np.array([[(box_lo, box_hi)[(c >> a) & 1][a] for a in range(3)] for c in range(8)])
    inverse = np.linalg.inv(m)
    canon = (corners - m[:3, 3]) @ inverse[:3, :3].T
    c_lo = np.clip(np.floor(canon.min(axis=0)), 0, cshape).astype(int)
    c_hi = np.clip(np.ceil(canon.max(axis=0)) + 1, 0, cshape).astype(int)
    if not (c_hi > c_lo).all():
        return labels
    out_shape = tuple(int(v) for v in c_hi - c_lo)
    matrix = m[:3, :3]
    offset = matrix @ c_lo + m[:3, 3] - r_lo
    if np.allclose(matrix, np.diag(np.diag(matrix)), atol=1e-9):
        matrix = np.diag(matrix)  # scipy's fast path for axis-aligned scaling
    best = np.full(out_shape, -1.0, dtype=np.float32)
    sub = np.zeros(out_shape, dtype=dtype)
    for k in range(n_classes):
        p = ndimage.affine_transform(source[k], matrix, offset=offset, output_shape=out_shape, order=1,
                                     mode="nearest", prefilter=False)
        better = p > best
        sub[better] = k
        np.maximum(best, p, out=best)
    labels[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))] = sub
    return labels


def predict_volume(
    model: Backbone | None,
    model_json: dict[str, Any],
    volume: Volume,
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    predictor: Predictor | None = None,
) -> np.ndarray:
    """Segment one loaded scan: (X, Y, Z) uint8 class indices on the volume's *canonical* grid.

    Args:
        model: the fine-tuned backbone (may be None when ``predictor`` is given).
        model_json: the run's ``model.json`` (``patch_size``, ``preprocessing``, ``architecture``).
        volume: the scan as :func:`~volcontrast.io.load_volume` returns it; not modified.
        overlap, batch_size, device: passed to :func:`sliding_window_probabilities`.
        predictor: replaces the network: ``predictor(case, volume)`` returns (K, x, y, z) probabilities on
            ``case.image``'s grid (tests inject an oracle here).
    """
    channels = model_json.get("architecture", {}).get("in_channels")
    case = preprocess_scan(volume, model_json["preprocessing"], channels=channels)
    if predictor is not None:
        probs = predictor(case, volume)
    elif model is not None:
        probs = sliding_window_probabilities(model, case.image, model_json["patch_size"], overlap=overlap,
                                             batch_size=batch_size, device=device)
    else:
        raise ValueError("predict_volume needs a model or a predictor")
    if tuple(probs.shape[1:]) != tuple(case.image.shape[1:]):
        raise ValueError(f"probabilities of shape {tuple(probs.shape)} for a cropped image {case.image.shape}")
    return labels_in_canonical_grid(probs, case.meta)


# ------------------------------------------------------------------------------------------ many scans


def segmentation_path(scan: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``out_dir/<scan stem>_seg<suffix>``: NIfTI, NRRD and MHA keep their format; DICOM folders and MGZ become
    ``.nii.gz``; detached-header NHDR/MHD become single-file ``.nrrd``/``.mha``."""
    scan = Path(scan)
    if scan.is_dir():
        return Path(out_dir) / f"{scan.name}_seg.nii.gz"
    suffix = scan_suffix(scan)
    out_suffix = OUTPUT_SUFFIX.get(suffix, suffix) or ".nii.gz"
    return Path(out_dir) / f"{strip_scan_suffix(scan.name)}_seg{out_suffix}"


def _plan_outputs(scans: Sequence[Path], out_dir: Path) -> list[Path]:
    """Output path per scan; refuses to overwrite an input or to write two results to one file."""
    inputs = {s.resolve(): s for s in scans}
    seen: dict[Path, Path] = {}
    targets = []
    for scan in scans:
        if not scan.exists():
            raise InputError(scan, "file not found")
        target = segmentation_path(scan, out_dir)
        key = target.resolve()
        if key in inputs:
            raise InputError(target, f"writing the segmentation of {scan} would overwrite an input scan; "
                                     "choose another --out folder")
        if key in seen:
            raise InputError(scan, f"its segmentation would overwrite that of {seen[key]} ({target.name}); "
                                   "rename one scan or predict them into different folders")
        seen[key] = scan
        targets.append(target)
    return targets


def predict_scans(
    run_dir: str | os.PathLike,
    scans: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
    predictor: Predictor | None = None,
) -> list[Path]:
    """Segment each scan with the run's model and write ``<stem>_seg<suffix>`` files into ``out_dir``.

    Each result is a uint8 label map in the scan's own stored geometry (orientation, axis order, affine) and,
    where possible, its format (see :func:`segmentation_path`). Every file is written atomically, so the
    results finished before a bad scan stay complete.

    Args:
        run_dir: a segmentation run folder (``volcontrast finetune``).
        scans: NIfTI/NRRD/MHA/MGZ files or DICOM series folders (a model with C > 1 channels needs
            C-channel 4D files).
        out_dir: output folder (created).
        overlap, batch_size, device: sliding-window settings (device default: CUDA if available).
        progress: print one line per finished scan (stderr). A scan that does not look like the training data
            (:func:`training_data_mismatch`) gets one ``warning: SCAN: ...`` line on stderr in any case.
        predictor: replaces the network (see :func:`predict_volume`).

    Returns:
        the written paths, in the order of ``scans``.

    Raises:
        InputError: one line naming the file: not a segmentation run, a missing/unreadable/non-3D scan,
            a wrong channel count, or an output that would overwrite an input.
    """
    scan_paths = [Path(s) for s in scans]
    if not scan_paths:
        raise InputError("SCAN", "no scans given")
    out = Path(out_dir)
    targets = _plan_outputs(scan_paths, out)
    model, model_json = load_segmentation_model(run_dir, device=device)
    channels = model.in_channels
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    written = []
    for i, (scan, target) in enumerate(zip(scan_paths, targets), start=1):
        t0 = time.perf_counter()
        volume = load_volume(scan, channels=channels if channels > 1 else None)
        mismatch = training_data_mismatch(volume, model_json["preprocessing"])
        if mismatch:
            print(f"warning: {scan}: {mismatch}", file=sys.stderr, flush=True)
        labels = predict_volume(model, model_json, volume, overlap=overlap, batch_size=batch_size, device=device,
                                predictor=predictor)
        out.mkdir(parents=True, exist_ok=True)
        written.append(save_volume(target, labels, volume.affine, like=volume))
        if console is not None:
            present = ", ".join(str(v) for v in np.unique(labels) if v)
            console.print(
                f"[{i}/{len(scan_paths)}] {scan.name} -> {target}  {'x'.join(map(str, volume.original_shape))} "
                f"{''.join(volume.original_axcodes)}, labels [{present or 'none'}], {time.perf_counter() - t0:.1f} s",
                highlight=False, markup=False,
            )
    return written
