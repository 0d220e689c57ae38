"""results.csv (per case) round trip, summary tables against numpy, resumable cells, the PNG plot and the report."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from volcontrast.bench.report import (
    STANDARD_COLUMNS,
    append_result,
    append_results,
    finished_cells,
    plot_results,
    read_results,
    summary_table,
    write_report,
)
from volcontrast.engine.metrics import NAN_RULE
from volcontrast.errors import InputError

CELL = re.compile(r"^(?P<mean>-?[\d.]+)(?: ± (?P<std>[\d.]+))? \((?P<n>\d+)\)$")


CASES = ("c1", "c2", "c3")


def _write_grid(path, rng, seeds=(0,), at=(1.0,)):
    rows = []
    for method in ("scratch", "pcl"):
        for labeled in (1, 4):
            for fold in (0, 1):
                for seed in seeds:
                    cell = []
                    for a in at:
                        for case in CASES:
                            cell.append({
                                "method": method, "labeled": labeled, "val": 0, "fold": fold, "seed": seed, "at": a,
                                "step": int(100 * a), "case": f"{case}f{fold}", "dice": float(rng.uniform(0.3, 0.9)),
                                "hd95": float(rng.uniform(2, 30)), "n_test": len(CASES), "checkpoint": "last",
                                "lr": 3e-3, "train_dice": 0.8, "converged": 1.0,
                                "pretrain_run": "" if method == "scratch" else f"runs/pcl-f{fold}",
                                "finetune_run": f"runs/{method}-{labeled}-{fold}-{seed}", "seconds": 1.5,
                                "pool": "fold", "dice_liver": float(rng.uniform(0.3, 0.9))})
                    append_results(path, cell)
                    rows.extend(cell)
    return rows


def _parse_table(md: str) -> dict[tuple[str, str], str]:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    budgets = [h.strip() for h in lines[0].strip("|").split("|")[1:]]
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
    assert len(read) == 2 * 2 * 2 * 2 * len(CASES)
    assert read[0]["labeled"] == 1 and isinstance(read[0]["fold"], int) and read[0]["case"] == "c1f0"
    assert read[0]["dice"] == rows[0]["dice"]  # full float precision survives the CSV
    cells = _parse_table(summary_table(read, metric))
    assert set(cells) == {(m, b) for m in ("scratch", "pcl") for b in ("M=1", "M=4")}
    for (method, budget), text in cells.items():
        mine = [r for r in rows if r["method"] == method and f"M={r['labeled']}" == budget]
        vals = np.array([r[metric] for r in mine])  # every test case x fold x seed
        runs = np.array([np.mean([r[metric] for r in mine if (r["fold"], r["seed"]) == k])
                         for k in sorted({(r["fold"], r["seed"]) for r in mine})])
        got = CELL.match(text)
        assert got, text
        assert float(got["mean"]) == pytest.approx(vals.mean(), abs=0.51 * 10**-digits)
        assert float(got["std"]) == pytest.approx(runs.std(ddof=1), abs=0.51 * 10**-digits)
        assert int(got["n"]) == len(runs) == 4


def test_missing_cells_single_runs_and_nan_values(tmp_path):
    path = tmp_path / "r.csv"
    base = {"n_test": 1, "hd95": 5.0, "at": 1.0}
    append_result(path, {**base, "method": "a", "labeled": 1, "fold": 0, "seed": 0, "case": "x", "dice": 0.5})
    append_result(path, {**base, "method": "a", "labeled": 1, "fold": 1, "seed": 0, "case": "y", "dice": math.nan})
    append_result(path, {**base, "method": "b", "labeled": 2, "fold": 0, "seed": 0, "case": "x", "dice": 0.7})
    append_result(path, {**base, "method": "b", "labeled": 3, "val": 2, "fold": 0, "seed": 0, "case": "x",
                         "dice": 0.6})
    cells = _parse_table(summary_table(read_results(path)))
    assert cells[("a", "M=1")] == "0.500 (1)"  # the NaN run is left out of mean and n
    assert cells[("a", "M=2")] == "—" and cells[("b", "M=1")] == "—"
    assert cells[("b", "M=2")] == "0.700 (1)"
    assert cells[("b", "M=3 (2 val)")] == "0.600 (1)"  # validation volumes are part of M and named


def test_finished_cells_need_every_test_case_and_survive_a_torn_line(tmp_path, rng):
    path = tmp_path / "results.csv"
    assert finished_cells(path) == set()
    rows = _write_grid(path, rng)
    expected = {(r["method"], r["labeled"], 0, r["fold"], r["seed"]) for r in rows}
    assert finished_cells(path) == expected
    with open(path, "a") as f:  # a crash mid-write leaves half a line
        f.write("spade,2,0,0,0,1.0,100,c1,0.7")
    with pytest.warns(UserWarning, match="skipped a row"):
        assert finished_cells(path) == expected
    spade = {"method": "spade", "labeled": 2, "fold": 0, "seed": 0, "at": 1.0, "dice": 0.71, "hd95": 3.0,
             "n_test": 2}
    append_result(path, {**spade, "case": "c1"})
    with pytest.warns(UserWarning):
        assert finished_cells(path) == expected  # one of its two test cases: unfinished
    append_result(path, {**spade, "case": "c2", "at": 0.3})
    with pytest.warns(UserWarning):
        assert finished_cells(path) == expected  # a part-way point does not finish it
    append_result(path, {**spade, "case": "c2"})
    with pytest.warns(UserWarning):
        assert finished_cells(path) == expected | {("spade", 2, 0, 0, 0)}
    header = path.read_text().splitlines()[0]
    assert header.startswith(",".join(STANDARD_COLUMNS)) and header.endswith(",dice_liver")


def test_append_rejects_unknown_columns_and_missing_required(tmp_path, rng):
    path = tmp_path / "results.csv"
    _write_grid(path, rng)
    size = path.stat().st_size
    row = {"method": "a", "labeled": 1, "fold": 0, "seed": 0, "case": "c1", "dice": 0.5}
    with pytest.raises(InputError, match="dice_kidney"):
        append_results(path, [row, {**row, "dice_kidney": 0.3}])
    with pytest.raises(InputError, match="case"):
        append_result(path, {k: v for k, v in row.items() if k != "case"})
    assert path.stat().st_size == size  # nothing written, nothing lost
    with pytest.raises(InputError, match="not found"):
        read_results(tmp_path / "missing.csv")


def test_plot_is_a_png_of_the_requested_size(tmp_path, rng):
    from matplotlib.image import imread

    path = tmp_path / "results.csv"
    _write_grid(path, rng, seeds=(0, 1))
    rows = read_results(path)
    png = plot_results(rows, tmp_path / "plot.png", size_px=(900, 400), n_boot=50)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert imread(png).shape[:2] == (400, 900)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_write_report_has_every_section_the_rule_and_the_scope(tmp_path, rng):
    path = tmp_path / "results.csv"
    _write_grid(path, rng, seeds=(0, 1), at=(0.1, 1.0))
    md, png = write_report(path, tmp_path / "report", n_boot=100)
    text = md.read_text()
    assert "16 fine-tuning runs" in text and "not the training run's" not in text
    assert "Folds [0, 1]" in text and "One fold only" not in text
    for section in ("## Paired difference to scratch", "## Test Dice during fine-tuning", "## Convergence",
                    "## Dice (test fold", "## HD95"):
        assert section in text
    assert "| pcl | M=1 |" in text and "| 10% of steps | 100% of steps |" in text
    assert text.count("| method | M=1 | M=4 |") == 2
    assert NAN_RULE in text and "training-fold images only" in text and "No validation labels" in text
    assert "no sweep recorded" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    one = [r for r in read_results(path) if r["fold"] == 0]
    path1 = tmp_path / "one.csv"
    append_results(path1, one)
    text1 = write_report(path1, tmp_path / "one", n_boot=100)[0].read_text()
    assert "**One fold only (fold 0)**" in text1 and "(one fold)" in text1
    assert "not the training run's" in text1  # one fold: the CI misses the training run's variation


def test_report_warns_when_scratch_did_not_converge(tmp_path, rng):
    path = tmp_path / "results.csv"
    rows = _write_grid(tmp_path / "all.csv", rng)
    for r in rows:
        if r["method"] == "scratch" and r["labeled"] == 4 and r["fold"] == 1:
            r["converged"] = 0.0
    append_results(path, rows)
    text = write_report(path, tmp_path / "r", n_boot=50)[0].read_text()
    assert "**Warning: 1 of 4 scratch runs did not converge**" in text
    text = write_report(tmp_path / "all.csv", tmp_path / "ok", n_boot=50)[0].read_text()
    assert "did not converge" not in text


@pytest.mark.parametrize("lrs,chosen,scores,want", [
    ([0.01, 0.03], 0.03, [0.30, 0.35], " **The largest candidate won: a larger learning rate was not tried"),
    ([0.03, 0.01, 0.1], 0.01, [0.2, 0.4, 0.1], " **The smallest candidate won: a smaller learning rate was not"),
    ([0.01, 0.03, 0.1], 0.03, [0.2, 0.4, 0.1], ""),  # inside the grid
    ([0.01, 0.03], 0.01, [0.3, 0.3], ""),  # a tie: the smaller won by the tie-break
    ([0.01, 0.03], 0.01, [math.nan, math.nan], ""),
    ([0.03], 0.03, [0.3], ""),
])
def test_sweep_edge_warning_names_the_edge(lrs, chosen, scores, want):
    from volcontrast.bench.report import sweep_edge_warning

    got = sweep_edge_warning(lrs, chosen, scores)
    assert got.startswith(want) and (want != "" or got == "")


# ------------------------------------------------------------------------- compare: two benchmark folders


def _arm_rows(method, seeds, cases, rng, at=1.0):
    return [{"method": method, "labeled": 1, "val": 0, "fold": fold, "seed": seed, "at": at, "step": 10,
             "case": f"{c}f{fold}", "dice": float(rng.uniform(0.2, 0.9)), "hd95": float(rng.uniform(2, 30)),
             "n_test": len(cases), "checkpoint": "last", "lr": 1e-2, "train_dice": 0.8, "converged": 1.0,
             "pretrain_run": "", "finetune_run": "r", "seconds": 1.0, "pool": "transductive"}
            for fold in (0, 1) for seed in seeds for c in cases]


def test_compare_folders_equals_direct_pairing(tmp_path, rng):
    from volcontrast.bench.report import bootstrap_ci, compare_folders

    a_rows = _arm_rows("pcl", (0, 1), ("c1", "c2", "c3"), rng) + _arm_rows("pcl", (0, 1), ("c1", "c2", "c3"), rng,
                                                                            at=0.3)
    b_rows = (_arm_rows("scratch", (0,), ("c1", "c2", "c3"), rng)  # seed 1 has no partner
              + _arm_rows("scratch", (0,), ("c1", "c2", "c3"), rng, at=0.3))
    b_rows[0]["dice"] = math.nan  # an unscored case on either side drops out of the pairing
    a_rows[2]["dice"] = math.nan
    four = [dict(r, labeled=4) for r in b_rows[:3]]  # a budget only B has
    append_results(tmp_path / "a" / "results.csv", a_rows)
    append_results(tmp_path / "b" / "results.csv", b_rows + four)
    notes = []
    for at in (1.0, 0.3):
        [rec] = compare_folders(tmp_path / "a" / "results.csv", "pcl", tmp_path / "b", "scratch", at=at,
                                log=notes.append)
        va = {(r["fold"], r["seed"], r["case"]): r["dice"] for r in a_rows if r["at"] == at}
        vb = {(r["fold"], r["seed"], r["case"]): r["dice"] for r in b_rows if r["at"] == at}
        keys = sorted(k for k in set(va) & set(vb) if not math.isnan(va[k] - vb[k]))
        assert len(keys) == 2 * 3 - (2 if at == 1.0 else 0)
        d = np.array([va[k] - vb[k] for k in keys])
        assert rec["n"] == d.size and rec["diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert (rec["lo"], rec["hi"]) == bootstrap_ci(d)
        assert rec["mean_a"] == pytest.approx(np.mean([va[k] for k in keys]), abs=1e-12)
        assert rec["mean_b"] == pytest.approx(np.mean([vb[k] for k in keys]), abs=1e-12)
        assert (rec["wins"], rec["losses"]) == (int((d > 0).sum()), int((d < 0).sum()))
        assert rec["folds"] == [0, 1] and rec["seeds"] == [0] and rec["budget"] == (1, 0)
    # the B-only budget exists at the end only (at 1), not at 0.3
    assert notes == [f"{tmp_path / 'b' / 'results.csv'}: M=4 has no counterpart in the other folder, left out"]


def _cli(args, capsys):
    from volcontrast.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(x) for x in args])
    return exc.value.code, capsys.readouterr()


def test_compare_cli_table_and_one_line_errors(tmp_path, rng, capsys):
    import json

    from volcontrast.bench.report import compare_folders

    a, b = tmp_path / "a", tmp_path / "b"
    append_results(a / "results.csv", _arm_rows("pcl", (0,), ("c1", "c2"), rng))
    append_results(b / "results.csv", _arm_rows("scratch", (0,), ("c1", "c2"), rng))
    code, res = _cli(["compare", f"{a}:pcl", f"{b}:scratch"], capsys)
    assert code == 0
    [rec] = compare_folders(a, "pcl", b, "scratch")
    lines = res.out.splitlines()
    assert lines[0].startswith(f"| budget | A: {a}:pcl | B: {b}:scratch | Δ Dice = A − B | 95% CI |")
    assert lines[2] == (f"| M=1 | {rec['mean_a']:.3f} | {rec['mean_b']:.3f} | {rec['diff']:+.3f} | "
                        f"[{rec['lo']:+.3f}, {rec['hi']:+.3f}] | {rec['wins']} / {rec['losses']} | 4 | "
                        f"{rec['verdict']} |")
    code, res = _cli(["compare", f"{a}:simclr", f"{b}:scratch"], capsys)
    assert code == 2
    assert res.err == (f"error: {a / 'results.csv'}: no results of method 'simclr' at 1 of the steps (methods here: "
                       "pcl)\n")
    for spec in (str(a), f"{a}:", f"{tmp_path}:a/pcl"):
        code, res = _cli(["compare", spec, f"{b}:scratch"], capsys)
        assert (code, res.err) == (2, f"error: {spec}: expected FOLDER:METHOD, e.g. bench/study:pcl\n")
    code, res = _cli(["compare", f"{a}:pcl", f"{tmp_path / 'c'}:scratch"], capsys)
    assert (code, res.err) == (2, f"error: {tmp_path / 'c' / 'results.csv'}: results file not found\n")
    code, res = _cli(["compare", f"{a}:pcl", f"{b}:scratch", "--at", "0.3"], capsys)
    assert (code, res.err) == (2, f"error: {a / 'results.csv'}: no results of method 'pcl' at 0.3 of the steps "
                                  "(methods here: pcl)\n")
    # other seeds only: nothing to pair
    d = tmp_path / "d"
    append_results(d / "results.csv", _arm_rows("scratch", (5,), ("c1", "c2"), rng))
    code, res = _cli(["compare", f"{a}:pcl", f"{d}:scratch"], capsys)
    assert (code, res.err) == (2, f"error: {d / 'results.csv'}: no scored test case in common with "
                                  f"{a / 'results.csv'} (same budget, fold, seed and case)\n")
    # another cohort: the same fold holds other test cases
    e = tmp_path / "e"
    append_results(e / "results.csv", _arm_rows("scratch", (0,), ("c1", "x2"), rng))
    code, res = _cli(["compare", f"{a}:pcl", f"{e}:scratch"], capsys)
    assert (code, res.err) == (2, f"error: {e / 'results.csv'}: fold 0's test cases differ from "
                                  f"{a / 'results.csv'}'s (e.g. 'c2f0'): another cohort or split, so the test cases "
                                  "cannot be paired\n")
    # another split: the same (fold, seed) would be other test cases and labelled draws
    (a / "benchmark.json").write_text(json.dumps({"folds": 3, "split_seed": 0}))
    (b / "benchmark.json").write_text(json.dumps({"folds": 4, "split_seed": 0}))
    code, res = _cli(["compare", f"{a}:pcl", f"{b}:scratch"], capsys)
    assert (code, res.err) == (2, f"error: {b / 'benchmark.json'}: folds = 4 here but 3 in {a / 'benchmark.json'}: "
                                  "the folds or labelled draws differ, so the test cases cannot be paired\n")
    (b / "benchmark.json").write_text("[3, 0]")
    code, res = _cli(["compare", f"{a}:pcl", f"{b}:scratch"], capsys)
    assert (code, res.err) == (2, f"error: {b / 'benchmark.json'}: not a benchmark settings file (expected a JSON "
                                  "object)\n")
