"""``volcontrast evaluate``: score a fine-tuned run on its test fold (sliding window, Dice and HD95)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from volcontrast.data.cache import Cache
from volcontrast.data.splits import kfold_splits
from volcontrast.engine.inference import sliding_window_probabilities
from volcontrast.engine.metrics import NAN_RULE, aggregate, format_metrics_table, jsonable, segmentation_metrics
from volcontrast.engine.predict import load_segmentation_model
from volcontrast.errors import InputError
from volcontrast.utils.files import atomic_write_json, read_json


def evaluation_cases(run: Path, cache: Cache, fold: int | None) -> tuple[int, list[str]]:
    """The test cases to score: the run's own test fold, or fold ``fold`` if it shares no case with the
    cases the run trained or chose its checkpoint on."""
    split = read_json(run / "split.json")
    if fold is None or fold == int(split["fold"]):
        return int(split["fold"]), list(split["test"])
    splits = kfold_splits(cache.labelled_ids, int(split["folds"]), seed=int(split["seed"]))
    if not 0 <= fold < len(splits):
        raise InputError("--fold", f"must be in 0..{len(splits) - 1}")
    test = list(splits[fold].test)
    seen = set(split["train"]) | set(split["val"])
    leaked = sorted(seen & set(test))
    if leaked:
        raise InputError("--fold", f"fold {fold}'s test cases {leaked[:3]} were training/validation cases of this run "
                         f"(trained on fold {split['fold']})")
    return fold, test


def checkpoint_folder(run: Path, checkpoint: str) -> tuple[Path, str]:
    """(folder, name) of a run's weights: "best" (validation choice; the last weights when the run chose none),
    "last", or "step<N>" (a snapshot saved by fine-tuning's ``snapshots``)."""
    if checkpoint == "best":
        return (run / "best", "best") if (run / "best" / "model.safetensors").is_file() else (run, "last")
    if checkpoint == "last":
        return run, "last"
    if checkpoint.startswith("step") and checkpoint[4:].isdigit():
        folder = run / "snapshots" / checkpoint
        if not (folder / "model.safetensors").is_file():
            raise InputError(folder, "no such snapshot (fine-tune with snapshots to save it)")
        return folder, checkpoint
    raise InputError("--checkpoint", f"must be best, last or step<N>, got {checkpoint!r}")


def evaluate(run: str | os.PathLike, cache: str | os.PathLike | Cache, fold: int | None = None, *,
             checkpoint: str = "best", overlap: float = 0.5, progress: bool = True,
             cases: list[str] | None = None) -> dict[str, Any]:
    """Per-case, per-class Dice and HD95 (mm) on the test fold; writes ``RUN/metrics.json`` and returns it.

    ``checkpoint``: "best" (validation choice, ``RUN/best``; falls back to the last weights when the run
    had no validation cases), "last" or "step<N>" (a snapshot; written to ``RUN/metrics_step<N>.json``).
    ``cases``: score these (labelled, never-trained-on) cases instead of a fold, e.g. development cases for a
    learning-rate sweep; written to ``RUN/metrics_dev.json``.
    """
    run = Path(run)
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    source, checkpoint = checkpoint_folder(run, checkpoint)
    net, meta = load_segmentation_model(source)
    if meta.get("preprocessing") != cache.manifest.get("resolved"):
        raise InputError(cache.root / "manifest.json",
                         "this cache was preprocessed differently from the run's training data")
    if cases is None:
        fold, cases = evaluation_cases(run, cache, fold)
        name = "metrics.json" if checkpoint in ("best", "last") else f"metrics_{checkpoint}.json"
    else:
        split = read_json(run / "split.json")
        seen = sorted(set(cases) & set([*split["labeled"], *split.get("validation", [])]))
        if seen:
            raise InputError("cases", f"{seen[:3]} were labelled volumes of this run")
        fold, name = -1, "metrics_dev.json"
    missing = [c for c in cases if c not in cache.ids or not cache.meta(c).has_label]
    if missing:
        raise InputError(cache.root, f"test cases missing or unlabelled in this cache: {missing[:5]}")
    classes = list(range(1, int(net.num_classes)))
    per_case: dict[str, dict[int, dict[str, float]]] = {}
    from rich.progress import track

    for cid in track(cases, description="evaluate", disable=not progress):
        probs = sliding_window_probabilities(net, cache.image(cid), meta["patch_size"], overlap=overlap)
        pred = probs.argmax(0).numpy()
        per_case[cid] = segmentation_metrics(pred, np.asarray(cache.label(cid)), cache.meta(cid).spacing, classes)
    summary = aggregate(per_case)
    names = {int(k): v for k, v in (meta.get("label_names") or {}).items()}
    result = {
        "fold": fold,
        "checkpoint": checkpoint,
        "step": meta.get("step"),
        "cases": per_case,
        "aggregate": summary,
        "label_names": names,
        "nan_rule": NAN_RULE,
    }
    atomic_write_json(run / name, jsonable(result))
    result["table"] = format_metrics_table(per_case, names)
    return result
