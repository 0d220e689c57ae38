"""The synthetic cohort through prepare and pretraining (the default data of the demo)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from volcontrast.data.cache import open_cache
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import pretrain

NO_INTENSITY = {"brightness_prob": 0.0, "contrast_prob": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0, "blur_prob": 0.0}


def test_prepare_reads_the_synthetic_cohort_unchanged(synth_cache):
    raw, cache_dir = synth_cache
    cache = open_cache(cache_dir)
    assert len(cache.ids) == 6 and cache.modality == "ct" and cache.num_classes == 12
    hits = 0
    for cid in cache.ids:
        meta = cache.meta(cid)
        label = np.asarray(cache.label(cid))
        marks = json.loads((raw / "landmarks" / f"{cid}.json").read_text(encoding="utf-8"))["landmarks"]
        for organ, value in (("liver", 5), ("heart", 3)):
            mark = marks[f"centroid_{organ}"]
            if not mark["in_fov"]:
                continue
            ijk = np.round(np.linalg.solve(meta.affine, [*mark["world_mm"], 1.0])[:3]).astype(int)
            if np.all(ijk >= 0) and np.all(ijk < label.shape):
                # the landmark's world position lands on (or right next to) its organ in the cached array
                lo, hi = np.maximum(ijk - 1, 0), ijk + 2
                hits += bool((label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == value).any())
    assert hits >= 8


@pytest.mark.parametrize("method", ["simclr", "gcl", "pcl"])
def test_short_pretraining_lowers_the_loss_and_avoids_collapse(synth_cache, tmp_path, method):
    _, cache_dir = synth_cache
    cfg = resolve_pretrain_config("cpu-tiny", None, {
        "method": method, "steps": 120, "log_every": 10, "probe_crops": 0, "augment": NO_INTENSITY,
        "data": {"crop_size": [16, 16, 16], "volumes_per_batch": 4, "crops_per_volume": 4},
        "optim": {"lr": 2e-3, "warmup_steps": 5}, "contrast": {"partitions": 4, "threshold": [0.1]},
    })
    result = pretrain(cache_dir, tmp_path / method, cfg, progress=False)
    rows = result.history
    ratio = [r["loss"] / r["collapse_value"] for r in rows]
    assert np.mean(ratio[-2:]) < np.mean(ratio[:2]) - 0.03, ratio
    assert rows[-1]["embedding_spread"] > 0.1
    assert not any(r.get("collapse_warning") for r in rows)
