"""``volcontrast demo``: the whole path on the built-in cohort, sized for 2 CPU cores and ~10 minutes.

synth cohort (kept in the user's cache folder) -> prepare -> pretrain PCL and SimCLR -> fine-tune scratch vs
pretrained with 1 and 2 labelled volumes (no validation labels: M is every label a run sees) -> the benchmark's
protocol output: Dice during fine-tuning, the paired difference to scratch with its bootstrap CI, a sentence per
method saying whether the difference is beyond noise, and whether scratch converged. It is a small
:func:`run_benchmark`, so a rerun reuses every finished step. One fold and one seed: the output says so.

Settings (why): the cohort uses one body range for every scan (``fov="chest_abdomen"``), which is PCL's own
assumption — on the default cohort with varying fields of view, PCL's body/index positions pair different anatomy
and it learns little (that comparison belongs to the benchmark, next to Spade). Pretraining sees every image without
labels ("transductive", as PCL did) for 1500 steps of small 16³ crops (local anatomy, 8 per volume) with no
intensity augmentation (CT intensities identify tissue); fine-tuning runs 300 steps on 32x24x32 patches with the
benchmark's recipe (10% warm-up, poly decay, a pretrained encoder at half the learning rate), test Dice at 10%,
30% and 100% of them; both with the tiny nnU-Net-style U-Net. Shorter pretraining, 32³ pretraining crops or
intensity augmentation gave no gain over scratch at this scale (see benchmarks/RESULTS.md). 300 steps keep the demo
short but do not train scratch to convergence on this cohort (1000 steps roughly double its Dice): the output says
how many scratch runs converged, and where they did not, a difference is partly speed — the converged comparison
is the benchmark's job (``volcontrast benchmark --finetune-steps ...``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from volcontrast.bench.benchmark import BenchmarkConfig, run_benchmark
from volcontrast.bench.report import latest_rows, paired_stats, paired_table, read_results, verdict_sentences

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


# printed after the verdicts: the demo's short, untuned fine-tuning is not the converged comparison
DEMO_CAVEAT = ("Read these verdicts as speed, not as a better model: to fit in ~10 minutes the demo fine-tunes for "
               "300 steps at a fixed learning rate, so scratch is under-trained (a flat training curve under a "
               "decaying learning rate is not convergence). The converged comparison with a tuned scratch "
               "(benchmarks/RESULTS.md, 'The few-label study': 1500 steps, scratch's learning rate swept, 3 folds) "
               "found no gain for PCL, VoCo or MAE at one labelled volume on this cohort.")


def convergence_sentence(rows) -> str:
    """How many scratch runs had a flat training Dice at the end (the report's ``converged`` flag)."""
    scratch = {(r["labeled"], r["fold"], r["seed"]): r for r in rows
               if str(r["method"]).startswith("scratch") and r.get("at", 1.0) == 1.0}
    n = sum(float(r.get("converged", 0.0)) == 1.0 for r in scratch.values())
    text = f"scratch converged (training Dice flat over the last 20% of the steps) in {n} of {len(scratch)} runs"
    if n < len(scratch):
        text += ("; where it did not, part of any gain is speed, not a better model — more fine-tuning steps "
                 "(benchmark --finetune-steps) give the converged comparison")
    return text + "."


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
    old = Path(out) / "results.csv"
    if old.is_file() and "case" not in old.read_text(encoding="utf-8").partition("\n")[0].split(","):
        old.rename(old.with_name("results-before-protocol.csv"))  # one row per cell: an older demo's results
        log(f"moved the older demo's results (no per-case rows) to {old.with_name('results-before-protocol.csv')}")
    results = run_benchmark(cache, out, demo_config(folds), progress=progress, log=log)
    seconds = time.perf_counter() - t0
    rows = latest_rows(read_results(results))
    records = paired_stats(rows)
    log("\n" + paired_table(records))
    for sentence in verdict_sentences(records):
        log(sentence)
    log(convergence_sentence(rows))
    log(DEMO_CAVEAT)
    log(f"demo finished in {seconds / 60:.1f} min: {Path(out) / 'results.md'}, {Path(out) / 'results.png'}")
    return {"results": results, "markdown": Path(out) / "results.md", "plot": Path(out) / "results.png",
            "seconds": seconds, "cache": cache}
