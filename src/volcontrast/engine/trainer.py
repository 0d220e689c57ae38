"""The training loop shared by pretraining and fine-tuning.

A :class:`TrainTask` supplies the trainable module (its ``forward(batch)`` returns ``(loss, logs)``), the
per-step batch preparation (device-side augmentation), hooks, and metadata. :func:`fit` does everything
else: device and DDP (torchrun; nccl on CUDA, gloo on CPU), bf16 autocast on CUDA, optional
``torch.compile``, fused optimisers, warm-up + cosine schedule, step-seeded randomness (so ``--resume``
repeats an uninterrupted run exactly), atomic checkpoints, ``log.csv`` + TensorBoard, a live progress bar,
data-wait timing, and the collapse monitors a task returns (``task.monitors()``: objects that look at every logged
row, :mod:`volcontrast.methods.monitors`; the engine knows no method).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from volcontrast import dist
from volcontrast.engine.run import CSVLog, RunDir, load_module_state, load_trainer_state, load_weights
from volcontrast.errors import InputError
from volcontrast.nets.base import deduplicated_state_dict
from volcontrast.utils.threads import worker_init


class TrainTask(Protocol):
    module: nn.Module  # trained (and DDP-wrapped); its forward(batch) returns (loss, logs)
    # optional ``export_module``: the part written to model.safetensors (default: ``module``); the rest of
    # ``module``'s state then travels in trainer_state.pt so --resume is still exact

    def prepare(self, raw: dict[str, Any], step: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        """Move a raw loader batch to ``device`` and build the model inputs (no autograd)."""
        ...

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (momentum updates, queues)."""
        ...

    def log_columns(self) -> list[str]: ...

    def model_json(self) -> dict[str, Any]: ...

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        """Extra metrics (e.g. a probe) at log steps; returns {} when nothing is due."""
        ...

    # optional ``monitors() -> list``: collapse monitors, each with ``update(row, judged, patience) -> (flag,
    # message or None)``; fed every logged row after the first fifth of the run

    # optional: ``parameter_groups() -> list[dict]`` with "params", "lr_scale" (x the schedule's lr) and
    # "frozen_steps" (lr 0 before that step), e.g. a gentler learning rate for a pretrained encoder


@dataclass
class LoopSettings:
    steps: int
    seed: int = 0
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr: float = 0.0
    schedule: str = "cosine"  # after the warm-up: cosine | poly (nnU-Net: (1 - t)^poly_power)
    poly_power: float = 0.9
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    amp: str = "auto"
    compile: bool = False
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_every: int = 0
    collapse_patience: int = 3
    workers: int = 0
    prefetch: int = 2
    progress: bool = True
    description: str = "train"


def loop_settings(config: Any, *, progress: bool, description: str) -> LoopSettings:
    """LoopSettings from a pretraining or fine-tuning config (``optim``, ``data`` and run fields)."""
    o, d = config.optim, config.data
    return LoopSettings(
        steps=config.steps, seed=config.seed, lr=o.lr, warmup_steps=o.warmup_steps, min_lr=o.min_lr,
        optimizer=o.name, weight_decay=o.weight_decay, momentum=o.momentum, betas=o.betas, grad_clip=o.grad_clip,
        amp=config.amp, compile=config.compile, device=config.device, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, keep_every=getattr(config, "keep_every", 0),
        collapse_patience=getattr(config, "collapse_patience", 3), workers=d.workers, prefetch=d.prefetch,
        progress=progress, description=description,
    )


@dataclass
class FitResult:
    run: Path
    steps: int
    last_loss: float
    seconds: float
    samples_per_s: float
    data_wait: float
    peak_memory_mb: float
    history: list[dict[str, float]] = field(default_factory=list)


def lr_at(step: int, s: LoopSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine (or ``schedule="poly"``:
    ``min_lr + (lr - min_lr) * (1 - t)^poly_power``) to ``min_lr`` at ``steps``."""
    if s.warmup_steps > 0 and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(1, s.steps - s.warmup_steps)
    t = min(1.0, (step - s.warmup_steps) / span)
    if s.schedule == "poly":
        return s.min_lr + (s.lr - s.min_lr) * (1.0 - t) ** s.poly_power
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * t))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def build_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], s: LoopSettings,
                    device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW (fused on CUDA); no weight decay on biases and norms. ``params`` may be groups with
    ``lr_scale``/``frozen_steps`` entries (see :class:`TrainTask`)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if params and not isinstance(params[0], dict):
        params = [{"params": params}]
    groups = []
    for g in params:  # type: ignore[union-attr]
        ps = [p for p in g["params"] if p.requires_grad]
        extra = {"lr_scale": float(g.get("lr_scale", 1.0)), "frozen_steps": int(g.get("frozen_steps", 0))}
        groups.append({"params": [p for p in ps if p.ndim > 1], "weight_decay": s.weight_decay, **extra})
        groups.append({"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0, **extra})
    groups = [g for g in groups if g["params"]]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, **fused)
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, **fused)


def step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, salt]).generate_state(1)[0])


def _autocast(device: torch.device, amp: str):
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


class _Progress:
    def __init__(self, enabled: bool, total: int, start: int, description: str):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[sps]} samples/s"),
            TimeRemainingColumn(), transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", sps="-")

    def update(self, **fields: Any) -> None:
        if self.enabled:
            self.bar.update(self.task, **fields)

    def warn(self, msg: str) -> None:
        if self.enabled:
            self.bar.console.print(f"[yellow]warning:[/] {msg}")
        else:
            warnings.warn(msg, stacklevel=2)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def fit(task: TrainTask, dataset: torch.utils.data.Dataset, run: RunDir, s: LoopSettings, *, resume: bool = False,
        on_log: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train ``task.module`` for ``s.steps`` steps on the step-indexed ``dataset``; checkpoints into ``run``."""
    info = dist.init_distributed_from_env()
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    device = resolve_device(s.device, info.local_rank if info is not None else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    module = task.module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    groups = task.parameter_groups() if hasattr(task, "parameter_groups") else params
    optimizer = build_optimizer(groups, s, device)
    start = 0
    export = getattr(task, "export_module", module)
    ckpt = run.committed() if resume else None  # None: stopped before its first checkpoint -> from step 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        if export is module:
            load_module_state(module, load_weights(ckpt), ckpt / "model.safetensors")
        else:
            load_module_state(module, state["module_state"], ckpt / "trainer_state.pt")
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        module.to(device)
    wrapped: nn.Module = module
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if s.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    columns = ["step", "loss", "lr", "samples_per_s", "data_wait", "seconds", *task.log_columns()]
    log = CSVLog(run.root / "log.csv", columns, resume_step=start if resume else None) if main else None
    tb = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run.root / "tb"), purge_step=start if resume else None)
        except ImportError:  # tensorboard missing: the CSV log still has everything
            tb = None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, s.steps), num_workers=s.workers,
        pin_memory=device.type == "cuda", prefetch_factor=s.prefetch if s.workers > 0 else None,
        persistent_workers=False, worker_init_fn=worker_init if s.workers > 0 else None,
    )
    progress = _Progress(s.progress and main, s.steps, start, s.description)
    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    acc = {"loss": 0.0, "n": 0, "data": 0.0, "total": 0.0, "samples": 0}
    logs_acc: dict[str, float] = {}
    monitors = task.monitors() if hasattr(task, "monitors") else []
    last_saved = start  # the step of the newest checkpoint (0: none yet)
    last_loss = float("nan")
    total_samples, total_time, total_data = 0, 0.0, 0.0
    it = iter(loader)
    try:
        for step in range(start, s.steps):
            t0 = time.perf_counter()
            raw = next(it)
            t_data = time.perf_counter() - t0
            lr = lr_at(step, s)
            for g in optimizer.param_groups:
                g["lr"] = 0.0 if step < g.get("frozen_steps", 0) else lr * g.get("lr_scale", 1.0)
            torch.manual_seed(step_seed(s.seed, step, rank, 1))
            gen = torch.Generator().manual_seed(step_seed(s.seed, step, rank, 2))
            module.train()
            batch = task.prepare(raw, step, gen, device)
            with _autocast(device, s.amp):
                loss, logs = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            optimizer.step()
            task.after_step(step)
            done = step + 1
            is_log = done % s.log_every == 0 or done == s.steps
            if is_log and device.type == "cuda":
                torch.cuda.synchronize(device)
            t_total = time.perf_counter() - t0
            n_samples = int(batch.get("n_samples", 0)) * world
            acc["data"] += t_data
            acc["total"] += t_total
            acc["samples"] += n_samples
            total_samples += n_samples
            total_time += t_total
            total_data += t_data
            acc["loss"] = acc["loss"] + loss.detach().float()  # stays on the device: no sync per step
            acc["n"] += 1
            for k, v in logs.items():  # tensors stay on the device until a log step (no sync per step)
                v = v.detach().float() if isinstance(v, Tensor) else float(v)
                logs_acc[k] = logs_acc.get(k, 0.0) + v
            if is_log:
                n = acc["n"]
                row: dict[str, float] = {
                    "step": done,
                    "loss": float(dist.all_reduce_mean(acc["loss"] / n).item()),  # mean over the interval
                    "lr": lr,
                    "samples_per_s": acc["samples"] / max(acc["total"], 1e-9),
                    "data_wait": acc["data"] / max(acc["total"], 1e-9),
                    "seconds": time.perf_counter() - t_start,
                }
                row.update({k: float(v) / n for k, v in logs_acc.items()})
                if main:
                    row.update(task.periodic(done, final=done == s.steps))
                last_loss = row["loss"]
                # random initial networks map every input alike; only judge collapse once training had a chance
                judged = done >= max(s.warmup_steps, s.steps // 5)
                for monitor in monitors:  # the method's collapse monitors (methods/monitors.py)
                    flag, message = monitor.update(row, judged, s.collapse_patience)
                    row["collapse_warning"] = max(row.get("collapse_warning", 0.0), float(flag))
                    if message:
                        progress.warn(f"step {done}: {message}")
                history.append(row)
                if log is not None:
                    log.append(row)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(k, v, done)
                if on_log is not None:
                    on_log(row)
                progress.update(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.1f}")
                if not math.isfinite(row["loss"]):  # diverged: stop now (the row is logged), keep the last checkpoint
                    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved
                            else "no checkpoint was written")
                    raise InputError(run.root, f"training diverged: the loss is NaN or infinite at step {done}; "
                                               f"{kept}; lower the learning rate (or set optim.grad_clip) and start "
                                               "again")
                acc = {"loss": 0.0, "n": 0, "data": 0.0, "total": 0.0, "samples": 0}
                logs_acc = {}
            progress.update(completed=done)
            if done % s.checkpoint_every == 0 or done == s.steps:
                if main:
                    state = {"step": done, "optimizer": optimizer.state_dict()}
                    if export is not module:
                        state["module_state"] = deduplicated_state_dict(module)
                    keep = s.keep_every > 0 and done % s.keep_every == 0
                    run.save(export, task.model_json(), state, done, keep, final=done == s.steps)
                last_saved = done
                dist.barrier()
    finally:
        progress.close()
        if tb is not None:
            tb.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_peak_mb()
    return FitResult(
        run=run.root, steps=s.steps, last_loss=last_loss, seconds=time.perf_counter() - t_start,
        samples_per_s=total_samples / max(total_time, 1e-9), data_wait=total_data / max(total_time, 1e-9),
        peak_memory_mb=peak, history=history,
    )


def _rss_peak_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return float("nan")
