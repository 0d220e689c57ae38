"""results.csv round trip, summary tables against numpy, resumable cells, the PNG plot and the report."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from volcontrast.bench.report import (
    append_result,
    finished_cells,
    plot_results,
    read_results,
    summary_table,
    write_report,
)
from volcontrast.engine.metrics import NAN_RULE
from volcontrast.errors import InputError

CELL = re.compile(r"^(?P<mean>-?[\d.]+)(?: ± (?P<std>[\d.]+))? \((?P<n>\d+)\)$")


def _write_grid(path, rng, seeds=(0,)):
    rows = []
    for method in ("scratch", "pcl"):
        for labeled in (1, 4):
            for fold in (0, 1):
                for seed in seeds:
                    row = {"method": method, "labeled": labeled, "fold": fold, "seed": seed,
                           "dice": float(rng.uniform(0.3, 0.9)), "hd95": float(rng.uniform(2, 30)), "n_test": 3,
                           "pretrain_run": "" if method == "scratch" else f"runs/pcl-f{fold}",
                           "finetune_run": f"runs/{method}-{labeled}-{fold}-{seed}", "seconds": 1.5,
                           "pool": "fold", "dice_liver": float(rng.uniform(0.3, 0.9))}
                    append_result(path, row)
                    rows.append(row)
    return rows


def _parse_table(md: str) -> dict[tuple[str, int], str]:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    budgets = [int(h.strip()[2:]) for h in lines[0].strip("|").split("|")[1:]]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        for m, c in zip(budgets, cells[1:]):
            out[(cells[0], m)] = c
    return out


@pytest.mark.parametrize(("metric", "digits"), [("dice", 3), ("hd95", 2)])
def test_summary_table_cells_equal_numpy_mean_and_std(tmp_path, rng, metric, digits):
    path = tmp_path / "results.csv"
    rows = _write_grid(path, rng, seeds=(0, 1))
    read = read_results(path)
    assert len(read) == 16
    assert read[0]["labeled"] == 1 and isinstance(read[0]["fold"], int)
    assert read[0]["dice"] == rows[0]["dice"]  # full float precision survives the CSV
    cells = _parse_table(summary_table(read, metric))
    assert set(cells) == {(m, b) for m in ("scratch", "pcl") for b in (1, 4)}
    for (method, labeled), text in cells.items():
        vals = np.array([r[metric] for r in rows if r["method"] == method and r["labeled"] == labeled])
        got = CELL.match(text)
        assert got, text
        assert float(got["mean"]) == pytest.approx(vals.mean(), abs=0.51 * 10**-digits)
        assert float(got["std"]) == pytest.approx(vals.std(ddof=1), abs=0.51 * 10**-digits)
        assert int(got["n"]) == len(vals) == 4


def test_missing_cells_single_runs_and_nan_values(tmp_path):
    path = tmp_path / "r.csv"
    base = {"n_test": 2, "hd95": 5.0}
    append_result(path, {**base, "method": "a", "labeled": 1, "fold": 0, "seed": 0, "dice": 0.5})
    append_result(path, {**base, "method": "a", "labeled": 1, "fold": 1, "seed": 0, "dice": math.nan})
    append_result(path, {**base, "method": "b", "labeled": 2, "fold": 0, "seed": 0, "dice": 0.7})
    cells = _parse_table(summary_table(read_results(path)))
    assert cells[("a", 1)] == "0.500 (1)"  # the NaN run is left out of mean and n
    assert cells[("a", 2)] == "—" and cells[("b", 1)] == "—"
    assert cells[("b", 2)] == "0.700 (1)"


def test_finished_cells_find_every_row_and_survive_a_torn_line(tmp_path, rng):
    path = tmp_path / "results.csv"
    assert finished_cells(path) == set()
    rows = _write_grid(path, rng)
    expected = {(r["method"], r["labeled"], r["fold"], r["seed"]) for r in rows}
    assert finished_cells(path) == expected
    with open(path, "a") as f:  # a crash mid-write leaves half a line
        f.write("spade,2,0,0,0.7")
    with pytest.warns(UserWarning, match="skipped a row"):
        assert finished_cells(path) == expected
    append_result(path, {"method": "spade", "labeled": 2, "fold": 0, "seed": 0, "dice": 0.71, "hd95": 3.0,
                         "n_test": 3})
    with pytest.warns(UserWarning):
        assert finished_cells(path) == expected | {("spade", 2, 0, 0)}
    before = path.read_text().splitlines()[:9]
    assert before[0].startswith("method,labeled,fold,seed,dice,hd95,n_test,pretrain_run,finetune_run,seconds")
    assert "dice_liver" in before[0]


def test_append_rejects_unknown_columns_and_missing_required(tmp_path, rng):
    path = tmp_path / "results.csv"
    _write_grid(path, rng)
    size = path.stat().st_size
    with pytest.raises(InputError, match="dice_kidney"):
        append_result(path, {"method": "a", "labeled": 1, "fold": 0, "seed": 0, "dice": 0.5, "hd95": 1.0,
                             "n_test": 1, "dice_kidney": 0.3})
    with pytest.raises(InputError, match="n_test"):
        append_result(path, {"method": "a", "labeled": 1, "fold": 0, "seed": 0, "dice": 0.5, "hd95": 1.0})
    assert path.stat().st_size == size  # nothing written, nothing lost
    with pytest.raises(InputError, match="not found"):
        read_results(tmp_path / "missing.csv")


def test_plot_is_a_png_of_the_requested_size(tmp_path, rng):
    from matplotlib.image import imread

    path = tmp_path / "results.csv"
    _write_grid(path, rng, seeds=(0, 1))
    rows = read_results(path)
    png = plot_results(rows, tmp_path / "plot.png", size_px=(640, 400))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert imread(png).shape[:2] == (400, 640)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_write_report_has_both_tables_the_rule_and_the_cell_count(tmp_path, rng):
    path = tmp_path / "results.csv"
    _write_grid(path, rng)
    md, png = write_report(path, tmp_path / "report")
    text = md.read_text()
    assert "4 of 4 cells" in text and "8 runs" in text
    assert "## Dice" in text and "## HD95" in text and text.count("| M=1 | M=4 |") == 2
    assert NAN_RULE in text and "training-fold images only" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
