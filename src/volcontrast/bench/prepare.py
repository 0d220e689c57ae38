"""``volcontrast bench prepare``: throughput of the preprocessing cache on a generated dataset."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from volcontrast.bench.machine import machine_description


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_prepare_benchmark(*, cases: int = 8, size: int = 96, workers: int | None = None,
                          out: str | os.PathLike | None = None, modality: str = "ct") -> dict[str, float]:
    """Generate ``cases`` synthetic scans of ``size``³, run ``prepare`` twice (cold, then resume) and report.

    Returns a dict with ``cases_per_s``, ``mb_per_s`` (input bytes read per second), ``output_mb``,
    ``seconds`` and ``resume_seconds``.
    """
    from volcontrast.data.prepare import PrepareSettings, default_workers, prepare_dataset
    from volcontrast.data.synth import generate_cohort

    workers = workers or default_workers()
    tmp = Path(out) if out else Path(tempfile.mkdtemp(prefix="volcontrast-bench-"))
    try:
        raw = tmp / "raw"
        cache = tmp / "cache"
        if cache.exists():
            shutil.rmtree(cache)
        generate_cohort(raw, cases=cases, modality=modality, seed=0, size=(size, size, size), progress=False)
        # input size as the decoded arrays the readers deliver (compressed files would flatter MB/s)
        from volcontrast.io.readers import read_geometry

        in_voxels = sum(
            int(np.prod(read_geometry(p).shape)) for p in sorted((raw / "imagesTr").iterdir())
        )
        t0 = time.perf_counter()
        prepare_dataset(raw, cache, PrepareSettings(), workers=workers, progress=False)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        prepare_dataset(raw, cache, PrepareSettings(), workers=workers, progress=False)
        resume_seconds = time.perf_counter() - t1
        result = {
            "cases": float(cases),
            "workers": float(workers),
            "seconds": seconds,
            "cases_per_s": cases / seconds,
            "mb_per_s": in_voxels * 4 / 1e6 / seconds,
            "output_mb": _folder_bytes(cache / "cases") / 1e6,
            "resume_seconds": resume_seconds,
        }
    finally:
        if out is None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"prepare: {cases} CT cases of {size}³, {workers} worker(s) — {machine_description()}")
    for k in ("cases_per_s", "mb_per_s", "output_mb", "seconds", "resume_seconds"):
        table.add_column(k)
    table.add_row(*(f"{result[k]:.2f}" for k in ("cases_per_s", "mb_per_s", "output_mb", "seconds", "resume_seconds")))
    Console().print(table)
    return result
