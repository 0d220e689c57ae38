"""``volcontrast benchmark``: the few-label protocol (METHODS.md section 5), resumable.

For every fold x seed: the labelled cases are split (:func:`~volcontrast.data.splits.kfold_splits`), each
pretraining method is trained once on that fold's pretraining pool (training-fold images, or every image with
``transductive``), then every (method, label budget) cell is fine-tuned with the same labelled draw and scored
on the test fold (pretraining runs are shared by folds whose pools are equal, e.g. all folds when transductive).
One row per cell goes to ``results.csv``; ``results.md`` and ``results.png`` are rewritten
from it. Finished cells are skipped on a rerun; an interrupted pretraining run is resumed.

Method specs: ``scratch`` (no pretraining) or a pretraining method (``simclr``, ``gcl``, ``pcl``, ...), optional
fine-tuning variants ``+pdcr`` / ``+uafs``, and an optional ``@2d`` / ``@3d`` dimension (default ``dim``), e.g.
``scratch,pcl,pcl@2d,scratch+pdcr+uafs,pcl+pdcr+uafs``. Variants share the pretraining run of their method.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volcontrast.bench.report import append_result, finished_cells, write_report
from volcontrast.config import merge, to_dict
from volcontrast.data.cache import Cache
from volcontrast.data.splits import kfold_splits, pretraining_pool
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.evaluate import evaluate
from volcontrast.engine.finetune import finetune, resolve_finetune_config
from volcontrast.engine.pretrain import pretrain
from volcontrast.engine.run import RunDir
from volcontrast.errors import InputError
from volcontrast.methods import METHODS
from volcontrast.utils.files import atomic_write_json, stable_hash


@dataclass
class BenchmarkConfig:
    methods: list[str] = field(default_factory=lambda: ["scratch", "simclr", "gcl", "pcl"])
    labeled: list[int] = field(default_factory=lambda: [1, 2, 4])
    folds: int = 3
    run_folds: list[int] = field(default_factory=list)  # subset of folds to run (empty = all)
    seeds: list[int] = field(default_factory=lambda: [0])
    split_seed: int = 0
    transductive: bool = False
    dim: int = 3
    pretrain_preset: str = "cpu-small"
    finetune_preset: str = "cpu-small"
    pretrain_steps: int = 0  # 0 = the preset's
    finetune_steps: int = 0
    pretrain: dict[str, Any] = field(default_factory=dict)  # overrides of the pretraining config
    finetune: dict[str, Any] = field(default_factory=dict)  # overrides of the fine-tuning config
    pretrain_2d: dict[str, Any] = field(default_factory=dict)  # extra overrides for @2d pretraining
    # extra pretraining overrides per method, e.g. {"alice": {"steps": 500, "alice": {"mask_block": [4, 4]}}}
    pretrain_by_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    finetune_2d: dict[str, Any] = field(default_factory=dict)  # extra overrides for @2d fine-tuning


FINETUNE_VARIANTS = ("pdcr", "uafs")


def parse_method(spec: str, default_dim: int) -> tuple[str, int, tuple[str, ...]]:
    """``"pcl+pdcr@2d"`` -> ("pcl", 2, ("pdcr",)); ``"scratch"`` -> ("scratch", default_dim, ())."""
    head, _, dim = spec.strip().partition("@")
    name, *variants = head.split("+")
    if name != "scratch" and name not in METHODS:
        raise InputError("--methods", f"unknown method {name!r}; choose scratch or one of {', '.join(METHODS)}")
    bad = [v for v in variants if v not in FINETUNE_VARIANTS]
    if bad:
        raise InputError("--methods", f"unknown variant {bad[0]!r} in {spec!r}; use +pdcr and/or +uafs")
    if dim and dim.lower() not in ("2d", "3d"):
        raise InputError("--methods", f"bad dimension in {spec!r}; use @2d or @3d")
    return name, int(dim[0]) if dim else default_dim, tuple(sorted(set(variants)))


def _complete(run: Path, steps: int) -> bool:
    r = RunDir(run)
    return r.exists() and (r.latest_step() or 0) >= steps


def run_benchmark(cache: str | os.PathLike | Cache, out: str | os.PathLike, config: BenchmarkConfig | None = None,
                  *, progress: bool = True, log=print) -> Path:
    """Run every missing cell of the benchmark; returns the path of ``results.csv``."""
    config = config or BenchmarkConfig()
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [parse_method(m, config.dim) for m in config.methods]
    if not config.labeled or min(config.labeled) < 1:
        raise InputError("--labeled", "needs label budgets >= 1")
    atomic_write_json(out / "benchmark.json", {**to_dict(config), "cache": str(cache.root.resolve())})
    results = out / "results.csv"
    done = finished_cells(results)
    splits = kfold_splits(cache.labelled_ids, config.folds, seed=config.split_seed)
    folds = config.run_folds or list(range(config.folds))
    for fold in folds:
        if not 0 <= fold < config.folds:
            raise InputError("--run-folds", f"fold {fold} is not in 0..{config.folds - 1}")
        split = splits[fold]
        if max(config.labeled) > len(split.train):
            raise InputError("--labeled", f"budget {max(config.labeled)} exceeds the {len(split.train)} training cases"
                             f" of fold {fold}")
        pool = pretraining_pool(split, cache.ids, config.transductive)
        for seed in config.seeds:
            cell_dir = out / "runs" / f"fold{fold}_seed{seed}"
            for name, dim, variants in specs:
                base = name if dim == config.dim else f"{name}@{dim}d"
                label = "+".join([name, *variants]) + ("" if dim == config.dim else f"@{dim}d")
                todo = [m for m in config.labeled if (label, m, fold, seed) not in done]
                if not todo:
                    continue
                init = "scratch"
                if name != "scratch":
                    # one pretraining run per (method, seed, pool): folds with the same pool (transductive) share it
                    pre_dir = out / "runs" / "pretrain" / f"{base}_seed{seed}_pool{stable_hash(pool)[:8]}"
                    init = str(_pretrain_cell(cache, pre_dir, config, name, dim, seed, pool, progress, log))
                for budget in todo:
                    t0 = time.perf_counter()
                    run = cell_dir / f"finetune_{label}_M{budget}"
                    if run.exists():
                        shutil.rmtree(run)  # an unfinished cell: start it again
                    over = merge_dicts(config.finetune, config.finetune_2d if dim == 2 else {})
                    over.update({"init": init, "labeled": budget, "fold": fold, "folds": config.folds,
                                 "seed": seed, "split_seed": config.split_seed, "dim": dim,
                                 **{v: True for v in variants}})
                    if config.finetune_steps:
                        over["steps"] = config.finetune_steps
                    ft_cfg = resolve_finetune_config(config.finetune_preset, None, over)
                    log(f"[fold {fold} seed {seed}] fine-tune {label} with {budget} labelled volume(s)")
                    finetune(cache, run, ft_cfg, progress=progress)
                    metrics = evaluate(run, cache, progress=False)
                    row = _result_row(label, budget, fold, seed, metrics, init, run, time.perf_counter() - t0,
                                      "transductive" if config.transductive else "fold", cache.label_names)
                    append_result(results, row)
                    log(f"[fold {fold} seed {seed}] {label} M={budget}: test Dice {row['dice']:.4f}")
                    write_report(results, out)
    if results.exists():
        write_report(results, out)
    return results


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pretrain_cell(cache: Cache, run: Path, config: BenchmarkConfig, method: str, dim: int, seed: int,
                   pool: list[str], progress: bool, log) -> Path:
    over = merge_dicts(config.pretrain, config.pretrain_2d if dim == 2 else {})
    if config.pretrain_steps:
        over["steps"] = config.pretrain_steps
    over = merge_dicts(over, config.pretrain_by_method.get(method, {}))
    over.update({"method": method, "dim": dim, "seed": seed})
    over.setdefault("data", {})["pool"] = pool
    cfg = resolve_pretrain_config(config.pretrain_preset, None, over)
    if _complete(run, cfg.steps):
        return run
    if RunDir(run).exists():
        log(f"resume pretraining {method} ({dim}D) in {run}")
        pretrain(cache, run, resume=True, progress=progress)
    else:
        if run.exists():
            shutil.rmtree(run)
        log(f"pretrain {method} ({dim}D) on {len(pool)} images for {cfg.steps} steps")
        pretrain(cache, run, cfg, progress=progress)
    return run


def _result_row(method: str, budget: int, fold: int, seed: int, metrics: dict[str, Any], init: str, run: Path,
                seconds: float, pool: str, label_names: dict[int, str]) -> dict[str, Any]:
    agg = metrics["aggregate"]
    row: dict[str, Any] = {
        "method": method, "labeled": budget, "fold": fold, "seed": seed,
        "dice": agg["mean_dice"], "hd95": agg["mean_hd95"], "n_test": agg["n_cases"],
        "pretrain_run": "" if init == "scratch" else init, "finetune_run": str(run), "seconds": round(seconds, 1),
        "pool": pool,
    }
    for c, name in sorted(label_names.items()):  # every class of the dataset: a fixed set of columns
        if c > 0:
            row[f"dice_{name}"] = agg["per_class"].get(c, {}).get("dice", float("nan"))
    return row


def config_with(base: BenchmarkConfig, overrides: dict[str, Any]) -> BenchmarkConfig:
    return merge(base, {k: v for k, v in overrides.items() if v is not None})
