"""The few-label protocol of issue 17: every label counts, paired bootstrap statistics, gain verdicts, the
fine-tuning recipe's learning-rate schedule, convergence, and the same results for the same seed."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml

from volcontrast.bench.benchmark import BenchmarkConfig, check_same_settings, run_benchmark, snapshot_steps
from volcontrast.bench.report import (
    STANDARD_COLUMNS,
    append_results,
    bootstrap_ci,
    gain_label,
    paired_stats,
    read_results,
    training_converged,
    write_report,
)
from volcontrast.config import from_dict, merge
from volcontrast.data.cache import open_cache
from volcontrast.data.splits import kfold_splits, labelled_draw, validation_draw
from volcontrast.engine import trainer as trainer_mod
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.finetune import (
    build_segmentation_backbone,
    finetune,
    finetune_loop_settings,
    resolve_finetune_config,
)
from volcontrast.engine.pretrain import pretrain
from volcontrast.engine.trainer import LoopSettings, lr_at
from volcontrast.errors import InputError

QUIET = {"progress": False, "log": lambda m: None}

# --------------------------------------------------------------------------------------------- label budget


def test_labelled_draw_counts_validation_volumes_in_the_budget():
    split = kfold_splits([f"c{i:02d}" for i in range(30)], 3, seed=0, val_fraction=0.3)[1]
    draw = labelled_draw(split, train=1, val=2, seed=4)
    assert draw.budget == 3 and len(draw.ids) == 3
    assert set(draw.train) <= set(split.train) and set(draw.val) <= set(split.val)
    assert draw.val == validation_draw(split, 2, seed=4) and set(draw.val) < set(validation_draw(split, 3, 4))
    assert labelled_draw(split, train=2, val=0, seed=4).budget == 2 and labelled_draw(split, 2, 0, 4).val == []
    with pytest.raises(InputError, match="exceed the 6 validation cases of fold 1"):
        validation_draw(split, 7, seed=0)


def test_benchmark_with_val_records_three_labelled_ids_and_says_m3(synth_cache, tmp_path):
    _, cache = synth_cache  # 6 cases, 2 folds: 3 non-test cases -> 1 training + 2 validation at val_fraction 0.6
    cfg = BenchmarkConfig(methods=["scratch"], labeled=[1], val=2, folds=2, run_folds=[0], seeds=[0],
                          finetune_preset="cpu-tiny", finetune_steps=2, eval_at=[1.0],
                          finetune={"data": {"crop_size": [16, 16, 16]}, "val_fraction": 0.6, "val_every": 1})
    rows = read_results(run_benchmark(cache, tmp_path / "b", cfg, **QUIET))
    assert {(r["labeled"], r["val"]) for r in rows} == {(3, 2)}
    split = json.loads((tmp_path / "b" / "runs" / "fold0_seed0" / "finetune_scratch_M3v2" / "split.json").read_text())
    assert len(split["labeled"]) == 1 and len(split["validation"]) == 2 and split["label_budget"] == 3
    assert not set(split["labeled"]) & set(split["validation"])
    assert {r["checkpoint"] for r in rows} == {"best"}  # the validation volumes chose the checkpoint
    md = (tmp_path / "b" / "results.md").read_text(encoding="utf-8")
    assert "| method | M=3 (2 val) |" in md and "validation volumes for checkpoint choice included" in md
    with open(tmp_path / "b" / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:len(STANDARD_COLUMNS)] == list(STANDARD_COLUMNS) and header[len(STANDARD_COLUMNS):]
    assert all(h.startswith("dice_") for h in header[len(STANDARD_COLUMNS):])


def test_every_fold_is_checked_before_the_first_run(phantom_cache, tmp_path):
    cfg = BenchmarkConfig(methods=["scratch"], labeled=[1], val=3, folds=2, finetune_preset="cpu-tiny")
    with pytest.raises(InputError, match="validation volumes exceed"):
        run_benchmark(phantom_cache, tmp_path / "b", cfg, **QUIET)
    assert not (tmp_path / "b" / "runs").exists()


# ------------------------------------------------------------------------------------------ paired statistics


def _hand_table(path, diff, rng):
    """scratch and pcl on 2 folds x 2 seeds x 3 cases; pcl = scratch + diff(fold, seed, case)."""
    rows, expected = [], []
    for fold in (0, 1):
        for seed in (0, 1):
            for k in range(3):
                case = f"f{fold}c{k}"
                base = float(rng.uniform(0.4, 0.7))
                d = diff(fold, seed, k)
                expected.append(d)
                for method, dice in (("scratch", base), ("pcl", base + d)):
                    rows.append({"method": method, "labeled": 1, "fold": fold, "seed": seed, "at": 1.0,
                                 "case": case, "dice": dice, "hd95": 1.0, "n_test": 3})
    append_results(path, rows)
    return np.asarray(expected)


def test_bootstrap_ci_equals_a_direct_numpy_computation(tmp_path, rng):
    d = _hand_table(tmp_path / "r.csv", lambda f, s, k: [0.05, -0.02, 0.11][k] * (1 + f) - 0.01 * s, rng)
    idx = np.random.default_rng(0).integers(0, d.size, size=(2000, d.size))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert bootstrap_ci(d) == pytest.approx((lo, hi), abs=1e-12)
    [rec] = paired_stats(read_results(tmp_path / "r.csv"))
    assert rec["method"] == "pcl" and rec["baseline"] == "scratch" and rec["n"] == 12
    assert rec["diff"] == pytest.approx(d.mean()) and (rec["lo"], rec["hi"]) == pytest.approx((lo, hi), abs=1e-9)
    assert (rec["wins"], rec["losses"]) == (int((d > 0).sum()), int((d < 0).sum()))
    assert bootstrap_ci(d) == bootstrap_ci(d)  # seeded: deterministic
    assert math.isnan(bootstrap_ci(np.array([0.3]))[0])


def test_gain_is_called_only_when_the_ci_excludes_zero(tmp_path, rng):
    assert gain_label(0.001, 0.05) == "gain" and gain_label(-0.05, -0.001) == "loss"
    assert gain_label(-0.01, 0.05) == "no clear difference" and gain_label(0.0, 0.05) == "no clear difference"
    assert gain_label(math.nan, math.nan) == "n/a"
    _hand_table(tmp_path / "gain.csv", lambda f, s, k: 0.05 + 0.01 * k, rng)
    md = write_report(tmp_path / "gain.csv", tmp_path / "g", n_boot=200)[0].read_text(encoding="utf-8")
    assert "| gain |" in md and "a gain beyond noise" in md
    _hand_table(tmp_path / "noise.csv", lambda f, s, k: (-1) ** (k + s) * 0.05, rng)
    md = write_report(tmp_path / "noise.csv", tmp_path / "n", n_boot=200)[0].read_text(encoding="utf-8")
    assert "| no clear difference |" in md and "not a gain" in md and "| gain |" not in md


# ---------------------------------------------------------------------------------------- recipe and schedule


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_lr_schedule_follows_its_formula(schedule):
    s = LoopSettings(steps=50, lr=1e-2, min_lr=1e-4, warmup_steps=10, schedule=schedule, poly_power=0.9)
    for step in range(10):
        assert lr_at(step, s) == pytest.approx(1e-2 * (step + 1) / 10)
    for step in (10, 23, 37, 49):
        t = (step - 10) / 40
        want = (1e-4 + (1e-2 - 1e-4) * (1 - t) ** 0.9 if schedule == "poly"
                else 1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi * t)))
        assert lr_at(step, s) == pytest.approx(want)


def test_recipe_settings_scratch_lr_and_warmup_share():
    cfg = resolve_finetune_config("cpu-tiny", None, {"steps": 40, "warmup_fraction": 0.25, "scratch_lr": 7e-3,
                                                     "optim": {"lr": 2e-3}})
    s = finetune_loop_settings(cfg)
    assert (s.lr, s.warmup_steps, s.schedule, s.poly_power) == (7e-3, 10, "poly", 0.9)
    pre = resolve_finetune_config("cpu-tiny", None, {"steps": 40, "scratch_lr": 7e-3, "init": "some/run"})
    assert finetune_loop_settings(pre).lr == pre.optim.lr  # scratch's own lr is for scratch only
    assert snapshot_steps(300, [0.1, 0.3, 1.0]) == [30, 90] and snapshot_steps(4, [0.1, 1.0]) == [1]
    with pytest.raises(InputError, match="poly or cosine"):
        resolve_finetune_config("cpu-tiny", None, {"lr_schedule": "step"})


def test_pretrained_encoder_runs_at_its_lr_scale(phantom_cache, tmp_path, monkeypatch):
    pre = tmp_path / "pre"
    pretrain(phantom_cache, pre, resolve_pretrain_config("cpu-tiny", None, {
        "steps": 2, "data": {"crop_size": [16, 16, 16]}, "probe_crops": 0}), progress=False)
    made = []
    real = trainer_mod.build_optimizer

    def spy(params, s, device):
        made.append((params, real(params, s, device), s))
        return made[-1][1]

    monkeypatch.setattr(trainer_mod, "build_optimizer", spy)
    cfg = resolve_finetune_config("cpu-tiny", None, {
        "init": str(pre), "folds": 2, "steps": 5, "warmup_fraction": 0.4, "encoder_lr_scale": 0.25,
        "optim": {"lr": 1e-2}, "data": {"crop_size": [16, 16, 16]}, "log_every": 1})
    finetune(phantom_cache, tmp_path / "ft", cfg, progress=False)
    groups, opt, s = made[-1]
    last = 1e-2 * (1 - (4 - 2) / 3) ** 0.9  # step 4 of 5: warm-up 2 steps, then poly over 3
    assert lr_at(4, s) == pytest.approx(last)
    enc = {id(p) for p in groups[0]["params"]}
    for g in opt.param_groups:
        scale = 0.25 if all(id(p) in enc for p in g["params"]) else 1.0
        assert g["lr"] == pytest.approx(last * scale)
    assert {g["lr_scale"] for g in opt.param_groups} == {0.25, 1.0}


# ------------------------------------------------------------------------------------------------ convergence


def test_converged_flag_follows_the_least_squares_rise():
    steps = np.arange(5, 101, 5)  # last 20% of 100 steps: the points at 85, 90, 95, 100
    saturating = 0.9 - 0.8 * np.exp(-steps / 10)  # rises ~0.0016 Dice over the window
    assert training_converged(steps, saturating, 100)
    assert not training_converged(steps, np.linspace(0.1, 0.9, steps.size), 100)  # still climbing
    s = np.arange(1, 101)
    v = 0.8 + 0.0009 * s  # a straight line rising 0.018 Dice over the last 20 steps
    assert training_converged(s, v, 100, tol=0.02) and not training_converged(s, v, 100, tol=0.015)
    assert training_converged(s, v[::-1], 100, tol=0.02) and not training_converged(s, v[::-1], 100, tol=0.015)
    assert not training_converged([90, 100], [0.9, 0.9], 100)  # fewer than 3 points: not judged converged


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_and_config_give_the_same_results_csv(phantom_cache, tmp_path):
    cfg = BenchmarkConfig(methods=["scratch"], labeled=[1], folds=2, run_folds=[1], seeds=[3],
                          finetune_preset="cpu-tiny", finetune_steps=3, eval_at=[0.5, 1.0],
                          finetune={"data": {"crop_size": [16, 16, 16]}, "log_every": 1})
    a = read_results(run_benchmark(phantom_cache, tmp_path / "a", cfg, **QUIET))
    b = read_results(run_benchmark(phantom_cache, tmp_path / "b", cfg, **QUIET))
    drop = ("seconds", "finetune_run")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert len(a) == 2 * a[0]["n_test"]


def test_cli_scratch_lr_sweep_uses_development_cases_and_is_recorded(phantom_cache, tmp_path, capsys):
    from volcontrast.cli import main

    (tmp_path / "b.yaml").write_text("finetune:\n  data:\n    crop_size: [16, 16, 16]\n  log_every: 1\n")
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", str(phantom_cache), "--out", str(out), "--methods", "scratch", "--labeled", "1",
              "--folds", "2", "--run-folds", "1", "--finetune-preset", "cpu-tiny", "--finetune-steps", "2",
              "--lr-sweep", "1e-3,1e-2", "--eval-at", "1", "--config", str(tmp_path / "b.yaml"), "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    sweep = json.loads((out / "lr_sweep.json").read_text())
    split = kfold_splits(open_cache(phantom_cache).labelled_ids, 2, seed=0)[1]
    assert sweep["lrs"] == [1e-3, 1e-2] and sweep["chosen"] in sweep["lrs"] and len(sweep["dice"]) == 2
    assert sweep["cases"] == split.val and not set(sweep["cases"]) & set(split.test)  # never the test fold
    rows = read_results(out / "results.csv")
    assert {r["lr"] for r in rows} == {sweep["chosen"]}
    report = (out / "results.md").read_text()
    assert f"Scratch learning rate {sweep['chosen']:.2g}, chosen by a sweep" in report
    # two candidates: a strict winner is an edge of the grid, and results.md says so
    assert ("candidate won: a" in report) == (sweep["dice"][0] != sweep["dice"][1])
    # another fine-tuning length into the same folder would mix two protocols in one table: one line, exit 2
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", str(phantom_cache), "--out", str(out), "--methods", "scratch", "--labeled", "1",
              "--folds", "2", "--run-folds", "1", "--finetune-preset", "cpu-tiny", "--finetune-steps", "3",
              "--lr-sweep", "1e-3,1e-2", "--eval-at", "1", "--config", str(tmp_path / "b.yaml"), "--quiet"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"error: {out / 'benchmark.json'}: this folder's benchmark ran with "
                                       "finetune_steps = 2, not 3; its finished runs would mix both settings: use a "
                                       "new --out\n")
    assert (out / "results.csv").read_bytes() == before
    # more methods, seeds and budgets only add cells: accepted
    recorded = json.loads((out / "benchmark.json").read_text())
    more = from_dict(BenchmarkConfig, {k: v for k, v in recorded.items() if k != "cache"})
    check_same_settings(out, merge(more, {"methods": ["scratch", "pcl"], "seeds": [0, 1], "labeled": [1, 2]}),
                        open_cache(phantom_cache))


def test_lr_sweep_for_every_method_gives_each_its_own_recorded_lr(phantom_cache, tmp_path):
    pre_cfg = {"data": {"crop_size": [16, 16, 16]}, "probe_crops": 0}
    cfg = BenchmarkConfig(methods=["scratch", "simclr"], labeled=[1], folds=2, run_folds=[1], seeds=[0],
                          pretrain_preset="cpu-tiny", pretrain_steps=2, pretrain=pre_cfg,
                          finetune_preset="cpu-tiny", finetune_steps=2, eval_at=[1.0], lr_sweep=[1e-3, 1e-2],
                          lr_sweep_methods=["all"], finetune={"data": {"crop_size": [16, 16, 16]}, "log_every": 1})
    out = tmp_path / "bench"
    rows = read_results(run_benchmark(phantom_cache, out, cfg, **QUIET))
    split = kfold_splits(open_cache(phantom_cache).labelled_ids, 2, seed=0)[1]
    scratch = json.loads((out / "lr_sweep.json").read_text())
    simclr = json.loads((out / "lr_sweep_simclr.json").read_text())
    assert simclr["method"] == "simclr"
    assert {simclr["init"]} == {r["pretrain_run"] for r in rows if r["method"] == "simclr"}  # its own pretraining
    assert simclr["cases"] == scratch["cases"] == split.val  # the same development cases, never the test fold
    assert sorted(p.name for p in (out / "runs" / "lr_sweep").iterdir()) == [
        "scratch_lr0.001_M1", "scratch_lr0.01_M1", "simclr_lr0.001_M1", "simclr_lr0.01_M1"]
    assert {r["lr"] for r in rows if r["method"] == "scratch"} == {scratch["chosen"]}
    assert {r["lr"] for r in rows if r["method"] == "simclr"} == {simclr["chosen"]}
    report = (out / "results.md").read_text()
    assert f"simclr learning rate {simclr['chosen']:.2g}, chosen by a sweep" in report
    # a rerun reuses both records: no sweep run is started again
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs" / "lr_sweep").rglob("model.safetensors")}
    run_benchmark(phantom_cache, out, cfg, **QUIET)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs" / "lr_sweep").rglob("model.safetensors")} == stamp


def test_scratch_of_another_dimension_gets_its_own_sweep_in_that_dimension(phantom_cache, tmp_path):
    # the default sweep (scratch only) tunes scratch@2d as a baseline of its own: its candidates run as 2D networks
    # and its rows use its own choice; with no 3D scratch in the table, no 3D scratch is swept
    cfg = BenchmarkConfig(methods=["scratch@2d"], labeled=[1], folds=2, run_folds=[1], seeds=[0],
                          finetune_preset="cpu-tiny", finetune_steps=2, eval_at=[1.0], lr_sweep=[1e-3, 1e-2],
                          finetune={"data": {"crop_size": [16, 16, 16]}, "log_every": 1})
    out = tmp_path / "bench"
    rows = read_results(run_benchmark(phantom_cache, out, cfg, **QUIET))
    assert not (out / "lr_sweep.json").exists()
    record = json.loads((out / "lr_sweep_scratch_2d.json").read_text())
    assert record["method"] == "scratch@2d" and record["init"] == "scratch" and record["lrs"] == [1e-3, 1e-2]
    runs = sorted((out / "runs" / "lr_sweep").iterdir())
    assert [p.name for p in runs] == ["scratch@2d_lr0.001_M1", "scratch@2d_lr0.01_M1"]
    assert {yaml.safe_load((p / "config.yaml").read_text())["dim"] for p in runs} == {2}
    assert {r["lr"] for r in rows} == {record["chosen"]} and {r["method"] for r in rows} == {"scratch@2d"}
    report = (out / "results.md").read_text()
    assert f"scratch@2d learning rate {record['chosen']:.2g}, chosen by a sweep" in report
    assert "Scratch learning rate" not in report  # no 3D scratch row, so no line about its learning rate
    # a fixed --scratch-lr applies to every scratch row: no sweep
    fixed = read_results(run_benchmark(phantom_cache, tmp_path / "fixed", merge(cfg, {"scratch_lr": 3e-3}), **QUIET))
    assert {r["lr"] for r in fixed} == {3e-3} and not (tmp_path / "fixed" / "runs" / "lr_sweep").exists()


def test_new_cells_at_another_learning_rate_are_refused(phantom_cache, tmp_path):
    cfg = BenchmarkConfig(methods=["scratch"], labeled=[1], folds=2, run_folds=[1], seeds=[0], scratch_lr=1e-3,
                          finetune_preset="cpu-tiny", finetune_steps=2, eval_at=[1.0],
                          finetune={"data": {"crop_size": [16, 16, 16]}, "log_every": 1})
    out = tmp_path / "b"
    run_benchmark(phantom_cache, out, cfg, **QUIET)
    before = (out / "results.csv").read_bytes()
    with pytest.raises(InputError) as exc:  # a new seed is accepted, but not at another rate
        run_benchmark(phantom_cache, out, merge(cfg, {"seeds": [0, 1], "scratch_lr": 1e-2}), **QUIET)
    assert exc.value.line() == (f"{out / 'results.csv'}: scratch's finished cells were fine-tuned at learning rate "
                                "0.001, the new ones would be at 0.01 (another sweep choice or --scratch-lr); use a "
                                "new --out")
    assert (out / "results.csv").read_bytes() == before
    assert not (out / "runs" / "fold1_seed1").exists()


def test_jobs_give_the_rows_of_a_serial_run_with_the_workers_thread_count(phantom_cache, tmp_path):
    pre_cfg = {"data": {"crop_size": [16, 16, 16]}, "probe_crops": 0}
    cfg = BenchmarkConfig(methods=["scratch", "simclr"], labeled=[1], folds=2, run_folds=[1], seeds=[0, 1],
                          pretrain_preset="cpu-tiny", pretrain_steps=2, pretrain=pre_cfg,
                          finetune_preset="cpu-tiny", finetune_steps=2, eval_at=[1.0], lr_sweep=[1e-3, 1e-2],
                          lr_sweep_methods=["all"], finetune={"data": {"crop_size": [16, 16, 16]}, "log_every": 1})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what each of 2 workers gets from 2 threads
        serial = read_results(run_benchmark(phantom_cache, tmp_path / "a", cfg, **QUIET))
        torch.set_num_threads(2)
        lines: list[str] = []
        parallel = read_results(run_benchmark(phantom_cache, tmp_path / "b", cfg, progress=False, log=lines.append,
                                              jobs=2))
    finally:
        torch.set_num_threads(threads)

    def table(rows):
        return sorted(({k: v for k, v in r.items() if k not in ("seconds", "finetune_run", "pretrain_run")}
                       for r in rows), key=lambda r: (r["method"], r["seed"], r["case"]))

    assert len(parallel) == len(serial) == 2 * 2 * serial[0]["n_test"]
    assert table(parallel) == table(serial)
    for record in ("lr_sweep.json", "lr_sweep_simclr.json"):
        a = json.loads((tmp_path / "a" / record).read_text())
        b = json.loads((tmp_path / "b" / record).read_text())
        assert {**a, "init": ""} == {**b, "init": ""}
    # the workers' log lines reach the caller's log: every start and every result
    assert sum("fine-tune" in x for x in lines) == 4 and sum("test Dice" in x for x in lines) == 4
    assert sum(x.startswith("[lr sweep] scratch lr") for x in lines) == 2


# ------------------------------------------------------------------------------------------------ frozen probe


def test_frozen_probe_leaves_every_encoder_tensor_bit_identical(phantom_cache, tmp_path):
    from safetensors.torch import load_file

    pre = tmp_path / "pre"
    pretrain(phantom_cache, pre, resolve_pretrain_config("cpu-tiny", None, {
        "steps": 2, "data": {"crop_size": [16, 16, 16]}, "probe_crops": 0}), progress=False)
    cfg = resolve_finetune_config("cpu-tiny", None, {
        "init": str(pre), "folds": 2, "steps": 3, "freeze_encoder": True, "optim": {"lr": 1e-2},
        "data": {"crop_size": [16, 16, 16]}})
    finetune(phantom_cache, tmp_path / "ft", cfg, progress=False)
    before = {k[len("backbone."):]: v for k, v in load_file(str(pre / "model.safetensors")).items()
              if k.startswith("backbone.encoder.")}
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert before and all(torch.equal(after[k], v) for k, v in before.items())  # weights and norm buffers
    fresh, _ = build_segmentation_backbone(open_cache(phantom_cache), cfg)
    moved = [k for k, v in fresh.state_dict().items() if k.startswith("decoder.") and k in after
             and v.is_floating_point() and not torch.equal(after[k], v)]
    assert moved  # the decoder did train


def test_baseline_pairs_variants_and_dimension_with_their_own_scratch():
    from volcontrast.bench.report import baseline_of

    methods = ["scratch", "scratch+frozen", "scratch@2d", "pcl", "pcl+frozen", "pcl@2d", "pcl+pdcr"]
    assert baseline_of("pcl", methods) == "scratch" and baseline_of("pcl+frozen", methods) == "scratch+frozen"
    assert baseline_of("pcl@2d", methods) == "scratch@2d" and baseline_of("pcl+pdcr", methods) == "scratch"
    assert baseline_of("scratch+frozen", methods) is None and baseline_of("pcl", ["pcl"]) is None


def test_a_crop_larger_than_a_case_stops_the_benchmark_before_any_run(phantom_cache, tmp_path):
    cfg = BenchmarkConfig(methods=["scratch", "pcl"], labeled=[1], folds=2, pretrain_preset="cpu-tiny",
                          finetune_preset="cpu-tiny", pretrain={"data": {"crop_size": [64, 64, 64]}})
    with pytest.raises(InputError, match="smaller than the requested crop"):
        run_benchmark(phantom_cache, tmp_path / "b", cfg, **QUIET)
    assert not (tmp_path / "b" / "runs").exists()


# ------------------------------------------------------------------------------------------------ benchmark presets


def test_every_benchmark_preset_is_a_valid_config_with_registered_methods():
    from volcontrast.bench.benchmark import benchmark_presets, load_benchmark_preset, parse_method
    from volcontrast.config import from_dict

    names = benchmark_presets()
    assert {"cpu-study", "cpu-study-ct", "cpu-protocol", "gpu-study"} <= set(names)
    for name in names:
        cfg = from_dict(BenchmarkConfig, load_benchmark_preset(name), where=name)  # unknown fields raise
        assert cfg.methods[0] == "scratch" and all(parse_method(m, cfg.dim) for m in cfg.methods)
        assert cfg.val == 0 and min(cfg.labeled) >= 1 and len(cfg.seeds) >= 2 and cfg.folds >= 3  # the protocol
    assert load_benchmark_preset("gpu-study")["lr_sweep_methods"] == ["all"]
    assert load_benchmark_preset("cpu-study")["lr_sweep_methods"] == ["all"]


def test_cli_preset_with_config_and_option_overrides_and_unknown_preset(phantom_cache, tmp_path, capsys):
    from volcontrast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["benchmark", str(phantom_cache), "--out", str(tmp_path / "x"), "--preset", "nope"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --preset: unknown benchmark preset 'nope'; choose one of cpu-protocol, cpu-study, cpu-study-ct, "
        "cpu-study-remap, gpu-study"]
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", str(phantom_cache), "--out", str(tmp_path / "x"), "--methods", "scratch,pcl",
              "--lr-sweep", "1e-3,1e-2", "--lr-sweep-methods", "scratch,spade"])
    assert exc.value.code == 2 and not (tmp_path / "x" / "runs").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --lr-sweep-methods: 'spade' is not one of the benchmarked methods (scratch, pcl) or all"]
    # the preset's fields, then --config's, then the options: a 2-step scratch run on the phantom cache
    (tmp_path / "b.yaml").write_text("finetune:\n  data:\n    crop_size: [16, 16, 16]\n  log_every: 1\n"
                                     "finetune_preset: cpu-tiny\nlr_sweep: []\n")
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", str(phantom_cache), "--out", str(out), "--preset", "cpu-study", "--config",
              str(tmp_path / "b.yaml"), "--methods", "scratch", "--folds", "2", "--run-folds", "1", "--seeds", "4",
              "--finetune-steps", "2", "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    recorded = json.loads((out / "benchmark.json").read_text())
    assert recorded["eval_at"] == [0.1, 0.3, 1.0] and recorded["transductive"] is True  # from the preset
    assert recorded["finetune"]["optim"] == {"lr": 0.003}  # the preset's finetune block, merged with --config's
    assert recorded["finetune"]["data"]["crop_size"] == [16, 16, 16] and recorded["finetune_preset"] == "cpu-tiny"
    assert recorded["seeds"] == [4] and recorded["finetune_steps"] == 2 and recorded["methods"] == ["scratch"]
    assert {r["seed"] for r in read_results(out / "results.csv")} == {4}
