"""``volcontrast demo``: the whole path on the built-in cohort, sized for 2 CPU cores and ~10 minutes.

synth cohort (kept in the user's cache folder) -> prepare -> pretrain PCL and SimCLR -> fine-tune scratch vs
pretrained with 1 and 2 labelled volumes -> Dice table + plot. It is a small :func:`run_benchmark`, so a rerun
reuses every finished step.

Settings (why): the cohort uses one body range for every scan (``fov="chest_abdomen"``), which is PCL's own
assumption — on the default cohort with varying fields of view, PCL's body/index positions pair different anatomy
and it learns little (that comparison belongs to the benchmark, next to Spade). Pretraining sees every image without
labels ("transductive", as PCL did) for 1500 steps of small 16³ crops (local anatomy, 8 per volume) with no
intensity augmentation (CT intensities identify tissue); fine-tuning runs 300 steps on 32x24x32 patches; both with
the tiny nnU-Net-style U-Net. Shorter pretraining, 32³ pretraining crops or intensity augmentation gave no gain
over scratch at this scale (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from volcontrast.bench.benchmark import BenchmarkConfig, run_benchmark
from volcontrast.bench.report import read_results, summary_table

DEMO_VERSION = 1
DEMO_COHORT: dict[str, Any] = {"cases": 24, "modality": "ct", "seed": 0, "size": (64, 64, 64), "fov": "chest_abdomen"}
NO_INTENSITY = {"brightness_prob": 0.0, "contrast_prob": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0, "blur_prob": 0.0}


def demo_config(folds: list[int] | None = None) -> BenchmarkConfig:
    return BenchmarkConfig(
        methods=["scratch", "simclr", "pcl"], labeled=[1, 2], folds=3, run_folds=folds or [0], seeds=[0],
        transductive=True,
        pretrain_preset="cpu-small", finetune_preset="cpu-small", pretrain_steps=1500, finetune_steps=300,
        pretrain={"data": {"crop_size": [16, 16, 16], "volumes_per_batch": 4, "crops_per_volume": 8},
                  "augment": dict(NO_INTENSITY), "probe_every": 0},
        finetune={"data": {"crop_size": [32, 24, 32]}, "optim": {"lr": 3e-3}, "val_every": 0},
    )


def user_cache_dir() -> Path:
    """``$VOLCONTRAST_CACHE``, else ``$XDG_CACHE_HOME/volcontrast``, else ``~/.cache/volcontrast``."""
    if os.environ.get("VOLCONTRAST_CACHE"):
        return Path(os.environ["VOLCONTRAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "volcontrast"


def run_demo(out: str | os.PathLike = "volcontrast-demo", *, folds: list[int] | None = None, progress: bool = True,
             log=print) -> dict[str, Any]:
    """Run (or finish) the demo; returns the paths of its outputs and the wall time."""
    from volcontrast.data.prepare import prepare_dataset
    from volcontrast.data.synth import generate_cohort

    t0 = time.perf_counter()
    root = user_cache_dir() / f"demo-v{DEMO_VERSION}"
    raw, cache = root / "synth", root / "cache"
    if not (raw / "dataset.json").is_file():
        log(f"generating the synthetic cohort in {raw}")
        generate_cohort(raw, progress=progress, **DEMO_COHORT)
    log(f"preparing the cache in {cache}")
    prepare_dataset(raw, cache, progress=progress)
    results = run_benchmark(cache, out, demo_config(folds), progress=progress, log=log)
    seconds = time.perf_counter() - t0
    rows = read_results(results)
    log("\n" + summary_table(rows))
    log(f"demo finished in {seconds / 60:.1f} min: {Path(out) / 'results.md'}, {Path(out) / 'results.png'}")
    return {"results": results, "markdown": Path(out) / "results.md", "plot": Path(out) / "results.png",
            "seconds": seconds, "cache": cache}
