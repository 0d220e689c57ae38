"""``volcontrast bench gpu``: the GPU run book — one command that checks the CUDA path and measures every method.

On one CUDA GPU (``benchmarks/gpu.sh`` calls it), in this order, within a wall-time budget (default 8 min):

1. **checks** of the CUDA path: bf16 autocast (a conv returns bfloat16), ``torch.compile`` (a compiled function
   equals its eager result), fused AdamW (one step equals the unfused step), GPU-side augmentation
   (:func:`volcontrast.views.augment.augment` runs on the device and returns views there);
2. **references**: the bare forward/backward/AdamW step of MONAI ``DynUNet`` and of our PlainConvUNet backbone
   with the same stages and widths (nnU-Net ``3d_fullres`` widths, 96³, as many samples as a two-view step has
   views), compiled, bf16, random data (no loader);
3. **every registered pretraining method** through the real pipeline (cache -> DataLoader workers -> device
   augmentation -> forward/backward -> optimiser step; :func:`volcontrast.bench.speed.run_pretrain_benchmark`):
   step time, samples/s, data wait, peak memory, MFU and the ratio of its samples/s to the bare DynUNet step's;
4. **PDCR / UAFS overhead** on a fine-tuning step (Dice+CE; + PDCR on encoder stages 2, 3; + UAFS blocks).

Targets reported against (issue 21): PCL and SimCLR samples/s >= 1.0x the bare compiled DynUNet step on the
same GPU (Spade, Alice, VoCo report their ratio), data wait < 5%.

Writes ``OUT/gpu_runbook.json`` (everything) and ``OUT/gpu_runbook.md`` (tables). ``--smoke`` runs the same
code on the CPU at tiny sizes (tiny U-Net, 32³: the smallest crop every method's defaults accept;
one timed step; no compile) in about half a minute, so CI checks it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from volcontrast.bench.machine import machine_description
from volcontrast.bench.speed import time_steps
from volcontrast.errors import InputError
from volcontrast.utils.threads import available_cpus

FIRST_METHODS = ("pcl", "simclr")  # measured first (their targets are hard ones), the rest in registry order
TARGET_RATIO = 1.0
TARGET_DATA_WAIT = 0.05


def registered_methods() -> list[str]:
    """Every registered pretraining method, in registry order."""
    from volcontrast.methods.registry import list_methods

    return list_methods()


def _settings(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"device": "cpu", "preset": "cpu-tiny", "backbone_preset": "tiny", "crop": 32, "steps": 1,
                "warmup": 0, "compile": False, "workers": 0, "volumes": 1, "crops_per_volume": 2,
                "finetune_batch": 2, "amp": "bf16"}
    return {"device": "cuda", "preset": "gpu-3d", "backbone_preset": "nnunet-3d", "crop": 96, "steps": 10,
            "warmup": 3, "compile": True, "workers": max(1, min(8, available_cpus() - 2)), "volumes": 4,
            "crops_per_volume": 2, "finetune_batch": 2, "amp": "bf16"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(device: torch.device, compiled: bool) -> None:
    """Between measurements: free the previous model's memory and, when compiling, dynamo's caches (each method
    builds new module instances; without a reset their recompilations count against dynamo's cache limit and a
    later method could silently run eager)."""
    import gc

    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check(name: str, fn) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as exc:  # a failed check is a result, not a crash of the run book
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return {"check": name, "ok": bool(ok), "detail": detail, "seconds": time.perf_counter() - t0}


def cuda_path_checks(device: torch.device, *, smoke: bool) -> list[dict[str, Any]]:
    """bf16 autocast, torch.compile, fused AdamW, GPU-side augmentation on ``device`` (each ok/detail)."""

    def bf16() -> tuple[bool, str]:
        conv = torch.nn.Conv3d(1, 4, 3).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = conv(torch.randn(1, 1, 8, 8, 8, device=device))
        return y.dtype == torch.bfloat16, f"conv3d under autocast -> {y.dtype}"

    def compiled() -> tuple[bool, str]:
        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x) * 2.0 + x.pow(2).sum()

        backend = "eager" if smoke else "inductor"  # smoke: the dynamo path without a C++/Triton build
        g = torch.compile(f, backend=backend)
        x = torch.randn(64, device=device)
        err = float((g(x) - f(x)).abs().max())
        return err < 1e-4, f"torch.compile(backend={backend!r}) max |compiled - eager| = {err:.2e}"

    def fused() -> tuple[bool, str]:
        torch.manual_seed(0)
        a = torch.nn.Linear(16, 16).to(device)
        b = torch.nn.Linear(16, 16).to(device)
        b.load_state_dict(a.state_dict())
        opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
        opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
        x = torch.randn(8, 16, device=device)
        for m, o in ((a, opt_a), (b, opt_b)):
            m(x).square().mean().backward()
            o.step()
        err = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
        return err < 1e-5, f"fused AdamW step vs unfused: max |diff| = {err:.2e}"

    def augmentation() -> tuple[bool, str]:
        from volcontrast.views.augment import AugmentConfig, augment

        gen = torch.Generator().manual_seed(0)
        boxes = torch.randn(2, 1, 20, 20, 20, device=device)
        out = augment(boxes, (16, 16, 16), AugmentConfig(), gen)
        ok = out.views.device.type == device.type and tuple(out.views.shape) == (2, 1, 16, 16, 16)
        return ok, f"augment(2 boxes 20³ -> 16³) on {out.views.device}, shape {tuple(out.views.shape)}"

    return [_check("bf16 autocast", bf16), _check("torch.compile", compiled), _check("fused AdamW", fused),
            _check("GPU-side augmentation", augmentation)]


def plain_unet_reference(backbone_preset: str, batch: int, crop: tuple[int, ...], device: torch.device, *,
                         compile: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Bare fwd+bwd+AdamW step of our PlainConvUNet backbone (encoder, decoder, segmentation head)."""
    from volcontrast.bench.speed import step_flops
    from volcontrast.nets import build_backbone

    net = build_backbone("plain_unet", dim=len(crop), preset=backbone_preset, num_classes=2).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    x = torch.randn(batch, 1, *crop, device=device)

    def forward(z: torch.Tensor) -> torch.Tensor:
        return net.segment(net.decode(net.encode(z)))

    fwd = torch.compile(forward) if compile else forward

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = fwd(x)
        out.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = step_flops(lambda: (forward(x).float().mean().backward(), opt.zero_grad(set_to_none=True)))
    dt = time_steps(step, device, steps, warmup)
    return {"step_s": dt, "samples_per_s": batch / dt, "flops_per_step": flops, "arch": net.arch_config()}


def finetune_overhead(backbone_preset: str, batch: int, crop: tuple[int, ...], device: torch.device, *,
                      steps: int, warmup: int, amp: bool) -> list[dict[str, Any]]:
    """Fine-tuning step (Dice+CE) alone, with PDCR (encoder stages 2, 3) and with UAFS (eager, bf16 on CUDA)."""
    from volcontrast.engine.finetune import SegmentationModel, pdcr_grid_spacing
    from volcontrast.losses.pdcr import PDCRLoss
    from volcontrast.nets import add_uafs, build_backbone

    rows: list[dict[str, Any]] = []
    labels = torch.zeros(batch, *crop, dtype=torch.uint8, device=device)
    sl = tuple(slice(c // 4, 3 * c // 4) for c in crop)
    labels[(slice(None), *sl)] = 1  # a centred cube of foreground: both classes present
    x = torch.randn(batch, 1, *crop, device=device)
    base = None
    for variant in ("base", "pdcr", "uafs"):
        torch.manual_seed(0)
        net = build_backbone("plain_unet", dim=len(crop), preset=backbone_preset, num_classes=2)
        pdcr = None
        if variant == "pdcr":
            stages = [2, 3]
            pdcr = PDCRLoss.for_backbone(net, stages=stages, num_classes=2, windows="rf",
                                         grid_spacing=pdcr_grid_spacing(net, stages, crop, 0))
        if variant == "uafs":
            add_uafs(net)
        model = SegmentationModel(net, 2, 1.0, 1.0, pdcr).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
        gen = torch.Generator().manual_seed(0)
        batch_dict = {"views": x, "labels": labels, "pdcr_generator": gen}

        def step(model: SegmentationModel = model, opt: torch.optim.Optimizer = opt,
                 batch_dict: dict[str, Any] = batch_dict) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = model(batch_dict)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dt = time_steps(step, device, steps, warmup)
        row = {"variant": variant, "step_s": dt, "samples_per_s": batch / dt,
               "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        if variant == "base":
            base = dt
        row["overhead"] = dt / base - 1.0 if base else 0.0
        rows.append(row)
        del model, opt
    return rows


def run_gpu_runbook(out: str | os.PathLike, *, smoke: bool = False, methods: list[str] | None = None,
                    cache: str | None = None, budget_s: float = 480.0, steps: int | None = None,
                    warmup: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole run book; write ``OUT/gpu_runbook.json`` and ``OUT/gpu_runbook.md``; return the JSON.

    Raises:
        InputError: no CUDA GPU without ``smoke``, or an unknown method name.
    """
    from volcontrast.bench.speed import _bench_cache, dynunet_reference, measured_peak_flops, run_pretrain_benchmark

    t_start = time.perf_counter()
    s = _settings(smoke)
    if steps:
        s["steps"] = steps
    if warmup:
        s["warmup"] = warmup
    if not smoke and not torch.cuda.is_available():
        raise InputError("--device", "no CUDA GPU here; `volcontrast bench gpu --smoke` runs the CPU check")
    known = registered_methods()
    chosen = list(methods) if methods else known
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise InputError("--methods", f"unknown method(s) {unknown}; registered: {', '.join(known)}")
    chosen = [m for m in FIRST_METHODS if m in chosen] + [m for m in chosen if m not in FIRST_METHODS]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(s["device"])
    crop = (int(s["crop"]),) * 3

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t_start:6.1f} s] bench gpu: {msg}", flush=True)

    result: dict[str, Any] = {"machine": machine_description(), "device": str(device), "smoke": smoke,
                              "torch": torch.__version__, "settings": s, "budget_s": budget_s,
                              "targets": {"samples_ratio_vs_dynunet": TARGET_RATIO, "data_wait": TARGET_DATA_WAIT}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    log("checks (bf16 autocast, torch.compile, fused AdamW, GPU-side augmentation)")
    result["checks"] = cuda_path_checks(device, smoke=smoke)
    result["peak_flops"] = peak = measured_peak_flops(device, seconds=0.3 if smoke else 2.0)
    tmp = None
    try:
        if cache is None:
            tmp = Path(tempfile.mkdtemp(prefix="volcontrast-runbook-"))
            log(f"generating a synthetic cohort for {crop[0]}³ crops")
            cache = str(_bench_cache(tmp, crop, cases=4 if smoke else 8))
        views = 2 * s["volumes"] * s["crops_per_volume"]
        refs: dict[str, Any] = {}
        from volcontrast.nets import build_backbone

        arch = build_backbone("plain_unet", dim=3, preset=s["backbone_preset"], num_classes=2).arch_config()
        log(f"reference: bare DynUNet step, {views} x {crop[0]}³")
        refs["dynunet"] = dynunet_reference(arch, views, crop, device, compile=s["compile"], steps=s["steps"],
                                            warmup=s["warmup"])
        _fresh(device, s["compile"])
        log(f"reference: bare PlainConvUNet step, {views} x {crop[0]}³")
        refs["plain_unet"] = plain_unet_reference(s["backbone_preset"], views, crop, device, compile=s["compile"],
                                                  steps=s["steps"], warmup=s["warmup"])
        refs["plain_unet"].pop("arch", None)
        for r in refs.values():
            r["mfu"] = r["flops_per_step"] / r["step_s"] / peak
        result["references"] = refs
        ref_sps = refs["dynunet"]["samples_per_s"]
        rows: list[dict[str, Any]] = []
        for name in chosen:
            elapsed = time.perf_counter() - t_start
            if elapsed > budget_s * 0.85:
                rows.append({"method": name, "skipped": f"wall-time budget ({elapsed:.0f} s of {budget_s:.0f} s)"})
                continue
            log(f"method {name}")
            _fresh(device, s["compile"])
            try:
                r = run_pretrain_benchmark(
                    method=name, preset=s["preset"], cache=cache, crop=list(crop), steps=s["steps"],
                    warmup=s["warmup"], workers=s["workers"], compile=s["compile"], reference=False,
                    volumes=s["volumes"], crops_per_volume=s["crops_per_volume"], device=s["device"],
                    peak_flops=peak, quiet=True,
                    preset_overrides={"model": {"preset": s["backbone_preset"]}})
            except InputError:  # the user's input (cache too small, bad settings): stop with the one-line error
                raise
            except Exception as exc:  # one method's failure is reported, the others still run
                rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            row = {k: r[k] for k in ("method", "views_per_step", "step_s", "samples_per_s", "data_wait",
                                     "peak_memory_mb", "flops_per_step", "mfu")}
            row["ratio_vs_dynunet"] = r["samples_per_s"] / ref_sps
            row["meets_ratio"] = row["ratio_vs_dynunet"] >= TARGET_RATIO
            row["meets_data_wait"] = r["data_wait"] < TARGET_DATA_WAIT
            rows.append(row)
        result["methods"] = rows
        _fresh(device, s["compile"])
        log("PDCR / UAFS overhead on a fine-tuning step")
        result["finetune_overhead"] = finetune_overhead(
            s["backbone_preset"], s["finetune_batch"], crop, device, steps=s["steps"], warmup=s["warmup"],
            amp=device.type == "cuda")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - t_start
    (out / "gpu_runbook.json").write_text(json.dumps(result, indent=2, default=_json_default), encoding="utf-8")
    (out / "gpu_runbook.md").write_text(runbook_markdown(result), encoding="utf-8")
    log(f"done in {result['wall_s']:.0f} s -> {out / 'gpu_runbook.json'}, {out / 'gpu_runbook.md'}")
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def runbook_markdown(r: dict[str, Any]) -> str:
    """The run book's result as markdown: checks, one row per reference and method, PDCR/UAFS overhead."""
    s = r["settings"]
    title = "GPU run book (smoke, CPU)" if r["smoke"] else "GPU run book"
    lines = [f"# {title}", "", f"{r.get('gpu', r['device'])} — {r['machine']}; preset {s['preset']} "
             f"({s['backbone_preset']} widths), {s['crop']}³, {2 * s['volumes'] * s['crops_per_volume']} views/step, "
             f"compile {s['compile']}, {s['steps']} timed steps after {s['warmup']}; measured peak "
             f"{r['peak_flops']:.3g} FLOP/s; wall {r.get('wall_s', 0):.0f} s", "", "## Checks", "",
             "| check | ok | detail |", "|---|---|---|"]
    for c in r["checks"]:
        lines.append(f"| {c['check']} | {'yes' if c['ok'] else '**no**'} | {c['detail']} |")
    lines += ["", "## Pretraining step (target: samples/s >= 1.0x the bare DynUNet step; data wait < 5%)", "",
              "| step | step (s) | samples/s | x DynUNet | data wait | peak mem (MB) | MFU |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    ref = r["references"]["dynunet"]["samples_per_s"]
    for name, x in r["references"].items():
        label = {"dynunet": "bare DynUNet (reference)", "plain_unet": "bare PlainConvUNet"}.get(name, name)
        lines.append(f"| {label} | {x['step_s']:.4f} | {x['samples_per_s']:.1f} | {x['samples_per_s'] / ref:.2f} | - "
                     f"| - | {100 * x['mfu']:.1f}% |")
    for m in r["methods"]:
        if "error" in m or "skipped" in m:
            lines.append(f"| {m['method']} | {m.get('error') or m.get('skipped')} | | | | | |")
            continue
        lines.append(f"| {m['method']} | {m['step_s']:.4f} | {m['samples_per_s']:.1f} | {m['ratio_vs_dynunet']:.2f} "
                     f"| {100 * m['data_wait']:.1f}% | {_f(m['peak_memory_mb'], '.0f')} | {100 * m['mfu']:.1f}% |")
    lines += ["", "## Fine-tuning step: PDCR and UAFS overhead", "",
              "| variant | step (s) | samples/s | overhead | peak mem (MB) |", "|---|---:|---:|---:|---:|"]
    for v in r["finetune_overhead"]:
        lines.append(f"| {v['variant']} | {v['step_s']:.4f} | {v['samples_per_s']:.1f} | {100 * v['overhead']:+.1f}% "
                     f"| {_f(v['peak_memory_mb'], '.0f')} |")
    return "\n".join(lines) + "\n"
