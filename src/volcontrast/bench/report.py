"""Benchmark results: an append-only, per-case ``results.csv``, paired statistics, ``results.md`` and a plot.

``results.csv`` schema — one row per **test case** of a finished cell run (method, label budget, fold, seed) and
per scored point of fine-tuning (``at``):

============== ===== ===================================================================================
column         type  meaning
============== ===== ===================================================================================
method         str   pretraining method (``scratch`` for none), with variants/dimension, e.g. ``pcl+pdcr@2d``
labeled        int   label budget M: **every** labelled volume the run saw (training + validation)
val            int   how many of the M were validation volumes used for checkpoint choice (0 = none)
fold           int   test fold index (``data.splits.Split.fold``)
seed           int   seed of the label draw and of fine-tuning
at             float share of the fine-tuning steps done when scored (1.0 = the end; e.g. 0.1, 0.3)
step           int   the fine-tuning step scored
case           str   test case id
dice           float Dice of this case, nanmean over its foreground classes (``engine.metrics`` NaN rule)
hd95           float HD95 (mm) of this case, same aggregation
n_test         int   test cases scored for this cell and point (a cell is finished when all are written)
checkpoint     str   the weights scored: ``last``, ``best`` (validation choice) or ``step<N>`` (a snapshot)
lr             float base learning rate of the run (scratch: its own, see ``lr_sweep.json``)
train_dice     float training Dice at the end (mean over the last 10% of the logged steps)
converged      float 1 when the training Dice is flat over the last 20% of the steps (:func:`training_converged`)
pretrain_run   str   run folder of the pretrained checkpoint ("" from scratch)
finetune_run   str   run folder of the fine-tuned model
seconds        float wall-clock seconds of the cell (fine-tuning + evaluation)
pool           str   pretraining pool: ``fold`` (training-fold images only) or ``transductive``
dice_<name>    float per-class Dice of this case (``<name>`` = label name)
============== ===== ===================================================================================

A cell's rows are appended with one ``write`` (the final point last); a torn last line is skipped on reading and
its cell counts as unfinished (a resumed benchmark runs it again; for a repeated (cell, at, case) the later row
wins).

**Paired statistics.** A method is compared with scratch (``scratch`` of the same dimension) on the *same* test
cases of the same fold, seed and labelled draw: d = Dice(method) − Dice(scratch) per (fold, seed, case). The
report shows mean d, a percentile bootstrap 95% CI of the mean over those units (:func:`bootstrap_ci`, seeded
and deterministic), wins/losses (units with d > 0 / d < 0) and a verdict (:func:`gain_label`): a *gain* only
when the CI lies above 0.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volcontrast.engine.metrics import NAN_RULE
from volcontrast.errors import InputError
from volcontrast.utils.files import atomic_save, atomic_write_text, read_json

REQUIRED_COLUMNS = ("method", "labeled", "fold", "seed", "case", "dice")
STANDARD_COLUMNS = ("method", "labeled", "val", "fold", "seed", "at", "step", "case", "dice", "hd95", "n_test",
                    "checkpoint", "lr", "train_dice", "converged", "pretrain_run", "finetune_run", "seconds", "pool")
INT_COLUMNS = frozenset({"labeled", "val", "fold", "seed", "step", "n_test"})
FLOAT_COLUMNS = frozenset({"dice", "hd95", "at", "lr", "train_dice", "converged", "seconds"})
BOOTSTRAP = 2000  # resamples of the paired-difference CI
BOOTSTRAP_SEED = 0
CONVERGE_TOL = 0.02  # training Dice may move at most this much over the last 20% of the steps

Cell = tuple[str, int, int, int, int]
"""(method, labeled, val, fold, seed)."""
Budget = tuple[int, int]
"""(labeled = M, val)."""


def _is_float_column(name: str) -> bool:
    return name in FLOAT_COLUMNS or name.startswith(("dice_", "hd95_"))


def _format_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # full precision; NaN -> 'nan'
    return str(v)


def _read_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
    header = next(csv.reader([first]), [])
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing == ["case"]:
        raise InputError(path, "a results.csv of an older volcontrast (one row per cell, no per-case Dice); "
                               "move it (and its runs/ folder) away to rerun under the current protocol")
    if missing:
        raise InputError(path, f"not a volcontrast results.csv: header lacks {', '.join(missing)}")
    return header


def append_results(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append ``rows`` to ``path`` with one ``write`` (the file is created with its header if missing or empty).

    Raises:
        InputError: a required column is missing from a row, or a row has a column the existing header lacks.
    """
    p = Path(path)
    if not rows:
        return
    for row in rows:
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise InputError(p, f"result row lacks required column(s) {', '.join(missing)}")
    new = not p.exists() or p.stat().st_size == 0
    if new:
        header = [*STANDARD_COLUMNS, *dict.fromkeys(k for r in rows for k in r if k not in STANDARD_COLUMNS)]
    else:
        header = _read_header(p)
    extra = sorted({k for r in rows for k in r if k not in header})
    if extra:
        raise InputError(p, f"result row has column(s) {', '.join(extra)} that the existing header lacks")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if new:
        writer.writerow(header)
    for row in rows:
        writer.writerow([_format_value(row.get(c)) for c in header])
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as f:
        f.seek(0, os.SEEK_END)
        prefix = b""
        if f.tell() > 0:  # a torn last line (crash mid-write) must not swallow these rows
            f.seek(-1, os.SEEK_END)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
        f.write(prefix + buf.getvalue().encode())
        f.flush()
        os.fsync(f.fileno())


def append_result(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one row (see :func:`append_results`)."""
    append_results(path, [row])


def _parse(name: str, text: str) -> Any:
    if name in INT_COLUMNS:
        if text == "" and name not in REQUIRED_COLUMNS:
            return 0
        return int(text)
    if _is_float_column(name):
        return float(text) if text != "" else math.nan
    return text


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All well-formed rows of a results.csv, typed (ints, floats with NaN for empty, strings).

    Malformed rows (wrong number of fields, unparsable numbers: a torn last line) are skipped with a warning
    naming the file and line. Rows without ``at`` count as the end of fine-tuning (1.0).

    Raises:
        InputError: the file is missing or its header is not a results.csv header.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "results file not found")
    header = _read_header(p)
    rows = []
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        for values in reader:
            line = reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                warnings.warn(f"{p}:{line}: skipped a row with {len(values)} fields (header has {len(header)})",
                              stacklevel=2)
                continue
            try:
                row = {name: _parse(name, v) for name, v in zip(header, values)}
            except ValueError as exc:
                warnings.warn(f"{p}:{line}: skipped an unreadable row ({exc})", stacklevel=2)
                continue
            row.setdefault("val", 0)
            if math.isnan(row.get("at", math.nan)):
                row["at"] = 1.0
            rows.append(row)
    return rows


def _cell(row: Mapping[str, Any]) -> Cell:
    return (str(row["method"]), int(row["labeled"]), int(row.get("val", 0)), int(row["fold"]), int(row["seed"]))


def finished_cells(path: str | os.PathLike) -> set[Cell]:
    """(method, labeled, val, fold, seed) of every cell whose final point (``at`` = 1) has all ``n_test`` cases;
    empty when the file does not exist yet."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return set()
    cases: dict[Cell, set[str]] = {}
    need: dict[Cell, int] = {}
    for r in read_results(p):
        if float(r["at"]) != 1.0:
            continue
        cases.setdefault(_cell(r), set()).add(str(r["case"]))
        need[_cell(r)] = int(r.get("n_test") or 0)
    return {c for c, ids in cases.items() if len(ids) >= need[c]}


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per (cell, at, case) (the last one written), in first-appearance order."""
    by_key: dict[tuple, Mapping[str, Any]] = {}
    for r in rows:
        by_key[(*_cell(r), float(r.get("at", 1.0)), str(r["case"]))] = r
    return list(by_key.values())


def budget_label(budget: Budget) -> str:
    """``M=3`` or, with validation volumes, ``M=3 (2 val)``."""
    m, val = budget
    return f"M={m}" + (f" ({val} val)" if val else "")


def _methods_and_budgets(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[Budget]]:
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    budgets = sorted({(int(r["labeled"]), int(r.get("val", 0))) for r in rows})
    return methods, budgets


def unit_values(rows: Iterable[Mapping[str, Any]], method: str, budget: Budget, at: float = 1.0,
                metric: str = "dice") -> dict[tuple[int, int, str], float]:
    """``{(fold, seed, case): value}`` of ``metric`` for one method and budget at point ``at``."""
    out = {}
    for r in rows:
        if (str(r["method"]) == method and (int(r["labeled"]), int(r.get("val", 0))) == budget
                and math.isclose(float(r.get("at", 1.0)), at)):
            out[(int(r["fold"]), int(r["seed"]), str(r["case"]))] = float(r[metric])
    return out


CellStats = dict[tuple[str, Budget], tuple[float, float, int]]
"""``{(method, budget): (mean, std, n_runs)}``."""


def cell_stats(rows: Iterable[Mapping[str, Any]], metric: str = "dice", at: float = 1.0) -> CellStats:
    """``{(method, (M, val)): (mean, std, n)}`` of ``metric`` at point ``at``.

    ``mean``: nanmean over every test case × fold × seed (the units of the paired statistics); ``std``: std
    (ddof=1) of the per-run means (one run = fold × seed), NaN when fewer than 2 runs; ``n``: runs with a value.
    """
    rows = latest_rows(rows)
    methods, budgets = _methods_and_budgets(rows)
    out: CellStats = {}
    for method in methods:
        for b in budgets:
            vals = unit_values(rows, method, b, at, metric)
            if not vals:
                continue
            runs: dict[tuple[int, int], list[float]] = {}
            for (fold, seed, _), v in vals.items():
                runs.setdefault((fold, seed), []).append(v)
            a = np.asarray(list(vals.values()), dtype=float)
            run_means = np.asarray([np.nanmean(v) if np.any(~np.isnan(v)) else np.nan for v in runs.values()])
            run_means = run_means[~np.isnan(run_means)]
            mean = float(np.nanmean(a)) if np.any(~np.isnan(a)) else math.nan
            std = float(run_means.std(ddof=1)) if run_means.size > 1 else math.nan
            out[(method, b)] = (mean, std, int(run_means.size))
    return out


def summary_table(rows: Sequence[Mapping[str, Any]], metric: str = "dice", digits: int | None = None,
                  at: float = 1.0) -> str:
    """Markdown table: one row per method, one column per budget (``M=<n>``, ``M=<n> (<v> val)``).

    Cells read ``mean ± std (n)`` (:func:`cell_stats`: mean over test cases × folds × seeds, std over runs, n runs);
    ``mean (1)`` for a single run, ``—`` where a method has no result. ``digits``: 3 for Dice, 2 for HD95 (mm).
    """
    digits = digits if digits is not None else (3 if metric == "dice" else 2)
    rows = latest_rows(rows)
    stats = cell_stats(rows, metric, at)
    methods, budgets = _methods_and_budgets(rows)
    lines = ["| method | " + " | ".join(budget_label(b) for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for method in methods:
        cells = []
        for b in budgets:
            mean, std, n = stats.get((method, b), (math.nan, math.nan, 0))
            if n == 0:
                cells.append("—")
            elif n == 1:
                cells.append(f"{mean:.{digits}f} (1)")
            else:
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} ({n})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ paired statistics


def baseline_of(method: str, methods: Iterable[str]) -> str | None:
    """The scratch run a method is paired with, the first present of: scratch with the same fine-tuning variants
    and dimension (``pcl+frozen@2d`` -> ``scratch+frozen@2d``), scratch with the same dimension, ``scratch``;
    None for scratch itself or when no scratch was run."""
    head, _, dim = method.partition("@")
    name, *variants = head.split("+")
    if name == "scratch":
        return None
    suffix = f"@{dim}" if dim else ""
    for candidate in ("+".join(["scratch", *variants]) + suffix, "scratch" + suffix, "scratch"):
        if candidate in set(methods):
            return candidate
    return None


def _paired_keys(a: Mapping[tuple, float], b: Mapping[tuple, float]) -> list[tuple]:
    """Units present in both with a value in both, sorted (the order the bootstrap resamples)."""
    return [k for k in sorted(set(a) & set(b)) if not (math.isnan(a[k]) or math.isnan(b[k]))]


def _paired_record(a: Mapping[tuple, float], b: Mapping[tuple, float], n_boot: int, seed: int) -> dict[str, Any]:
    """Paired statistics of ``a − b`` over their common (fold, seed, case) units: ``mean_a``, ``mean_b`` (over those
    units), ``diff``, ``lo``/``hi`` (:func:`bootstrap_ci`), ``wins``/``losses``, ``n``, ``folds``, ``seeds``,
    ``verdict``."""
    keys = _paired_keys(a, b)
    d = np.asarray([a[k] - b[k] for k in keys], dtype=float)
    lo, hi = bootstrap_ci(d, n_boot, seed)
    means = [float(np.mean([v[k] for k in keys])) if keys else math.nan for v in (a, b)]
    return {"mean_a": means[0], "mean_b": means[1], "diff": float(d.mean()) if d.size else math.nan, "lo": lo,
            "hi": hi, "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "n": int(d.size),
            "folds": sorted({k[0] for k in keys}), "seeds": sorted({k[1] for k in keys}),
            "verdict": gain_label(lo, hi)}


def bootstrap_ci(d: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(d)``: ``n_boot`` resamples of the units with replacement, drawn as
    ``np.random.default_rng(seed).integers(0, n, (n_boot, n))``; (NaN, NaN) for fewer than 2 units."""
    d = np.asarray(d, dtype=float)
    if d.size < 2:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def gain_label(lo: float, hi: float) -> str:
    """``gain`` when the CI lies above 0, ``loss`` when below, ``no clear difference`` when it holds 0, ``n/a``
    when there is no CI."""
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if lo > 0:
        return "gain"
    if hi < 0:
        return "loss"
    return "no clear difference"


def paired_stats(rows: Sequence[Mapping[str, Any]], at: float = 1.0, metric: str = "dice",
                 n_boot: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> list[dict[str, Any]]:
    """One record per (non-scratch method, budget) with a scratch baseline: ``method``, ``budget``,
    ``baseline``, ``mean`` (the method's, over all its units), and :func:`_paired_record`'s ``diff`` (mean paired
    difference), ``lo``/``hi`` (bootstrap CI), ``wins``/``losses`` (units with d > 0 / < 0), ``n`` (units),
    ``folds``, ``seeds`` (of the paired units), ``verdict``."""
    rows = latest_rows(rows)
    methods, budgets = _methods_and_budgets(rows)
    stats = cell_stats(rows, metric, at)
    out = []
    for method in methods:
        base = baseline_of(method, methods)
        if base is None:
            continue
        for b in budgets:
            if (method, b) not in stats:
                continue
            rec = _paired_record(unit_values(rows, method, b, at, metric), unit_values(rows, base, b, at, metric),
                                 n_boot, seed)
            out.append({"method": method, "budget": b, "baseline": base, "mean": stats[(method, b)][0], **rec})
    return out


def _diff_cells(r: Mapping[str, Any], digits: int) -> str:
    """The table cells both paired tables end with: Δ, CI, wins / losses, n (one fold marked), verdict."""
    ci = "—" if math.isnan(r["lo"]) else f"[{r['lo']:+.{digits}f}, {r['hi']:+.{digits}f}]"
    scope = " (one fold)" if len(r["folds"]) == 1 else ""
    return (f"{r['diff']:+.{digits}f} | {ci} | {r['wins']} / {r['losses']} | {r['n']}{scope} | "
            f"{r['verdict']} |")


def paired_table(records: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """Markdown table of :func:`paired_stats` records."""
    lines = ["| method | budget | mean Dice | Δ vs scratch | 95% CI | wins / losses | n (cases × folds × seeds) "
             "| verdict |", "|---|---|---:|---:|---|---:|---:|---|"]
    for r in records:
        lines.append(f"| {r['method']} | {budget_label(r['budget'])} | {r['mean']:.{digits}f} | "
                     + _diff_cells(r, digits))
    return "\n".join(lines) + "\n"


def verdict_sentences(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One plain sentence per record: the difference, its CI and whether it is beyond noise."""
    out = []
    for r in records:
        scope = f"fold {r['folds'][0]} only" if len(r["folds"]) == 1 else f"{len(r['folds'])} folds"
        if r["verdict"] == "n/a":
            out.append(f"{r['method']} at {budget_label(r['budget'])}: too few paired cases for a CI.")
            continue
        reading = {"gain": "a gain beyond noise (the CI excludes 0)",
                   "loss": "worse than scratch beyond noise (the CI excludes 0)",
                   "no clear difference": "within noise (the CI includes 0): not a gain"}[r["verdict"]]
        caveat = ("" if len(r["seeds"]) > 1 and len(r["folds"]) > 1 else
                  " With one fold or one seed this CI holds the test cases' variation, not the training run's: "
                  "rerun with more folds and seeds before calling it a result.")
        out.append(f"{r['method']} at {budget_label(r['budget'])}: {r['diff']:+.3f} Dice vs {r['baseline']} "
                   f"(95% CI {r['lo']:+.3f} to {r['hi']:+.3f}; {r['n']} paired test cases, {scope}, "
                   f"{len(r['seeds'])} seed(s)) — {reading}.{caveat}")
    return out


# ------------------------------------------------------------------------------------------------ convergence


def training_converged(steps: Sequence[float], dice: Sequence[float], total_steps: int, tol: float = CONVERGE_TOL,
                       window: float = 0.2) -> bool:
    """Is the training Dice flat at the end? The logged points of the last ``window`` of the steps
    (``step > (1 - window) · total_steps``) get a least-squares line; converged when the rise of that line over
    the window, ``|slope| · window · total_steps``, is at most ``tol`` Dice. False with fewer than 3 points."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(dice, dtype=float)
    keep = (s > (1 - window) * total_steps) & ~np.isnan(v)
    if keep.sum() < 3:
        return False
    slope = np.polyfit(s[keep], v[keep], 1)[0]
    return bool(abs(slope) * window * total_steps <= tol)


def convergence_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per method and budget: runs, how many converged, mean final training Dice and the learning rate."""
    rows = [r for r in latest_rows(rows) if float(r.get("at", 1.0)) == 1.0]
    methods, budgets = _methods_and_budgets(rows)
    lines = ["| method | budget | runs | converged | final training Dice | lr |", "|---|---|---:|---:|---:|---:|"]
    for method in methods:
        for b in budgets:
            runs = {}
            for r in rows:
                if str(r["method"]) == method and (int(r["labeled"]), int(r.get("val", 0))) == b:
                    runs[(int(r["fold"]), int(r["seed"]))] = r
            if not runs:
                continue
            conv = [float(r.get("converged", math.nan)) for r in runs.values()]
            td = [float(r.get("train_dice", math.nan)) for r in runs.values()]
            lrs = sorted({float(r.get("lr", math.nan)) for r in runs.values()})
            td_text = f"{np.nanmean(td):.3f}" if np.any(~np.isnan(td)) else "—"
            lines.append(f"| {method} | {budget_label(b)} | {len(runs)} | {int(np.nansum(conv))} | {td_text} | "
                         + ", ".join(f"{x:.2g}" for x in lrs) + " |")
    return "\n".join(lines) + "\n"


def scratch_warning(rows: Sequence[Mapping[str, Any]]) -> str:
    """A warning line when some scratch runs did not converge (a gain over them may be speed alone); else ""."""
    runs = {_cell(r): r for r in latest_rows(rows)
            if str(r["method"]).startswith("scratch") and float(r.get("at", 1.0)) == 1.0}
    bad = sum(float(r.get("converged", math.nan)) != 1.0 for r in runs.values())
    if not bad:
        return ""
    return (f"**Warning: {bad} of {len(runs)} scratch runs did not converge** — a difference to them may be a "
            "speed-up, not a better model; use more fine-tuning steps (`--finetune-steps`).\n")


def progress_table(rows: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """Mean test Dice at every scored point of fine-tuning (columns ``10%``, ``30%``, ``100%`` …)."""
    rows = latest_rows(rows)
    points = sorted({float(r.get("at", 1.0)) for r in rows})
    methods, budgets = _methods_and_budgets(rows)
    stats = {p: cell_stats(rows, "dice", p) for p in points}
    lines = ["| method | budget | " + " | ".join(f"{100 * p:.0f}% of steps" for p in points) + " |",
             "|---|---|" + "---:|" * len(points)]
    for method in methods:
        for b in budgets:
            if (method, b) not in stats[points[-1]]:
                continue
            cells = [f"{stats[p][(method, b)][0]:.{digits}f}" if (method, b) in stats[p] else "—" for p in points]
            lines.append(f"| {method} | {budget_label(b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ plot


def plot_results(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, size_px: tuple[int, int] = (1100, 480),
                 n_boot: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> Path:
    """PNG with two panels at the end of fine-tuning: (left) mean test Dice vs budget M, y axis from 0 to 1;
    (right) the paired difference to scratch with bootstrap 95% CI bars and a line at 0 (= scratch).

    The x axes are log2 with ticks at the budgets; methods are offset slightly so their bars do not hide each
    other. Uses the Agg canvas directly (no pyplot) and writes atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = latest_rows(rows)
    stats = cell_stats(rows)
    methods, budgets = _methods_and_budgets(rows)
    records = paired_stats(rows, n_boot=n_boot, seed=seed)
    ms = sorted({b[0] for b in budgets})
    dpi = 100
    fig = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax, ax_d = fig.subplots(1, 2)
    for i, method in enumerate(methods):
        shift = 2.0 ** (0.04 * (i - (len(methods) - 1) / 2))
        pts = [(b[0], stats[(method, b)][0]) for b in budgets if (method, b) in stats]
        if pts:
            ax.plot([m * shift for m, _ in pts], [y for _, y in pts], marker="o", label=method)
        recs = [r for r in records if r["method"] == method and not math.isnan(r["diff"])]
        if recs:
            x = [r["budget"][0] * shift for r in recs]
            y = [r["diff"] for r in recs]
            lo = [0.0 if math.isnan(r["lo"]) else r["diff"] - r["lo"] for r in recs]
            hi = [0.0 if math.isnan(r["hi"]) else r["hi"] - r["diff"] for r in recs]
            ax_d.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=method, color=f"C{i}")
    ax_d.axhline(0.0, color="black", lw=1)
    for a in (ax, ax_d):
        a.set_xscale("log", base=2)
        if ms:
            a.xaxis.set_major_locator(FixedLocator(ms))
            a.xaxis.set_minor_locator(NullLocator())
            a.set_xticklabels([str(m) for m in ms])
            a.set_xlim(min(ms) / 2**0.5, max(ms) * 2**0.5)
        a.set_xlabel("labelled volumes M (training + validation)")
        a.grid(True, alpha=0.3)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("mean test Dice (axis from 0)")
    ax.set_title("test Dice (mean over cases × folds × seeds)")
    lo_lim, hi_lim = ax_d.get_ylim()
    ax_d.set_ylim(min(lo_lim, -0.01), max(hi_lim, 0.01))
    ax_d.set_ylabel("Δ Dice vs scratch (line at 0 = scratch)")
    ax_d.set_title("paired difference to scratch, bootstrap 95% CI")
    if methods:
        ax.legend(title="method")
    fig.tight_layout()
    return atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _pool_line(rows: Sequence[Mapping[str, Any]]) -> str:
    pools = sorted({str(r.get("pool") or "") for r in rows} - {""})
    text = {"fold": "training-fold images only (test fold excluded)",
            "transductive": "all images, test fold included (transductive, as PCL did)"}
    if not pools:
        return "Pretraining pool: not recorded."
    return "Pretraining pool: " + "; ".join(f"{p} = {text.get(p, p)}" for p in pools) + "."


def _sweep_line(out: Path, methods: Sequence[str]) -> str:
    p = out / "lr_sweep.json"
    lines = []
    if not p.is_file() and "scratch" in methods:
        lines.append("Scratch learning rate: the fine-tuning config's (no sweep recorded here).")
    for q in ([p] if p.is_file() else []) + sorted(out.glob("lr_sweep_*.json")):
        s = read_json(q)
        tried = ", ".join(f"{float(lr):.2g} → {float(d):.3f}" for lr, d in zip(s["lrs"], s["dice"]))
        who = "Scratch" if q == p else s["method"]
        lines.append(f"{who} learning rate {float(s['chosen']):.2g}, chosen by a sweep on development cases "
                     f"({s['where']}; never a test fold): mean Dice per learning rate {tried}."
                     + sweep_edge_warning(s["lrs"], s["chosen"], s["dice"]))
    return "\n\n".join(lines)


def sweep_edge_warning(lrs: list[float], chosen: float, scores: list[float]) -> str:
    """A sentence when the largest or smallest candidate won on a higher score than every other candidate (the
    optimum may lie beyond the grid); nothing when it won by the tie-break or the scores are NaN."""
    pairs = sorted((float(lr), float(d)) for lr, d in zip(lrs, scores))
    if len(pairs) < 2 or float(chosen) not in (pairs[0][0], pairs[-1][0]):
        return ""
    best = dict(pairs)[float(chosen)]
    if math.isnan(best) or not all(d < best for lr, d in pairs if lr != float(chosen)):
        return ""
    side, beyond = ("largest", "larger") if float(chosen) == pairs[-1][0] else ("smallest", "smaller")
    return (f" **The {side} candidate won: a {beyond} learning rate was not tried, so the optimum may lie beyond "
            f"the grid; extend `--lr-sweep`.**")


def write_report(results_csv: str | os.PathLike, out_dir: str | os.PathLike, *, n_boot: int = BOOTSTRAP,
                 seed: int = BOOTSTRAP_SEED) -> tuple[Path, Path]:
    """Write ``out_dir/results.md`` (protocol, paired differences with CIs, Dice during fine-tuning,
    convergence, Dice and HD95 tables, NaN rule) and ``results.png``.

    Returns:
        (markdown path, PNG path).

    Raises:
        InputError: ``results_csv`` is missing, not a results file, or has no result rows.
    """
    rows = latest_rows(read_results(results_csv))
    if not rows:
        raise InputError(results_csv, "no result rows to report")
    out = Path(out_dir)
    methods, budgets = _methods_and_budgets(rows)
    folds = sorted({int(r["fold"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    runs = {_cell(r) for r in rows}
    vals = sorted({b[1] for b in budgets})
    records = paired_stats(rows, n_boot=n_boot, seed=seed)
    png = plot_results(rows, out / "results.png", n_boot=n_boot, seed=seed)
    scope = (f"**One fold only (fold {folds[0]})**: not a cross-validated result." if len(folds) == 1
             else f"Folds {folds}.")
    budget_text = ("Label budget M = every labelled volume a run saw. No validation labels: fixed schedule, the "
                   "last weights are scored." if vals == [0] else
                   "Label budget M = every labelled volume a run saw, validation volumes for checkpoint choice "
                   "included: `M=3 (2 val)` = 1 training + 2 validation volumes.")
    text = "\n".join([
        "# volcontrast benchmark",
        "",
        f"{len(runs)} fine-tuning runs; {len(methods)} method(s) × {len(budgets)} budget(s); {scope} "
        f"Seeds {seeds}.",
        "",
        budget_text,
        "",
        _pool_line(rows),
        "",
        _sweep_line(out, methods),
        "",
        "## Paired difference to scratch (end of fine-tuning)",
        "",
        f"Δ = Dice(method) − Dice(scratch) per test case of the same fold, seed and labelled draw; 95% CI: "
        f"percentile bootstrap of the mean over test cases × folds × seeds ({n_boot} resamples, seed {seed}); "
        "wins / losses: paired cases with Δ > 0 / Δ < 0. A **gain** only when the CI excludes 0.",
        "",
        paired_table(records) if records else "(no scratch baseline in these results)\n",
        *[f"- {s}" for s in verdict_sentences(records)],
        "",
        "## Test Dice during fine-tuning (mean over test cases × folds × seeds)",
        "",
        progress_table(rows),
        "## Convergence (training Dice)",
        "",
        f"Converged = the training Dice is flat over the last 20% of the steps: a least-squares line through the "
        f"logged training Dice there rises or falls by at most {CONVERGE_TOL} Dice. With a decaying learning rate "
        "a flat end is necessary, not sufficient: the 30% and 100% columns above, or a run with more steps, "
        "tell whether more training would still help.",
        "",
        convergence_table(rows),
        scratch_warning(rows),
        "## Dice (test fold, end): mean over cases × folds × seeds ± std over runs (runs)",
        "",
        summary_table(rows, "dice"),
        "## HD95 (mm, test fold, end)",
        "",
        summary_table(rows, "hd95"),
        NAN_RULE,
        "",
        f"![Dice and paired difference vs labelled volumes]({png.name})",
        "",
    ])
    md = atomic_write_text(out / "results.md", text)
    return md, png


# ------------------------------------------------------------------------------------- across two benchmark folders

SPLIT_FIELDS = ("folds", "split_seed")  # benchmark.json fields that fix the test folds and the labelled draws


def _results_path(arm: Path) -> Path:
    """``arm`` itself when it names a .csv file, else ``arm/results.csv``."""
    return arm if arm.suffix == ".csv" else arm / "results.csv"


def _split_settings(csv_path: Path) -> tuple[Path, dict[str, Any]] | None:
    p = csv_path.parent / "benchmark.json"
    if not p.is_file():
        return None
    cfg = read_json(p)  # InputError when not valid JSON
    if not isinstance(cfg, dict):
        raise InputError(p, "not a benchmark settings file (expected a JSON object)")
    return p, {k: cfg.get(k) for k in SPLIT_FIELDS}


def _test_cases(rows: Iterable[Mapping[str, Any]]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for r in rows:
        out.setdefault(int(r["fold"]), set()).add(str(r["case"]))
    return out


def compare_folders(a: str | os.PathLike, method_a: str, b: str | os.PathLike, method_b: str, *, at: float = 1.0,
                    n_boot: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Paired Dice difference of ``method_a`` in benchmark folder ``a`` against ``method_b`` in folder ``b`` (two
    arms of a study run into separate folders, e.g. with and without an augmentation), per label budget both have.

    ``a``/``b``: a benchmark ``--out`` folder or its ``results.csv``. Units are (fold, seed, test case) scored in
    both at point ``at`` — the pairing of ``results.md``: d = Dice(A) − Dice(B), mean, bootstrap CI
    (:func:`bootstrap_ci`), wins/losses, verdict. The two must be the same split: equal ``folds`` and
    ``split_seed`` in their ``benchmark.json`` (when both have one) and, for every fold both have, the same test
    cases (so a (fold, seed) is the same test fold and labelled draw in both). A budget only one of them has is
    named through ``log``.

    Returns:
        One record per common budget: ``budget`` and :func:`_paired_record`'s fields.

    Raises:
        InputError: a results.csv is missing or unreadable, a method has no rows at ``at``, the splits differ, or
            the two share no scored (budget, fold, seed, case).
    """
    paths = (_results_path(Path(a)), _results_path(Path(b)))
    sides = []
    for path, method in zip(paths, (method_a, method_b)):
        rows = latest_rows(read_results(path))
        mine = [r for r in rows if str(r["method"]) == method and math.isclose(float(r.get("at", 1.0)), at)]
        if not mine:
            have = ", ".join(dict.fromkeys(str(r["method"]) for r in rows)) or "none"
            raise InputError(path, f"no results of method {method!r} at {at:g} of the steps (methods here: {have})")
        sides.append(mine)
    sa, sb = _split_settings(paths[0]), _split_settings(paths[1])
    if sa and sb:
        for k in SPLIT_FIELDS:
            if sa[1][k] != sb[1][k]:
                raise InputError(sb[0], f"{k} = {sb[1][k]!r} here but {sa[1][k]!r} in {sa[0]}: the folds or "
                                        "labelled draws differ, so the test cases cannot be paired")
    ca, cb = _test_cases(sides[0]), _test_cases(sides[1])
    for fold in sorted(set(ca) & set(cb)):
        if ca[fold] != cb[fold]:
            raise InputError(paths[1], f"fold {fold}'s test cases differ from {paths[0]}'s (e.g. "
                                       f"{sorted(ca[fold] ^ cb[fold])[0]!r}): another cohort or split, so the test "
                                       "cases cannot be paired")
    budgets = [_methods_and_budgets(rows)[1] for rows in sides]
    for path, mine, other in ((paths[0], budgets[0], budgets[1]), (paths[1], budgets[1], budgets[0])):
        for budget in mine:
            if budget not in other and log:
                log(f"{path}: {budget_label(budget)} has no counterpart in the other folder, left out")
    out = []
    for budget in [x for x in budgets[0] if x in budgets[1]]:
        rec = _paired_record(unit_values(sides[0], method_a, budget, at), unit_values(sides[1], method_b, budget, at),
                             n_boot, seed)
        if rec["n"]:
            out.append({"budget": budget, **rec})
    if not out:
        raise InputError(paths[1], f"no scored test case in common with {paths[0]} (same budget, fold, seed and "
                                   "case)")
    return out


def compare_table(records: Sequence[Mapping[str, Any]], label_a: str, label_b: str, digits: int = 3) -> str:
    """Markdown table of :func:`compare_folders` records (A = ``label_a``, B = ``label_b``)."""
    lines = [f"| budget | A: {label_a} | B: {label_b} | Δ Dice = A − B | 95% CI | wins / losses | n (cases × folds "
             "× seeds) | verdict |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for r in records:
        lines.append(f"| {budget_label(r['budget'])} | {r['mean_a']:.{digits}f} | {r['mean_b']:.{digits}f} | "
                     + _diff_cells(r, digits))
    return "\n".join(lines) + "\n"
