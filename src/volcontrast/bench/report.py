"""Benchmark results: an append-only ``results.csv``, markdown summary tables and a Dice-vs-labels plot.

``results.csv`` schema — one row per finished cell run (method, labelled budget, fold, seed):

============== ===== ===================================================================================
column         type  meaning
============== ===== ===================================================================================
method         str   pretraining method name (``scratch`` for no pretraining), e.g. ``pcl``, ``spade``
labeled        int   label budget M: number of labelled training volumes used for fine-tuning
fold           int   test fold index (``data.splits.Split.fold``)
seed           int   seed of the label draw and of fine-tuning
dice           float mean Dice over the test fold: ``engine.metrics.aggregate(...)["mean_dice"]`` (NaN rule)
hd95           float mean HD95 in mm over the test fold, same aggregation
n_test         int   number of test volumes scored
pretrain_run   str   run folder of the pretrained checkpoint ("" when trained from scratch)
finetune_run   str   run folder of the fine-tuned model
seconds        float wall-clock seconds of this cell (fine-tuning + evaluation)
pool           str   pretraining pool: ``fold`` (training-fold images only) or ``transductive`` ("" unknown)
dice_<name>    float optional, per-class mean Dice over the test fold (``<name>`` = label name)
hd95_<name>    float optional, per-class mean HD95 (mm)
============== ===== ===================================================================================

The first seven columns are required in every row; the others may be empty. The header is written with the
first row (standard columns, then the first row's extra columns in its order) and never changes: a later row
with a column the header lacks is an error. Rows are only ever appended, one ``write`` per line, so a crash
loses at most the line being written; a torn line is skipped with a warning on reading and its cell counts
as unfinished (a resumed benchmark simply runs it again). If a cell appears twice, the later row wins.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volcontrast.engine.metrics import NAN_RULE
from volcontrast.errors import InputError
from volcontrast.utils.files import atomic_save, atomic_write_text

REQUIRED_COLUMNS = ("method", "labeled", "fold", "seed", "dice", "hd95", "n_test")
STANDARD_COLUMNS = (*REQUIRED_COLUMNS, "pretrain_run", "finetune_run", "seconds", "pool")
INT_COLUMNS = frozenset({"labeled", "fold", "seed", "n_test"})
FLOAT_COLUMNS = frozenset({"dice", "hd95", "seconds"})
CELL_KEY = ("method", "labeled", "fold", "seed")

Cell = tuple[str, int, int, int]
"""(method, labeled, fold, seed)."""


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
    if missing:
        raise InputError(path, f"not a volcontrast results.csv: header lacks {', '.join(missing)}")
    return header


def append_result(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one result row to ``path`` (created with its header if missing or empty).

    Args:
        path: the results.csv file.
        row: values by column name (see the module docstring); NaN floats are written as ``nan``.

    Raises:
        InputError: a required column is missing from ``row``, or ``row`` has a column the existing header lacks.
    """
    p = Path(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise InputError(p, f"result row lacks required column(s) {', '.join(missing)}")
    new = not p.exists() or p.stat().st_size == 0
    if new:
        header = [*STANDARD_COLUMNS, *(k for k in row if k not in STANDARD_COLUMNS)]
    else:
        header = _read_header(p)
        extra = [k for k in row if k not in header]
        if extra:
            raise InputError(p, f"result row has column(s) {', '.join(extra)} that the existing header lacks")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if new:
        writer.writerow(header)
    writer.writerow([_format_value(row.get(c)) for c in header])
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as f:
        f.seek(0, os.SEEK_END)
        prefix = b""
        if f.tell() > 0:  # a torn last line (crash mid-write) must not swallow this row
            f.seek(-1, os.SEEK_END)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
        f.write(prefix + buf.getvalue().encode())
        f.flush()
        os.fsync(f.fileno())


def _parse(name: str, text: str) -> Any:
    if name in INT_COLUMNS:
        return int(text)
    if _is_float_column(name):
        return float(text) if text != "" else math.nan
    return text


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All well-formed rows of a results.csv, typed (ints, floats with NaN for empty, strings).

    Malformed rows (wrong number of fields, unparsable numbers: a torn last line) are skipped with a warning
    naming the file and line.

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
            rows.append(row)
    return rows


def finished_cells(path: str | os.PathLike) -> set[Cell]:
    """(method, labeled, fold, seed) of every row in ``path``; empty when the file does not exist yet."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return set()
    return {_cell(r) for r in read_results(p)}


def _cell(row: Mapping[str, Any]) -> Cell:
    return (str(row["method"]), int(row["labeled"]), int(row["fold"]), int(row["seed"]))


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per cell (the last one written), in first-appearance order."""
    by_cell: dict[Cell, Mapping[str, Any]] = {}
    for r in rows:
        by_cell[_cell(r)] = r
    return list(by_cell.values())


def _methods_and_budgets(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[int]]:
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    budgets = sorted({int(r["labeled"]) for r in rows})
    return methods, budgets


CellStats = dict[tuple[str, int], tuple[float, float, int]]
"""``{(method, labeled): (mean, std, n)}``."""


def cell_stats(rows: Iterable[Mapping[str, Any]], metric: str = "dice") -> CellStats:
    """``{(method, labeled): (mean, std, n)}`` of ``metric`` over folds × seeds.

    NaN values are left out of the mean and of ``n``; ``std`` uses ddof=1 and is NaN when ``n < 2``.
    """
    groups: dict[tuple[str, int], list[float]] = {}
    for r in latest_rows(rows):
        groups.setdefault((str(r["method"]), int(r["labeled"])), []).append(float(r[metric]))
    out = {}
    for key, vals in groups.items():
        a = np.asarray(vals, dtype=float)
        a = a[~np.isnan(a)]
        mean = float(a.mean()) if a.size else math.nan
        std = float(a.std(ddof=1)) if a.size > 1 else math.nan
        out[key] = (mean, std, int(a.size))
    return out


def summary_table(rows: Sequence[Mapping[str, Any]], metric: str = "dice", digits: int | None = None) -> str:
    """Markdown table: one row per method, one column per label budget ``M=<n>``.

    Cells read ``mean ± std (n)`` of ``metric`` over folds × seeds (std with ddof=1); ``mean (1)`` for a single
    run, ``—`` where a method has no (non-NaN) result at that budget. ``digits`` defaults to 3 for Dice and
    2 for HD95 (mm). Methods keep their order of first appearance; budgets are ascending.
    """
    digits = digits if digits is not None else (3 if metric == "dice" else 2)
    stats = cell_stats(rows, metric)
    methods, budgets = _methods_and_budgets(rows)
    lines = ["| method | " + " | ".join(f"M={m}" for m in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for method in methods:
        cells = []
        for m in budgets:
            mean, std, n = stats.get((method, m), (math.nan, math.nan, 0))
            if n == 0:
                cells.append("—")
            elif n == 1:
                cells.append(f"{mean:.{digits}f} (1)")
            else:
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} ({n})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_METRIC_LABEL = {"dice": "Dice", "hd95": "HD95 (mm)"}


def plot_results(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, metric: str = "dice",
                 size_px: tuple[int, int] = (800, 520)) -> Path:
    """PNG of ``metric`` vs labelled volumes: one line per method, error bars = std over folds × seeds.

    The x axis is log2 with ticks at the budgets; methods are offset by a few hundredths of an octave so their
    error bars do not hide each other. Uses the Agg canvas directly (no pyplot, no global backend switch) and
    writes atomically. ``size_px`` is the image (width, height) in pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    stats = cell_stats(rows, metric)
    methods, budgets = _methods_and_budgets(rows)
    dpi = 100
    fig = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        pts = [(m, *stats[(method, m)]) for m in budgets if stats.get((method, m), (0, 0, 0))[2] > 0]
        if not pts:
            continue
        shift = 2.0 ** (0.04 * (i - (len(methods) - 1) / 2))
        x = [m * shift for m, *_ in pts]
        y = [mean for _, mean, _, _ in pts]
        err = [0.0 if math.isnan(std) else std for _, _, std, _ in pts]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    if budgets:
        ax.xaxis.set_major_locator(FixedLocator(budgets))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(m) for m in budgets])
        ax.set_xlim(min(budgets) / 2**0.5, max(budgets) * 2**0.5)
    label = _METRIC_LABEL.get(metric, metric)
    ax.set_xlabel("labelled training volumes (M)")
    ax.set_ylabel(f"{label}, test fold")
    ax.set_title(f"{label} vs labelled volumes (mean ± std over folds × seeds)")
    ax.grid(True, alpha=0.3)
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


def write_report(results_csv: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out_dir/results.md`` (Dice and HD95 tables, cell count, pool, NaN rule) and ``results.png``.

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
    filled = sum(n > 0 for _, _, n in cell_stats(rows, "dice").values())
    folds = sorted({int(r["fold"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    png = plot_results(rows, out / "results.png")
    text = "\n".join([
        "# volcontrast benchmark",
        "",
        f"{filled} of {len(methods) * len(budgets)} cells (method × label budget) filled from {len(rows)} runs; "
        f"folds {folds}, seeds {seeds}. Cells: mean ± std over folds × seeds (std ddof=1), (n) = runs.",
        "",
        _pool_line(rows),
        "",
        "## Dice (test fold)",
        "",
        summary_table(rows, "dice"),
        "## HD95 (mm, test fold)",
        "",
        summary_table(rows, "hd95"),
        NAN_RULE,
        "",
        f"![Dice vs labelled volumes]({png.name})",
        "",
    ])
    md = atomic_write_text(out / "results.md", text)
    return md, png
