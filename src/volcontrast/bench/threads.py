"""``volcontrast bench threads``: step time alone and under a controlled competing load (shared machines).

The step is a small fine-tuning step (the ``tiny`` plain U-Net, forward through encoder, decoder and
segmentation head, backward, AdamW) on random data, timed in a fresh subprocess per setting so that the OpenMP
environment (``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS``) is read at torch's start as in a real run. The load is one
busy Python process per available CPU, started (and stopped) by the benchmark itself. Two settings are compared:

- ``volcontrast``: what the command line does (threads from :func:`~volcontrast.utils.threads.default_threads`,
  ``OMP_WAIT_POLICY=PASSIVE``);
- ``torch default``: a plain ``import torch`` (one thread per core, OpenMP threads spin while idle).

The figure of merit is the slowdown = median loaded step / median unloaded step of the same setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from volcontrast.bench.machine import machine_description
from volcontrast.utils.threads import available_cpus, default_threads

_CHILD = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
import torch
if args["configure"]:
    from volcontrast.utils.threads import configure_threads
    configure_threads(args["threads"])
from volcontrast.nets import build_backbone
torch.manual_seed(0)
net = build_backbone("plain_unet", dim=3, preset="tiny", num_classes=2)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x = torch.randn(args["batch"], 1, *([args["crop"]] * 3))
y = torch.randint(0, 2, (args["batch"], *([args["crop"]] * 3)))
def step():
    logits = net.segment(net.decode(net.encode(x)))
    loss = torch.nn.functional.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(args["warmup"]):
    step()
times = []
for _ in range(args["steps"]):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "torch_threads": torch.get_num_threads(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
"""

_BUSY = "while True:\n    pass\n"


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _run_child(setting: str, threads: int | None, *, steps: int, warmup: int, crop: int, batch: int,
               timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ)
    if setting == "volcontrast":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        configure = True
    else:  # what a plain `import torch` gets
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("OMP_NUM_THREADS", None)
        configure = False
    args = {"configure": configure, "threads": threads, "steps": steps, "warmup": warmup, "crop": crop,
            "batch": batch}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench threads: the timing process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class BusyLoad:
    """``n`` busy processes (pure Python loops, one thread each) for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> BusyLoad:
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", _BUSY], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # let them reach the loop
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def run_threads_benchmark(*, steps: int = 10, warmup: int = 2, crop: int = 32, batch: int = 2, busy: int | None = None,
                          threads: int | None = None, compare_default: bool = True,
                          timeout_s: float = 300.0, progress: bool = True) -> dict[str, Any]:
    """Median step time of each setting unloaded and with ``busy`` competing busy processes (default: one per
    available CPU); returns the numbers and the slowdown ratios."""
    n_busy = busy if busy is not None else available_cpus()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # other users' load, if any
    settings = ["volcontrast"] + (["torch default"] if compare_default else [])
    rows: list[dict[str, Any]] = []
    kw = {"steps": steps, "warmup": warmup, "crop": crop, "batch": batch, "timeout_s": timeout_s}
    for setting in settings:
        row: dict[str, Any] = {"setting": setting}
        for loaded in (False, True):
            if progress:
                print(f"bench threads: {setting}, {'with' if loaded else 'without'} {n_busy} busy processes",
                      file=sys.stderr, flush=True)
            if loaded:
                with BusyLoad(n_busy):
                    out = _run_child(setting, threads, **kw)
            else:
                out = _run_child(setting, threads, **kw)
            key = "loaded" if loaded else "alone"
            row[f"{key}_step_s"] = _median(out["times"])
            row["torch_threads"] = out["torch_threads"]
            row["omp_wait_policy"] = out["omp_wait_policy"]
        row["slowdown"] = row["loaded_step_s"] / row["alone_step_s"]
        rows.append(row)
    result = {
        "machine": machine_description(), "load_average_at_start": load_at_start,
        "available_cpus": available_cpus(), "default_threads": default_threads(),
        "busy_processes": n_busy, "steps": steps, "crop": crop, "batch": batch, "rows": rows,
    }
    if len(rows) > 1:
        result["loaded_speedup_vs_torch_default"] = rows[1]["loaded_step_s"] / rows[0]["loaded_step_s"]
    return result


def threads_table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    load = result.get("load_average_at_start")
    lines = [f"bench threads — {result['machine']}; {result['busy_processes']} busy processes; tiny U-Net "
             f"fine-tuning step, batch {result['batch']}, {result['crop']}³, median of {result['steps']} steps"
             + (f"; load average before: {load[0]:.2f}" if load else ""),
             "", "| setting | torch threads | OMP_WAIT_POLICY | alone | loaded | slowdown |",
             "|---|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['torch_threads']} | {r['omp_wait_policy'] or '(unset)'} | "
                     f"{r['alone_step_s']:.4f} s | {r['loaded_step_s']:.4f} s | {r['slowdown']:.2f}x |")
    return "\n".join(lines)
