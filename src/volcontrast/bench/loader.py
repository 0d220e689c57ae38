"""``volcontrast bench loader``: what the CPU side of the pretraining data path alone delivers.

The real loader (memory-mapped cache -> :class:`~volcontrast.views.sampler.BoxSampler` -> DataLoader workers,
``batch_size=None``, one step per item) runs with no model behind it; after ``warmup`` batches (workers
started, page cache warm) ``steps`` batches are timed for each worker count. A *crop* is one box cut on the CPU
(the crop plus the context the device-side augmentation needs, ``box_size_for(crop, context)``); two-view
methods make two views from each box, so views/s = 2 x crops/s. ``bytes`` = crops x ``crop_bytes`` (float32
voxels of one box, every channel): what the workers copy out of the memory maps and hand to the main process.

The target is what one H100 step needs: ~116 compiled DynUNet samples/s at 8 x 96³ (issue 21), i.e. 232
views/s for two-view methods.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volcontrast.bench.machine import machine_description
from volcontrast.utils.threads import worker_init

H100_VIEWS_PER_S = 232.0  # 2 views x 116 compiled-DynUNet samples/s at 8 x 96³ (issue 21)


def run_loader_benchmark(*, cache: str | None = None, crop: int = 96, workers: tuple[int, ...] = (1, 2, 4),
                         steps: int = 10, warmup: int = 2, volumes_per_batch: int = 4, crops_per_volume: int = 2,
                         context: float = 1.4, pin_memory: bool | None = None, prefetch: int = 2,
                         progress: bool = True) -> dict[str, Any]:
    """crops/s, MB/s and views/s of the CPU loader for each worker count in ``workers`` (0 = in-process)."""
    from volcontrast.bench.speed import _bench_cache
    from volcontrast.data.cache import Cache
    from volcontrast.views.sampler import BoxSampler, BoxSamplerConfig, box_size_for

    crop_size = (int(crop),) * 3
    box = box_size_for(crop_size, context)
    tmp = None
    if cache is None:
        tmp = Path(tempfile.mkdtemp(prefix="volcontrast-bench-loader-"))
        if progress:
            print(f"bench loader: generating a synthetic cohort for {crop}³ crops", flush=True)
        cache = str(_bench_cache(tmp, crop_size))
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    try:
        c = Cache(cache)
        ids = list(c.ids)
        channels = c.channels
        crop_bytes = channels * int(np.prod(box)) * 4
        per_step = volumes_per_batch * crops_per_volume
        rows = []
        for w in workers:
            cfg = BoxSamplerConfig(crop_size=crop_size, box_size=box, volumes_per_batch=volumes_per_batch,
                                   crops_per_volume=crops_per_volume, dim=3)
            sampler = BoxSampler(cache, ids, cfg, seed=0, steps=warmup + steps)
            loader = torch.utils.data.DataLoader(
                sampler, batch_size=None, sampler=range(warmup + steps), num_workers=w, pin_memory=pin,
                prefetch_factor=prefetch if w > 0 else None, worker_init_fn=worker_init if w > 0 else None)
            it = iter(loader)
            for _ in range(warmup):
                next(it)
            crops = 0
            t0 = time.perf_counter()
            for _ in range(steps):
                batch = next(it)
                crops += int(batch["boxes"].shape[0])
            seconds = time.perf_counter() - t0
            del it, loader
            row = {"workers": w, "steps": steps, "crops": crops, "crop_bytes": crop_bytes,
                   "bytes": crops * crop_bytes, "seconds": seconds, "crops_per_s": crops / seconds,
                   "mb_per_s": crops * crop_bytes / seconds / 1e6, "views_per_s": 2.0 * crops / seconds}
            row["feeds_h100"] = row["views_per_s"] >= H100_VIEWS_PER_S
            rows.append(row)
            if progress:
                print(f"bench loader: {w} worker(s): {row['crops_per_s']:.1f} crops/s, {row['mb_per_s']:.0f} MB/s",
                      flush=True)
        assert all(r["crops"] == steps * per_step for r in rows)
        best = max(rows, key=lambda r: r["crops_per_s"])
        return {
            "machine": machine_description(), "crop": list(crop_size), "box": list(box), "channels": channels,
            "volumes_per_batch": volumes_per_batch, "crops_per_volume": crops_per_volume, "pin_memory": pin,
            "cases": len(ids), "target_views_per_s": H100_VIEWS_PER_S, "rows": rows,
            "ceiling_crops_per_s": best["crops_per_s"], "ceiling_views_per_s": best["views_per_s"],
            "ceiling_workers": best["workers"],
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def loader_table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    crop = "x".join(map(str, result["crop"]))
    box = "x".join(map(str, result["box"]))
    lines = [f"bench loader — {result['machine']}; crop {crop} (box {box}), {result['volumes_per_batch']} volumes x "
             f"{result['crops_per_volume']} crops per step; target {result['target_views_per_s']:.0f} views/s",
             "", "| workers | crops/s | views/s | MB/s | feeds an H100 |", "|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workers']} | {r['crops_per_s']:.1f} | {r['views_per_s']:.1f} | {r['mb_per_s']:.0f} | "
                     f"{'yes' if r['feeds_h100'] else 'no'} |")
    return "\n".join(lines)
