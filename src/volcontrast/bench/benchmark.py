"""``volcontrast benchmark``: the few-label protocol (METHODS.md section 5), resumable.

For every fold x seed: the labelled cases are split (:func:`~volcontrast.data.splits.kfold_splits`), each
pretraining method is trained once on that fold's pretraining pool (training-fold images, or every image with
``transductive``), then every (method, label budget) cell is fine-tuned with the same labelled draw and scored
on the test fold (pretraining runs are shared by folds whose pools are equal, e.g. all folds when transductive).
One row per test case and scored point goes to ``results.csv``; ``results.md`` and ``results.png`` are
rewritten from it. Finished cells are skipped on a rerun; an interrupted pretraining run is resumed.

The protocol (issue 17):

- **Every label counts.** ``labeled`` are training volumes; ``val`` (default 0) adds validation volumes for
  checkpoint choice, and the budget reported is M = labeled + val. With ``val = 0`` no label outside the training
  volumes is read: fixed schedule, the last weights are scored.
- **One recipe** (:class:`~volcontrast.engine.finetune.FinetuneConfig`): whole-network warm-up, poly decay, a
  pretrained encoder at ``encoder_lr_scale`` x the learning rate, scratch at its own ``scratch_lr`` — chosen by
  :func:`sweep_lr` on development cases (a fold's validation cases, never its test fold) when
  ``lr_sweep`` lists candidates; the choice goes to ``lr_sweep.json`` and ``results.md``. ``lr_sweep_methods``
  gives pretrained methods the same sweep (each its own ``lr_sweep_<method>.json``).
- **Dice during fine-tuning**: snapshots at ``eval_at`` shares of the steps are scored on the test fold too, and
  each run's training-Dice curve decides its ``converged`` flag.
- **Checked up front**: every fold's budgets are checked before the first run starts.

Method specs: ``scratch`` (no pretraining) or a pretraining method (``simclr``, ``gcl``, ``pcl``, ...), optional
fine-tuning variants ``+pdcr`` / ``+uafs``, and an optional ``@2d`` / ``@3d`` dimension (default ``dim``), e.g.
``scratch,pcl,pcl@2d,scratch+pdcr+uafs,pcl+pdcr+uafs``. Variants share the pretraining run of their method.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volcontrast.bench.report import (
    CONVERGE_TOL,
    append_results,
    finished_cells,
    read_results,
    training_converged,
    write_report,
)
from volcontrast.config import merge, to_dict
from volcontrast.data.cache import Cache
from volcontrast.data.splits import kfold_splits, pretraining_pool
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.evaluate import evaluate
from volcontrast.engine.finetune import finetune, finetune_loop_settings, resolve_finetune_config
from volcontrast.engine.pretrain import pretrain
from volcontrast.engine.run import RunDir
from volcontrast.errors import InputError
from volcontrast.methods.registry import list_methods
from volcontrast.utils.files import atomic_write_json, read_json, stable_hash


@dataclass
class BenchmarkConfig:
    methods: list[str] = field(default_factory=lambda: ["scratch", "simclr", "gcl", "pcl"])
    labeled: list[int] = field(default_factory=lambda: [1, 2, 4])  # labelled *training* volumes per run
    val: int = 0  # + labelled validation volumes for checkpoint choice (counted in the budget M); 0 = none
    eval_at: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # shares of the steps scored on test
    scratch_lr: float = 0.0  # scratch's own learning rate (0 = the fine-tuning config's optim.lr)
    lr_sweep: list[float] = field(default_factory=list)  # candidates: sweep scratch's lr first (dev cases)
    # whose fine-tuning lr the sweep chooses: scratch only (default), named methods ("pcl", "simclr+pdcr"), or
    # ["all"] — every method gets the same candidates and development cases (equal tuning effort)
    lr_sweep_methods: list[str] = field(default_factory=lambda: ["scratch"])
    sweep_labeled: list[int] = field(default_factory=list)  # budgets the sweep fine-tunes with (empty = labeled)
    converge_tol: float = CONVERGE_TOL  # training Dice flat within this over the last 20% of the steps
    eval: str = "finetune"  # finetune | frozen (every method as ``+frozen``: encoder fixed, decoder trained)
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
    jobs: int = 1  # runs at once, each in its own process with 1/jobs of the threads (CLI --jobs)


PRESET_DIR = Path(__file__).with_name("presets")  # benchmark presets: YAML files of BenchmarkConfig fields


def benchmark_presets() -> list[str]:
    """Names of the packaged benchmark presets (``volcontrast benchmark --preset NAME``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_benchmark_preset(name: str) -> dict[str, Any]:
    """The fields of a packaged benchmark preset (its YAML, comments say how it was sized and how to run it)."""
    from volcontrast.config import load_yaml

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError("--preset", f"unknown benchmark preset {name!r}; choose one of "
                                     f"{', '.join(benchmark_presets())}")
    return load_yaml(path)


FINETUNE_VARIANTS = ("pdcr", "uafs", "frozen")  # frozen: the frozen-encoder probe (decoder trained only)


def parse_method(spec: str, default_dim: int) -> tuple[str, int, tuple[str, ...]]:
    """``"pcl+pdcr@2d"`` -> ("pcl", 2, ("pdcr",)); ``"scratch"`` -> ("scratch", default_dim, ())."""
    head, _, dim = spec.strip().partition("@")
    name, *variants = head.split("+")
    if name != "scratch" and name not in list_methods():
        raise InputError("--methods", f"unknown method {name!r}; choose scratch or one of {', '.join(list_methods())}")
    bad = [v for v in variants if v not in FINETUNE_VARIANTS]
    if bad:
        raise InputError("--methods", f"unknown variant {bad[0]!r} in {spec!r}; use +pdcr, +uafs and/or +frozen")
    if dim and dim.lower() not in ("2d", "3d"):
        raise InputError("--methods", f"bad dimension in {spec!r}; use @2d or @3d")
    return name, int(dim[0]) if dim else default_dim, tuple(sorted(set(variants)))


def _complete(run: Path, steps: int) -> bool:
    r = RunDir(run)
    return r.exists() and (r.latest_step() or 0) >= steps


def run_benchmark(cache: str | os.PathLike | Cache, out: str | os.PathLike, config: BenchmarkConfig | None = None,
                  *, progress: bool = True, log=print, jobs: int | None = None) -> Path:
    """Run every missing cell of the benchmark; returns the path of ``results.csv``.

    Three phases: the pretraining runs the missing cells need, the learning-rate sweeps, then the fine-tuning
    cells. ``jobs`` (default ``config.jobs``) > 1 runs each phase's runs in that many worker processes at once,
    each with ``1/jobs`` of this process's torch threads (small networks use a few threads better than many);
    every run is still a function of its config and seed, so its result equals a serial run with the worker's
    thread count.
    """
    config = config or BenchmarkConfig()
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    out = Path(out)
    if jobs is not None:
        config = merge(config, {"jobs": jobs})
    jobs = config.jobs
    if jobs < 1:
        raise InputError("--jobs", f"must be >= 1, got {jobs}")
    if config.eval not in ("finetune", "frozen"):
        raise InputError("--eval", f"must be finetune or frozen, got {config.eval!r}")
    specs = [parse_method(m, config.dim) for m in config.methods]
    if config.eval == "frozen":
        specs = [(name, dim, tuple(sorted({*variants, "frozen"}))) for name, dim, variants in specs]
    splits = kfold_splits(cache.labelled_ids, config.folds, seed=config.split_seed,
                          val_fraction=_finetune_config(config, "scratch", 0, 0, 0, config.dim).val_fraction)
    folds = config.run_folds or list(range(config.folds))
    check_protocol(splits, folds, config)
    for fold in folds:  # every pretraining crop fits every image of every fold's pool, before any run starts
        pool = pretraining_pool(splits[fold], cache.ids, config.transductive)
        for name, dim, _ in specs:
            if name != "scratch":
                crop = tuple(_pretrain_config(config, name, dim, config.seeds[0], pool).data.crop_size)
                cache.check_min_size(crop, pool)
    out.mkdir(parents=True, exist_ok=True)
    check_same_settings(out, config, cache)
    atomic_write_json(out / "benchmark.json", {**to_dict(config), "cache": str(cache.root.resolve())})
    results = out / "results.csv"
    done = finished_cells(results)
    cells = []  # the missing (fold, seed, method, budget) cells, in table order
    for fold in folds:
        pool = pretraining_pool(splits[fold], cache.ids, config.transductive)
        for seed in config.seeds:
            for name, dim, variants in specs:
                base = name if dim == config.dim else f"{name}@{dim}d"
                label = _row_label(name, dim, variants, config.dim)
                for budget in config.labeled:
                    if (label, budget + config.val, config.val, fold, seed) not in done:
                        cells.append(_Cell(fold, seed, name, dim, variants, base, label, budget, pool))
    # the methods whose learning rate a sweep chooses: scratch's on the first run fold with no pretraining, a
    # pretrained method's there too, starting from the first seed's pretraining (one choice per benchmark)
    sweep_pool = pretraining_pool(splits[folds[0]], cache.ids, config.transductive)
    # scratch of another dimension or with variants (scratch@2d, scratch+pdcr) is a baseline of its own: it gets
    # its own sweep and record, not the 3D scratch's learning rate (a fixed --scratch-lr applies to every scratch)
    swept = {}
    for c in cells:
        if (config.lr_sweep and c.label != "scratch" and _swept(config, c.label) and c.label not in swept
                and not (c.name == "scratch" and config.scratch_lr)):
            swept[c.label] = c
    labels = {_row_label(name, dim, variants, config.dim) for name, dim, variants in specs}
    with _Workers(cache, jobs) as workers:
        # 1. pretraining: one run per (method, seed, pool), shared by the folds with that pool
        pre: dict[Path, tuple] = {}
        for c in [*cells, *[_Cell(**{**c.__dict__, "seed": config.seeds[0], "pool": sweep_pool})
                            for c in swept.values()]]:
            if c.name != "scratch":
                pre.setdefault(_pretrain_dir(out, c.base, c.seed, c.pool), (c.name, c.dim, c.seed, c.pool))
        tasks = [(_task_pretrain, (run, config, *args)) for run, args in pre.items()]
        for _, (_, lines) in workers.run(tasks, progress, log):
            for line in lines:
                log(line)
        # 2. learning-rate sweeps (scratch first); each choice is recorded as soon as its last run is scored
        plans = []
        if config.lr_sweep and not config.scratch_lr and _swept(config, "scratch") and "scratch" in labels:
            plans.append(_SweepPlan.make(cache, out, config, "scratch", "scratch", config.dim, (), log))
        for label, c in swept.items():
            init = "scratch" if c.name == "scratch" else str(_pretrain_dir(out, c.base, config.seeds[0], sweep_pool))
            plans.append(_SweepPlan.make(cache, out, config, label, init, c.dim, c.variants, log))
        method_lrs: dict[str, float] = {}

        def chosen(plan: _SweepPlan) -> None:
            nonlocal config
            lr = plan.choose(log)
            if plan.label == "scratch":
                config = merge(config, {"scratch_lr": lr})
                atomic_write_json(out / "benchmark.json", {**to_dict(config), "cache": str(cache.root.resolve())})
            else:
                method_lrs[plan.label] = lr

        for plan in plans:
            if not plan.runs:
                chosen(plan)  # a reused record
        tasks = [(_task_sweep_run, (run, cfg, plan.dev, start)) for plan in plans for run, cfg, start in plan.runs]
        owners = [(plan, i) for plan in plans for i in range(len(plan.runs))]
        left = {id(plan): len(plan.runs) for plan in plans}
        for k, (dice, lines) in workers.run(tasks, progress, log):
            for line in lines:
                log(line)
            plan, i = owners[k]
            plan.dice[i] = dice
            left[id(plan)] -= 1
            if not left[id(plan)]:
                chosen(plan)
        # 3. the fine-tuning cells, scored on their test fold; rows appended as each cell finishes
        tasks = []
        finished_lrs = lrs_by_method(results)
        for c in cells:
            init = "scratch" if c.name == "scratch" else str(_pretrain_dir(out, c.base, c.seed, c.pool))
            m_total = c.budget + config.val
            run = out / "runs" / f"fold{c.fold}_seed{c.seed}" / (f"finetune_{c.label}_M{m_total}"
                                                                  + (f"v{config.val}" if config.val else ""))
            ft_cfg = _finetune_config(config, init, c.budget, c.fold, c.seed, c.dim, c.variants,
                                      lr=method_lrs.get(c.label))
            check_same_lr(results, c.label, finetune_loop_settings(ft_cfg).lr, finished_lrs)
            start = (f"[fold {c.fold} seed {c.seed}] fine-tune {c.label} with M={m_total} labelled volume(s)"
                     + (f" ({config.val} for validation)" if config.val else ""))
            tasks.append((_task_cell, (run, ft_cfg, config, c.label, c.fold, c.seed, init,
                                       "transductive" if config.transductive else "fold", start)))
        for k, (rows, lines) in workers.run(tasks, progress, log):
            for line in lines:
                log(line)
            append_results(results, rows)
            c = cells[k]
            final = [r["dice"] for r in rows if r["at"] == 1.0]
            log(f"[fold {c.fold} seed {c.seed}] {c.label} M={c.budget + config.val}: test Dice {_nanmean(final):.4f}"
                f" (converged: {'yes' if rows[0]['converged'] == 1.0 else 'no'})")
            write_report(results, out)
    if results.exists():
        write_report(results, out)
    return results


@dataclass
class _Cell:
    fold: int
    seed: int
    name: str
    dim: int
    variants: tuple[str, ...]
    base: str  # pretraining run name (method, with @2d when not the benchmark's dimension)
    label: str  # row label (method, variants, dimension)
    budget: int
    pool: list[str]


class _Workers:
    """Runs ``(function, args)`` tasks here (``jobs = 1``) or in ``jobs`` spawned processes; yields (index, result).

    A task function takes ``(cache, *args, progress=..., log=...)`` and returns its result; ``run`` yields
    ``(index, (result, log lines))``: run here a task logs as it goes (no lines), in a worker its lines are
    collected and returned for the caller to log.
    When a worker's task fails, the other tasks still finish and are yielded; then the first error is raised.
    """

    def __init__(self, cache: Cache, jobs: int):
        self.cache, self.jobs, self.pool = cache, jobs, None

    def __enter__(self) -> _Workers:
        if self.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import torch

            threads = max(1, torch.get_num_threads() // self.jobs)
            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init,
                                            initargs=(str(self.cache.root), threads, os.getpid()))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is None:
            return
        if exc_type is not None:  # interrupted or failed here: stop the runs in flight too (rerun: they restart)
            for proc in list(getattr(self.pool, "_processes", {}).values()):
                proc.terminate()
        self.pool.shutdown(wait=exc_type is None, cancel_futures=True)

    def run(self, tasks: list[tuple], progress: bool, log):
        if self.pool is None:
            for i, (fn, args) in enumerate(tasks):
                yield i, (fn(self.cache, *args, progress=progress, log=log), [])
            return
        from concurrent.futures import as_completed

        futures = {self.pool.submit(_in_worker, fn, args): i for i, (fn, args) in enumerate(tasks)}
        error: BaseException | None = None
        try:
            for f in as_completed(futures):
                try:
                    result = f.result()
                except Exception as exc:  # the others' results are kept, then this is raised
                    error = error or exc
                    continue
                yield futures[f], result
        except BaseException:  # interrupted here, or the caller stopped: nothing more starts
            for f in futures:
                f.cancel()
            raise
        if error is not None:
            raise error


_WORKER: dict[str, Any] = {}  # a worker process's cache folder and its opened Cache


def _worker_init(cache_root: str, threads: int, parent: int) -> None:
    import threading

    from volcontrast.utils.threads import configure_threads

    configure_threads(threads)
    _WORKER["root"] = cache_root
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """A worker whose benchmark process is gone (killed, even with SIGKILL) stops instead of running on orphaned."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _in_worker(fn, args: tuple):
    if "cache" not in _WORKER:
        _WORKER["cache"] = Cache(_WORKER["root"])
    lines: list[str] = []
    return fn(_WORKER["cache"], *args, progress=False, log=lines.append), lines


def _task_pretrain(cache: Cache, run: Path, config: BenchmarkConfig, name: str, dim: int, seed: int,
                   pool: list[str], *, progress: bool, log) -> Path:
    return _pretrain_cell(cache, run, config, name, dim, seed, pool, progress, log)


def _task_sweep_run(cache: Cache, run: Path, cfg, dev: list[str], start: str, *, progress: bool,
                    log) -> float:
    if run.exists():
        shutil.rmtree(run)
    log(start)
    finetune(cache, run, cfg, progress=progress)
    return evaluate(run, cache, checkpoint="last", cases=dev, progress=False)["aggregate"]["mean_dice"]


def _task_cell(cache: Cache, run: Path, ft_cfg, config: BenchmarkConfig, label: str, fold: int, seed: int,
               init: str, pool: str, start: str, *, progress: bool, log) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    if run.exists():
        shutil.rmtree(run)  # an unfinished cell: start it again
    log(start)
    finetune(cache, run, ft_cfg, progress=progress)
    rows = _score_cell(cache, run, ft_cfg, config, label, fold, seed, init, pool)
    for r in rows:
        r["seconds"] = round(time.perf_counter() - t0, 1)
    return rows


# fields that only add cells to a benchmark folder (more methods, budgets, seeds, folds) or are guarded by their
# own record (scratch_lr comes from lr_sweep.json); every other field changes what a finished cell means
ADDITIVE_FIELDS = ("methods", "labeled", "seeds", "run_folds", "lr_sweep_methods", "scratch_lr", "sweep_labeled",
                   "eval", "jobs")


def check_same_settings(out: Path, config: BenchmarkConfig, cache: Cache) -> None:
    """Refuse to add cells to ``out`` when its ``benchmark.json`` was written with other settings.

    Finished cells are reused by (method, budget, fold, seed) alone, so a rerun with, say, other fine-tuning steps
    would silently put two protocols in one table.
    """
    path = out / "benchmark.json"
    if not path.is_file():
        return
    old = read_json(path)
    new = {**to_dict(config), "cache": str(cache.root.resolve())}
    if isinstance(old.get("lr_sweep"), list):
        old["lr_sweep"], new["lr_sweep"] = sorted(old["lr_sweep"]), sorted(new["lr_sweep"])
    if isinstance(old.get("pretrain_by_method"), dict):  # settings for a method added now only add cells
        known = set(old.get("methods", []))
        new["pretrain_by_method"] = {k: v for k, v in new["pretrain_by_method"].items()
                                     if k in known or k in old["pretrain_by_method"]}
    for key in sorted(new):
        if key in ADDITIVE_FIELDS or key not in old or old[key] == new[key]:
            continue
        raise InputError(path, f"this folder's benchmark ran with {key} = {json.dumps(old[key])}, not "
                               f"{json.dumps(new[key])}; its finished runs would mix both settings: use a new --out")


def lrs_by_method(results: Path) -> dict[str, set[float]]:
    """The fine-tuning learning rates of each method's finished rows in ``results.csv``."""
    out: dict[str, set[float]] = {}
    for r in read_results(results) if results.is_file() else []:
        if not math.isnan(r["lr"]):
            out.setdefault(r["method"], set()).add(r["lr"])
    return out


def check_same_lr(results: Path, label: str, lr: float, finished: dict[str, set[float]]) -> None:
    """Refuse to fine-tune new ``label`` cells at another learning rate than its finished cells (``finished``:
    :func:`lrs_by_method` of ``results``).

    Budgets, seeds and explicit learning rates only add cells, but they can move a sweep's choice (its budgets,
    its starting pretraining) or set another rate; a table must not mix two rates for one method.
    """
    old = finished.get(label, set())
    if old and not any(math.isclose(lr, x, rel_tol=1e-9) for x in old):
        raise InputError(results, f"{label}'s finished cells were fine-tuned at learning rate {min(old):g}, the new "
                                  f"ones would be at {lr:g} (another sweep choice or --scratch-lr); use a new --out")


def _pretrain_dir(out: Path, base: str, seed: int, pool: list[str]) -> Path:
    return out / "runs" / "pretrain" / f"{base}_seed{seed}_pool{stable_hash(pool)[:8]}"


def _row_label(name: str, dim: int, variants: tuple[str, ...], default_dim: int) -> str:
    """A results row's method label: ``pcl+pdcr@2d`` (the dimension only when not the benchmark's)."""
    return "+".join([name, *variants]) + ("" if dim == default_dim else f"@{dim}d")


def _swept(config: BenchmarkConfig, label: str) -> bool:
    """Whether the sweep chooses ``label``'s fine-tuning learning rate (``lr_sweep_methods``); a scratch row of
    another dimension or with variants (``scratch@2d``, ``scratch+pdcr``) whenever scratch's is."""
    return ("all" in config.lr_sweep_methods or label in config.lr_sweep_methods
            or ("scratch" in config.lr_sweep_methods and parse_method(label, config.dim)[0] == "scratch"))


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def check_protocol(splits: list, folds: list[int], config: BenchmarkConfig) -> None:
    """Every fold's budgets and validation draw, checked before the first run starts."""
    if not config.labeled or min(config.labeled) < 1:
        raise InputError("--labeled", "needs label budgets >= 1")
    if config.val < 0:
        raise InputError("--val", f"validation volumes must be >= 0, got {config.val}")
    scratch_rows = any(parse_method(m, config.dim)[0] == "scratch" for m in config.methods)
    unknown = [m for m in config.lr_sweep_methods
               if m != "all" and m not in config.methods and not (m == "scratch" and scratch_rows)]
    if unknown:
        raise InputError("--lr-sweep-methods", f"{unknown[0]!r} is not one of the benchmarked methods "
                                               f"({', '.join(config.methods)}) or all")
    if not config.eval_at or any(not 0.0 < f <= 1.0 for f in config.eval_at):
        raise InputError("eval_at", f"shares of the steps must be in (0, 1], got {config.eval_at}")
    for fold in folds:
        if not 0 <= fold < config.folds:
            raise InputError("--run-folds", f"fold {fold} is not in 0..{config.folds - 1}")
        split = splits[fold]
        if max(config.labeled) > len(split.train):
            raise InputError("--labeled", f"budget {max(config.labeled)} exceeds the {len(split.train)} training cases"
                             f" of fold {fold}")
        if config.val > len(split.val):
            raise InputError("--val", f"{config.val} validation volumes exceed the {len(split.val)} validation cases"
                             f" of fold {fold}")


def _finetune_config(config: BenchmarkConfig, init: str, budget: int, fold: int, seed: int, dim: int,
                     variants: tuple[str, ...] = (), lr: float | None = None):
    over = merge_dicts(config.finetune, config.finetune_2d if dim == 2 else {})
    over.update({"init": init, "labeled": budget, "val": config.val, "fold": fold, "folds": config.folds,
                 "seed": seed, "split_seed": config.split_seed, "dim": dim,
                 **{("freeze_encoder" if v == "frozen" else v): True for v in variants}})
    if config.finetune_steps:
        over["steps"] = config.finetune_steps
    if lr is not None and init != "scratch":
        over["optim"] = {**over.get("optim", {}), "lr": lr}  # a swept pretrained method: its own base lr
    elif lr is not None:
        over["scratch_lr"] = lr
    elif config.scratch_lr:
        over["scratch_lr"] = config.scratch_lr
    cfg = resolve_finetune_config(config.finetune_preset, None, over)
    cfg.snapshots = snapshot_steps(cfg.steps, config.eval_at)
    return cfg


def snapshot_steps(steps: int, eval_at: list[float]) -> list[int]:
    """The steps scored part-way: ``max(1, round(f · steps))`` for every share ``f < 1`` (the end is the run)."""
    return sorted({max(1, round(f * steps)) for f in eval_at if f < 1.0} - {steps})


def training_curve(run: Path) -> tuple[list[float], list[float]]:
    """(steps, training Dice) from ``RUN/log.csv``."""
    steps, dice = [], []
    with open(run / "log.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("train_dice") not in (None, ""):
                steps.append(float(row["step"]))
                dice.append(float(row["train_dice"]))
    return steps, dice


def _score_cell(cache: Cache, run: Path, ft_cfg, config: BenchmarkConfig, label: str, fold: int, seed: int,
                init: str, pool: str) -> list[dict[str, Any]]:
    """Per-case rows of one fine-tuned run: every snapshot, then the end (validation choice when it had one)."""
    steps, dice = training_curve(run)
    tail = [d for s, d in zip(steps, dice) if s > 0.9 * ft_cfg.steps] or dice[-1:]
    common = {
        "method": label, "labeled": ft_cfg.labeled + ft_cfg.val, "val": ft_cfg.val, "fold": fold, "seed": seed,
        "lr": finetune_loop_settings(ft_cfg).lr, "train_dice": _nanmean(tail),
        "converged": float(training_converged(steps, dice, ft_cfg.steps, config.converge_tol)),
        "pretrain_run": "" if init == "scratch" else init, "finetune_run": str(run), "pool": pool,
    }
    points = [(s / ft_cfg.steps, f"step{s}") for s in ft_cfg.snapshots] + [(1.0, "best")]
    rows = []
    for at, checkpoint in points:
        metrics = evaluate(run, cache, checkpoint=checkpoint, progress=False)
        per_case = metrics["aggregate"]["per_case"]
        step = metrics.get("step") or (ft_cfg.steps if at == 1.0 else round(at * ft_cfg.steps))
        for cid in sorted(metrics["cases"]):
            row = {**common, "at": round(at, 4), "step": int(step), "case": cid,
                   "dice": per_case[cid]["dice"], "hd95": per_case[cid]["hd95"], "n_test": len(metrics["cases"]),
                   "checkpoint": metrics["checkpoint"]}
            for c, name in sorted(cache.label_names.items()):  # every class of the dataset: fixed columns
                if c > 0:
                    row[f"dice_{name}"] = metrics["cases"][cid].get(c, {}).get("dice", math.nan)
            rows.append(row)
    return rows


def sweep_lr(cache: Cache, out: Path, config: BenchmarkConfig, *, progress: bool = False,
             log=print, label: str = "scratch", init: str = "scratch", dim: int | None = None,
             variants: tuple[str, ...] = ()) -> float:
    """Choose a method's fine-tuning learning rate among ``config.lr_sweep`` on development cases, never a test fold.

    The method (scratch by default; a pretrained ``label`` starts from ``init``) is fine-tuned with every candidate
    at every budget of ``config.sweep_labeled`` (default: ``labeled``) on the first run fold and seed (the same
    recipe and steps as the benchmark), and scored (last weights) on that fold's validation cases, which are never
    trained on; the candidate with the highest mean Dice wins (ties: the smaller lr). The record goes to
    ``OUT/lr_sweep.json`` for scratch, ``OUT/lr_sweep_<label>.json`` for another method (reused when it lists the
    same candidates, budgets and steps) and into ``results.md``.
    """
    plan = _SweepPlan.make(cache, out, config, label, init, config.dim if dim is None else dim, variants, log)
    for i, (run, cfg, start) in enumerate(plan.runs):
        plan.dice[i] = _task_sweep_run(cache, run, cfg, plan.dev, start, progress=progress, log=log)
    return plan.choose(log)


@dataclass
class _SweepPlan:
    """One method's sweep: a recorded choice to reuse, or the runs to do (``runs``; their Dice fill ``dice``)."""

    label: str
    init: str
    record: Path
    lrs: list[float]
    budgets: list[int]
    fold: int
    seed: int
    dev: list[str]
    runs: list[tuple[Path, Any, str]]  # (run folder, fine-tuning config, log line)
    dice: list[float]
    reused: float | None = None

    @classmethod
    def make(cls, cache: Cache, out: Path, config: BenchmarkConfig, label: str, init: str, dim: int,
             variants: tuple[str, ...], log) -> _SweepPlan:
        record = out / ("lr_sweep.json" if label == "scratch" else f"lr_sweep_{label.replace('@', '_')}.json")
        lrs = sorted(float(x) for x in config.lr_sweep)
        if any(x <= 0 for x in lrs):
            raise InputError("--lr-sweep", f"learning rates must be > 0, got {config.lr_sweep}")
        fold = (config.run_folds or [0])[0]
        seed = config.seeds[0]
        probe = _finetune_config(config, init, 0, fold, seed, dim, variants)
        budgets = list(config.sweep_labeled or config.labeled)
        plan = cls(label, init, record, lrs, budgets, fold, seed, [], [], [])
        if record.is_file():
            old = read_json(record)
            # reused only for the same candidates, budgets and fine-tuning length (a longer schedule may move the
            # best learning rate)
            if (sorted(float(x) for x in old["lrs"]) == lrs and old.get("steps") == probe.steps
                    and old.get("init", init) == init
                    and old.get("budgets", budgets) == budgets):
                log(f"{label} learning rate {old['chosen']:.2g} from {record}")
                plan.reused = float(old["chosen"])
                return plan
        split = kfold_splits(cache.labelled_ids, config.folds, seed=config.split_seed,
                             val_fraction=probe.val_fraction)[fold]
        plan.dev = list(split.val)
        if not plan.dev:
            raise InputError("--lr-sweep", f"fold {fold} has no validation cases to sweep on")
        sweep_cfg = merge(config, {"val": 0, "eval_at": [1.0]})
        for lr in lrs:
            for budget in budgets:
                run = out / "runs" / "lr_sweep" / f"{label}_lr{lr:g}_M{budget}"
                cfg = _finetune_config(sweep_cfg, init, budget, fold, seed, dim, variants, lr=lr)
                plan.runs.append((run, cfg, f"[lr sweep] {label} lr {lr:g}, M={budget}, scored on fold {fold}'s "
                                            f"{len(plan.dev)} validation cases"))
        plan.dice = [math.nan] * len(plan.runs)
        return plan

    def choose(self, log) -> float:
        """The best candidate by mean development Dice over the budgets (ties: the smaller lr); recorded."""
        if self.reused is not None:
            return self.reused
        k = len(self.budgets)
        scores = [_nanmean(self.dice[i * k:(i + 1) * k]) for i in range(len(self.lrs))]
        best = max(range(len(self.lrs)), key=lambda i: (scores[i] if not math.isnan(scores[i]) else -1.0,
                                                        -self.lrs[i]))
        atomic_write_json(self.record, {
            "lrs": self.lrs, "dice": scores, "chosen": self.lrs[best], "budgets": self.budgets,
            "where": f"fold {self.fold} validation cases, seed {self.seed}", "fold": self.fold, "cases": self.dev,
            "steps": self.runs[0][1].steps, "method": self.label, "init": self.init})
        log(f"[lr sweep] {self.label} learning rate {self.lrs[best]:g} (mean development Dice {scores[best]:.4f})")
        return self.lrs[best]


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pretrain_config(config: BenchmarkConfig, method: str, dim: int, seed: int, pool: list[str]):
    over = merge_dicts(config.pretrain, config.pretrain_2d if dim == 2 else {})
    if config.pretrain_steps:
        over["steps"] = config.pretrain_steps
    over = merge_dicts(over, config.pretrain_by_method.get(method, {}))
    over.update({"method": method, "dim": dim, "seed": seed})
    over.setdefault("data", {})["pool"] = pool
    return resolve_pretrain_config(config.pretrain_preset, None, over)


def _pretrain_cell(cache: Cache, run: Path, config: BenchmarkConfig, method: str, dim: int, seed: int,
                   pool: list[str], progress: bool, log) -> Path:
    cfg = _pretrain_config(config, method, dim, seed, pool)
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


def config_with(base: BenchmarkConfig, overrides: dict[str, Any]) -> BenchmarkConfig:
    return merge(base, {k: v for k, v in overrides.items() if v is not None})
