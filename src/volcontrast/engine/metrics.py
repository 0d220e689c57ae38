"""Segmentation metrics per case and class: Dice and HD95 (mm), computed with MONAI.

Definitions (the numbers every table in volcontrast reports):

- **Dice** = 2|P∩T| / (|P|+|T|) for the binary masks P (prediction == class) and T (truth == class),
  from :func:`monai.metrics.compute_dice`.
- **HD95** (mm) = symmetric 95th-percentile Hausdorff distance from
  :func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95`` and the voxel spacing. MONAI takes
  the *edge voxels* of each mask (voxels of the mask with a 6-/4-connected neighbour outside it, or on the
  image border), measures the Euclidean distance in mm between voxel centres from every edge voxel of one
  mask to the nearest edge voxel of the other, takes the 95th percentile (linear interpolation) of each
  direction and reports the larger of the two.

Empty masks (:data:`NAN_RULE`): MONAI itself returns Dice 0 / HD95 NaN (the percentile of +inf distances)
for an empty prediction of a present class, and Dice NaN / HD95 NaN for a predicted class that is absent from
the truth. We replace that with one explicit rule:

- class absent from both truth and prediction → Dice NaN, HD95 NaN; NaN entries are skipped by
  :func:`aggregate` (nanmean) and counted.
- class present in exactly one of them (a missed organ, or a hallucinated one) → Dice 0 and HD95 = the
  diagonal of the image's field of view in mm, ``sqrt(Σ (n_i · s_i)²)`` for shape ``n`` and spacing ``s``:
  a finite worst case, larger than any distance measurable inside the image. A NaN here would be silently
  skipped by the mean and *reward* a model that misses an organ entirely.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from volcontrast.errors import InputError

NAN_RULE = (
    "NaN rule: a class absent from both prediction and truth gets Dice = NaN and HD95 = NaN and is skipped "
    "(nanmean); a class present in only one of them gets Dice = 0 and HD95 = the image's field-of-view "
    "diagonal in mm (finite worst case). HD95 = symmetric 95th percentile of edge-voxel distances in mm (MONAI)."
)

CaseMetrics = dict[int, dict[str, float]]
"""Per class label: ``{"dice": float, "hd95": float (mm)}``."""


def _as_labels(a: np.ndarray, what: str, where: str | None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise InputError(where, f"{what} must hold integer labels, got non-integer values ({a.dtype})")
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise InputError(where, f"{what} must be an integer label array, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise InputError(where, f"{what} has negative labels (min {int(a.min())})")
    return a


def field_of_view_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image box in mm, ``sqrt(Σ (n_i · s_i)²)``; the HD95 given to a one-sided class."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, ...],
    classes: list[int] | None = None,
    *,
    where: str | None = None,
) -> dict[int, dict[str, float]]:
    """Dice and HD95 (mm) per foreground class of one case.

    Args:
        pred: predicted label map, ``(X, Y[, Z])`` integer (bool, or integral floats, are accepted).
        truth: ground-truth label map of the same shape.
        spacing: voxel size in mm per axis, ``len(spacing) == pred.ndim``.
        classes: foreground labels to score; default ``1 .. max(pred.max(), truth.max())`` (empty dict when
            both are all background). A listed class absent from both gets NaN.
        where: name of the case / file, used in error messages.

    Returns:
        ``{label: {"dice": float in [0, 1] or NaN, "hd95": float mm or NaN}}`` following :data:`NAN_RULE`.

    Raises:
        InputError: shape mismatch, wrong spacing length, non-positive spacing, non-integer or negative labels.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = _as_labels(pred, "prediction", where)
    t = _as_labels(truth, "truth", where)
    if p.shape != t.shape:
        raise InputError(where, f"prediction shape {p.shape} differs from truth shape {t.shape}")
    if p.ndim not in (2, 3):
        raise InputError(where, f"expected a 2D or 3D label map, got {p.ndim} dimensions {p.shape}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != p.ndim:
        raise InputError(where, f"spacing {sp} has {len(sp)} values for a {p.ndim}D label map")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(where, f"spacing must be positive mm values, got {sp}")
    if classes is None:
        top = int(max(p.max(initial=0), t.max(initial=0)))
        classes = list(range(1, top + 1))
    for c in classes:
        if int(c) != c or c < 1:
            raise InputError(where, f"classes must be positive integer labels, got {c!r}")

    worst = field_of_view_diagonal(p.shape, sp)
    out: dict[int, dict[str, float]] = {}
    for c in sorted({int(c) for c in classes}):
        pm, tm = p == c, t == c
        in_pred, in_truth = bool(pm.any()), bool(tm.any())
        if not in_pred and not in_truth:
            out[c] = {"dice": math.nan, "hd95": math.nan}
            continue
        if in_pred != in_truth:
            out[c] = {"dice": 0.0, "hd95": worst}
            continue
        # one channel of the one-hot encoding, (B=1, C=1, *spatial)
        yp = torch.from_numpy(pm)[None, None].double()
        yt = torch.from_numpy(tm)[None, None].double()
        dice = compute_dice(yp, yt, include_background=True)
        with warnings.catch_warnings():  # MONAI's own deprecated internal call (get_mask_edges), not ours
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
            hd95 = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=sp)
        out[c] = {"dice": float(dice[0, 0]), "hd95": float(hd95[0, 0])}
    return out


def _nanmean(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def aggregate(per_case: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, Any]:
    """Means over cases and classes, skipping NaN entries (see :data:`NAN_RULE`).

    Args:
        per_case: ``{case_id: segmentation_metrics(...)}``. A class missing from a case's dict counts as NaN.

    Returns:
        A dict with

        - ``classes``: sorted labels seen in any case; ``n_cases``.
        - ``per_class``: ``{label: {"dice", "hd95" (mm), "n_dice", "n_hd95"}}``, nanmean over cases and the
          number of non-NaN values that went into it.
        - ``per_case``: ``{case_id: {"dice", "hd95"}}``, nanmean over that case's classes.
        - ``mean_dice``, ``mean_hd95``: **nanmean over classes within each case, then nanmean over cases**
          (a case whose classes are all NaN is skipped).
        - ``n_nan``: ``{"dice": int, "hd95": int}`` NaN entries among the case × class cells;
          ``n_entries``: number of case × class cells.
        - ``nan_rule``: :data:`NAN_RULE`.
    """
    classes = sorted({int(c) for m in per_case.values() for c in m})
    case_means: dict[str, dict[str, float]] = {}
    per_class_vals: dict[int, dict[str, list[float]]] = {c: {"dice": [], "hd95": []} for c in classes}
    n_nan = {"dice": 0, "hd95": 0}
    for case_id in sorted(per_case):
        m = per_case[case_id]
        row: dict[str, list[float]] = {"dice": [], "hd95": []}
        for c in classes:
            entry = m.get(c, {})
            for key in ("dice", "hd95"):
                v = float(entry.get(key, math.nan))
                row[key].append(v)
                per_class_vals[c][key].append(v)
                n_nan[key] += math.isnan(v)
        case_means[case_id] = {k: _nanmean(v) for k, v in row.items()}
    per_class = {
        c: {
            "dice": _nanmean(v["dice"]),
            "hd95": _nanmean(v["hd95"]),
            "n_dice": int(np.sum(~np.isnan(v["dice"]))),
            "n_hd95": int(np.sum(~np.isnan(v["hd95"]))),
        }
        for c, v in per_class_vals.items()
    }
    return {
        "classes": classes,
        "n_cases": len(per_case),
        "per_class": per_class,
        "per_case": case_means,
        "mean_dice": _nanmean([m["dice"] for m in case_means.values()]),
        "mean_hd95": _nanmean([m["hd95"] for m in case_means.values()]),
        "n_nan": n_nan,
        "n_entries": len(per_case) * len(classes),
        "nan_rule": NAN_RULE,
    }


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as ``None`` and dict keys as strings, for strict JSON (``metrics.json``)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(v: float, digits: int) -> str:
    return "NaN" if math.isnan(v) else f"{v:.{digits}f}"


def format_metrics_table(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]],
    label_names: Mapping[int, str] | None = None,
    digits: int = 3,
) -> str:
    """Markdown table: one row per case × class (Dice, HD95 in mm), then per-class and overall means.

    Args:
        per_case: ``{case_id: segmentation_metrics(...)}``.
        label_names: optional ``{label: name}`` shown next to the label number.
        digits: decimals for Dice; HD95 (mm) gets 2 decimals.

    Returns:
        The table followed by a line with the number of NaN entries and :data:`NAN_RULE`.
    """
    names = dict(label_names or {})
    agg = aggregate(per_case)

    def cls(c: int) -> str:
        return f"{c} ({names[c]})" if c in names else str(c)

    lines = ["| case | class | Dice | HD95 (mm) |", "|---|---|---:|---:|"]
    for case_id in sorted(per_case):
        for c in agg["classes"]:
            e = per_case[case_id].get(c, {})
            d, h = float(e.get("dice", math.nan)), float(e.get("hd95", math.nan))
            lines.append(f"| {case_id} | {cls(c)} | {_fmt(d, digits)} | {_fmt(h, 2)} |")
    for c in agg["classes"]:
        e = agg["per_class"][c]
        lines.append(f"| **mean** (n={e['n_dice']}) | {cls(c)} | {_fmt(e['dice'], digits)} | {_fmt(e['hd95'], 2)} |")
    lines.append(f"| **mean** ({agg['n_cases']} cases) | all | {_fmt(agg['mean_dice'], digits)} "
                 f"| {_fmt(agg['mean_hd95'], 2)} |")
    lines.append("")
    lines.append(f"Overall mean = nanmean over classes per case, then over cases. NaN entries: "
                 f"{agg['n_nan']['dice']} Dice, {agg['n_nan']['hd95']} HD95 of {agg['n_entries']}.")
    lines.append(NAN_RULE)
    return "\n".join(lines) + "\n"
