"""``volcontrast bench pretrain``: speed of the full pretraining pipeline against a bare model step.

Measured on the real pipeline (memory-mapped cache -> DataLoader workers -> device augmentation -> method
forward/backward -> optimiser step), after warm-up steps:

- samples/s: views through the network per second (2 per item);
- data wait: fraction of the step time spent waiting for the loader;
- peak memory: ``torch.cuda.max_memory_allocated`` (GPU) or the process's peak RSS (CPU);
- MFU: model FLOPs per step (``torch.utils.flop_counter``, forward + backward) x steps/s / peak FLOP/s, where
  the peak is *measured* on this device (bf16 matmul on CUDA, fp32 on CPU) rather than taken from a data sheet.

The reference is a bare step of MONAI's ``DynUNet`` with the same stages, widths and strides (random input,
no data loading, no augmentation, bf16 autocast on CUDA, compiled if asked): the pipeline should be at least
as fast as that step and wait for data < 5% of the time.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from volcontrast.bench.machine import machine_description
from volcontrast.utils.threads import worker_init


def measured_peak_flops(device: torch.device, seconds: float = 2.0) -> float:
    """Sustained matmul FLOP/s on ``device`` (bf16 8192² on CUDA, fp32 1024² on CPU)."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            a @ b
        reps += 4
        _sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of ``step()``: ``warmup`` untimed calls, then the mean of ``steps`` timed ones (the device
    synchronised around the timed block)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def step_flops(fn) -> float:
    """FLOPs of ``fn()`` (forward + backward) counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def dynunet_reference(arch: dict[str, Any], batch: int, crop: tuple[int, ...], device: torch.device, *,
                      compile: bool, steps: int = 10, warmup: int = 3) -> dict[str, float]:
    """Bare fwd+bwd+AdamW step of MONAI DynUNet with the backbone's stages/widths; returns timings and FLOPs."""
    from monai.networks.nets import DynUNet

    kw = arch.get("kwargs", arch)
    widths = list(kw["features_per_stage"])
    strides = kw["strides"]
    strides = [s if isinstance(s, (list, tuple)) else [s] * len(crop) for s in strides]
    net = DynUNet(spatial_dims=len(crop), in_channels=int(arch.get("in_channels", 1)), out_channels=2,
                  kernel_size=[3] * len(widths), strides=strides, upsample_kernel_size=strides[1:],
                  filters=widths, norm_name="instance", res_block=False).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    model = torch.compile(net) if compile else net
    x = torch.randn(batch, int(arch.get("in_channels", 1)), *crop, device=device)

    def step() -> None:
        with _autocast(device):
            out = model(x)
        out.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = step_flops(lambda: (net(x).float().mean().backward(), opt.zero_grad(set_to_none=True)))
    dt = time_steps(step, device, steps, warmup)
    return {"step_s": dt, "samples_per_s": batch / dt, "flops_per_step": flops}


def run_pretrain_benchmark(*, method: str = "pcl", preset: str = "cpu-tiny", cache: str | None = None,
                           crop: list[int] | None = None, steps: int = 20, warmup: int = 5,
                           workers: int | None = None, compile: bool = False, reference: bool = True,
                           backbone: str | None = None, volumes: int | None = None, crops_per_volume: int | None = None,
                           device: str = "auto", peak_flops: float | None = None, quiet: bool = False,
                           preset_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time ``steps`` pretraining steps of ``method`` (after ``warmup``) and the DynUNet reference step.

    ``peak_flops`` reuses a measured device peak (else measured here); ``quiet`` prints no table;
    ``preset_overrides`` are merged into the config overrides (e.g. ``{"model": {"preset": "tiny"}}``).
    """
    from volcontrast.data.cache import Cache
    from volcontrast.engine.config import resolve_pretrain_config
    from volcontrast.engine.pretrain import build_pretraining
    from volcontrast.engine.trainer import LoopSettings, build_optimizer, resolve_device
    from volcontrast.engine.trainer import _autocast as loop_autocast

    over: dict[str, Any] = {"method": method, "steps": warmup + steps, "compile": compile, "device": device,
                            "data": {}, "model": {}}
    if crop:
        over["data"]["crop_size"] = list(crop)
    if workers is not None:
        over["data"]["workers"] = workers
    if volumes:
        over["data"]["volumes_per_batch"] = volumes
    if crops_per_volume:
        over["data"]["crops_per_volume"] = crops_per_volume
    if backbone:
        over["model"]["backbone"] = backbone
    for key, value in (preset_overrides or {}).items():
        if isinstance(value, dict):
            over.setdefault(key, {}).update(value)
        else:
            over[key] = value
    cfg = resolve_pretrain_config(preset, None, over)
    dev = resolve_device(cfg.device)
    tmp = None
    if cache is None:
        tmp = Path(tempfile.mkdtemp(prefix="volcontrast-bench-"))
        cache = str(_bench_cache(tmp, tuple(cfg.data.crop_size)))
    try:
        c = Cache(cache)
        method_mod, sampler, _ = build_pretraining(c, cfg)
        method_mod.to(dev)
        params = [p for p in method_mod.parameters() if p.requires_grad]
        settings = LoopSettings(steps=cfg.steps, lr=cfg.optim.lr, optimizer=cfg.optim.name,
                                weight_decay=cfg.optim.weight_decay)
        opt = build_optimizer(params, settings, dev)
        forward = torch.compile(method_mod) if compile else method_mod
        loader = torch.utils.data.DataLoader(sampler, batch_size=None, sampler=range(cfg.steps),
                                             num_workers=cfg.data.workers, pin_memory=dev.type == "cuda",
                                             prefetch_factor=cfg.data.prefetch if cfg.data.workers else None,
                                             worker_init_fn=worker_init if cfg.data.workers else None)
        it = iter(loader)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        gen = torch.Generator().manual_seed(0)
        flops = 0.0
        wait = total = 0.0
        n_samples = 0
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            raw = next(it)
            t_data = time.perf_counter() - t0
            with torch.no_grad():
                batch = method_mod.prepare(raw, step, gen, dev)

            def train_step(batch: dict[str, Any] = batch, fwd: Any = forward) -> None:
                with loop_autocast(dev, cfg.amp):
                    loss, _ = fwd(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()

            if step == 0 and not compile:  # the first real step, counted
                flops = step_flops(train_step)
            else:
                if step == 0:  # counted on the eager module (a compiled graph hides its ATen ops from the counter)
                    flops = step_flops(lambda b=batch: train_step(b, method_mod))
                train_step()
            opt.step()
            method_mod.after_step(step)  # momentum encoders, queues: part of a real step
            _sync(dev)
            if step >= warmup:
                wait += t_data
                total += time.perf_counter() - t0
                n_samples += int(batch["n_samples"])
        peak_mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mb()
        peak = peak_flops if peak_flops else measured_peak_flops(dev)
        step_s = total / steps
        result: dict[str, Any] = {
            "machine": machine_description(), "device": str(dev), "method": method, "preset": preset,
            "backbone": cfg.model.backbone, "backbone_preset": cfg.model.preset, "crop": list(cfg.data.crop_size),
            "views_per_step": n_samples / steps, "step_s": step_s, "samples_per_s": n_samples / total,
            "data_wait": wait / total, "peak_memory_mb": peak_mem, "flops_per_step": flops,
            "peak_flops": peak, "mfu": flops / step_s / peak, "compile": compile,
        }
        if reference:
            ref = dynunet_reference(method_mod.backbone.arch_config(), int(result["views_per_step"]),
                                    tuple(cfg.data.crop_size), dev, compile=compile)
            result.update({"reference_step_s": ref["step_s"], "reference_samples_per_s": ref["samples_per_s"],
                           "reference_mfu": ref["flops_per_step"] / ref["step_s"] / peak})
        if not quiet:
            _print(result)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _bench_cache(folder: Path, crop: tuple[int, ...], cases: int = 8) -> Path:
    """A synthetic CT cohort of ``cases`` cases prepared at a spacing that makes every case larger than ``crop``."""
    from volcontrast.data.prepare import PrepareSettings, prepare_dataset
    from volcontrast.data.synth import generate_cohort

    size = max(48, min(160, int(max(crop) * 1.6)))
    generate_cohort(folder / "raw", cases=cases, size=(size, size, size), fov="chest_abdomen", progress=False)
    # the body is ~200 mm front to back: choose a spacing that gives the crop room along every axis
    spacing = min(250.0 / (max(crop) * 1.3), 6.0)
    prepare_dataset(folder / "raw", folder / "cache", PrepareSettings(spacing=(spacing,) * 3), progress=False)
    return folder / "cache"


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _print(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench pretrain {r['method']} ({r['backbone']}/{r['backbone_preset']}, crop "
                        f"{'x'.join(map(str, r['crop']))}, {r['views_per_step']:.0f} views/step) — {r['machine']}")
    for col in ("", "step (s)", "samples/s", "data wait", "peak mem (MB)", "MFU"):
        table.add_column(col)
    table.add_row("volcontrast pipeline", f"{r['step_s']:.4f}", f"{r['samples_per_s']:.1f}",
                  f"{100 * r['data_wait']:.1f}%", f"{r['peak_memory_mb']:.0f}", f"{100 * r['mfu']:.1f}%")
    if "reference_step_s" in r:
        table.add_row("bare DynUNet step", f"{r['reference_step_s']:.4f}", f"{r['reference_samples_per_s']:.1f}",
                      "-", "-", f"{100 * r['reference_mfu']:.1f}%")
    Console().print(table)
    Console().print(f"FLOPs/step {r['flops_per_step']:.3g}, measured peak {r['peak_flops']:.3g} FLOP/s")
