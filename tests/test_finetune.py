"""Fine-tuning, evaluation and the benchmark protocol on the phantom cache (tiny, fast)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from volcontrast.bench.benchmark import BenchmarkConfig, run_benchmark
from volcontrast.bench.report import read_results
from volcontrast.cli import main
from volcontrast.config import load_yaml
from volcontrast.data.cache import open_cache
from volcontrast.engine import finetune as finetune_mod
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.evaluate import evaluate
from volcontrast.engine.finetune import build_segmentation_backbone, finetune, resolve_finetune_config
from volcontrast.engine.pretrain import pretrain
from volcontrast.errors import InputError

FT = {"folds": 2, "data": {"crop_size": [16, 16, 16], "batch_size": 2}, "steps": 4, "log_every": 2, "val_every": 2}


def _ft(**kw):
    over = json.loads(json.dumps(FT))
    over.update(kw)
    return resolve_finetune_config("cpu-tiny", None, over)


@pytest.fixture(scope="module")
def pretrained(phantom_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "pcl"
    cfg = resolve_pretrain_config("cpu-tiny", None, {"steps": 2, "data": {"crop_size": [16, 16, 16]},
                                                      "probe_crops": 0})
    pretrain(phantom_cache, run, cfg, progress=False)
    return run


def test_test_fold_never_reaches_training_or_checkpoint_choice(phantom_cache, tmp_path, monkeypatch):
    seen = {}
    real_sampler = finetune_mod.LabelledBoxSampler
    real_validate = finetune_mod.SegmentationTask.validate

    def spy_sampler(root, case_ids, *a, **k):
        seen["train"] = list(case_ids)
        return real_sampler(root, case_ids, *a, **k)

    def spy_validate(self):
        seen.setdefault("val", set()).update(self.val_ids)
        return real_validate(self)

    monkeypatch.setattr(finetune_mod, "LabelledBoxSampler", spy_sampler)
    monkeypatch.setattr(finetune_mod.SegmentationTask, "validate", spy_validate)
    finetune(phantom_cache, tmp_path / "run", _ft(labeled=1, val=1, fold=1), progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    test = set(split["test"])
    assert test and not test & set(seen["train"]) and not test & seen["val"]
    assert seen["train"] == split["labeled"] and set(split["labeled"]) <= set(split["train"])
    assert seen["val"] == set(split["validation"]) and set(split["validation"]) <= set(split["val"])
    assert split["label_budget"] == 2  # the validation volume counts
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["kind"] == "segmentation" and meta["labeled_cases"] == split["labeled"]
    best = json.loads((tmp_path / "run" / "best" / "model.json").read_text())
    assert best["step"] in (2, 4) and 0.0 <= best["val_dice"] <= 1.0


def test_default_run_reads_no_label_outside_its_training_volume(phantom_cache, tmp_path, monkeypatch):
    from volcontrast.data.cache import Cache

    touched = []
    real_label = Cache.label

    def spy_label(self, cid):
        touched.append(cid)
        return real_label(self, cid)

    monkeypatch.setattr(Cache, "label", spy_label)
    finetune(phantom_cache, tmp_path / "run", _ft(labeled=1), progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert touched and set(touched) == set(split["labeled"]) and len(split["labeled"]) == 1
    assert split["validation"] == [] and split["label_budget"] == 1
    assert not (tmp_path / "run" / "best").exists()  # no checkpoint choice: the last weights are the model


def test_split_and_budget_draws_are_deterministic(phantom_cache, tmp_path):
    finetune(phantom_cache, tmp_path / "a", _ft(labeled=1), progress=False)
    finetune(phantom_cache, tmp_path / "b", _ft(labeled=1, init="scratch"), progress=False)
    a = json.loads((tmp_path / "a" / "split.json").read_text())
    b = json.loads((tmp_path / "b" / "split.json").read_text())
    assert a == b


def test_pretrained_encoder_is_loaded(phantom_cache, pretrained):
    cache = open_cache(phantom_cache)
    net, note = build_segmentation_backbone(cache, _ft(init=str(pretrained)))
    weights = load_file(str(pretrained / "model.safetensors"))
    enc = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.encoder.")}
    state = net.state_dict()
    assert enc and all(torch.equal(state[k], v) for k, v in enc.items())
    assert "pcl run" in note
    # the segmentation head has the cache's classes, not the pretraining run's
    assert net.num_classes == cache.num_classes


def test_finetune_rejects_a_segmentation_run_as_init(phantom_cache, tmp_path):
    finetune(phantom_cache, tmp_path / "seg", _ft(), progress=False)
    with pytest.raises(InputError, match="must be a pretraining run"):
        finetune(phantom_cache, tmp_path / "x", _ft(init=str(tmp_path / "seg")), progress=False)


def test_evaluate_writes_metrics_for_the_test_fold(phantom_cache, tmp_path):
    finetune(phantom_cache, tmp_path / "run", _ft(fold=0), progress=False)
    result = evaluate(tmp_path / "run", phantom_cache, progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert sorted(metrics["cases"]) == split["test"] and metrics["fold"] == 0
    assert 0.0 <= result["aggregate"]["mean_dice"] <= 1.0
    assert "NaN rule" in result["table"]
    with pytest.raises(InputError, match="were training/validation cases of this run"):
        evaluate(tmp_path / "run", phantom_cache, fold=1, progress=False)


def test_tiny_benchmark_writes_csv_table_png_and_resumes(phantom_cache, tmp_path):
    cfg = BenchmarkConfig(methods=["scratch", "pcl", "spade-nodebias"], labeled=[1], folds=2, run_folds=[0],
                          seeds=[0], pretrain_preset="cpu-tiny", finetune_preset="cpu-tiny", pretrain_steps=2,
                          finetune_steps=4, eval_at=[0.5, 1.0],
                          pretrain={"data": {"crop_size": [16, 16, 16]}, "probe_crops": 0},
                          finetune={"data": {"crop_size": [16, 16, 16]}, "log_every": 1},
                          pretrain_by_method={"spade-nodebias": {"steps": 3, "spade": {"local_points": 16}}})
    results = run_benchmark(phantom_cache, tmp_path / "bench", cfg, progress=False, log=lambda m: None)
    rows = read_results(results)
    n_test = rows[0]["n_test"]
    # one row per method x scored point (50%, 100% of the steps) x test case
    assert len(rows) == 3 * 2 * n_test and n_test == 2
    assert sorted({r["method"] for r in rows}) == ["pcl", "scratch", "spade-nodebias"]
    assert sorted({(r["at"], r["step"], r["checkpoint"]) for r in rows}) == [(0.5, 2, "step2"), (1.0, 4, "last")]
    pre = {p.name.split("_seed")[0]: load_yaml(p / "config.yaml") for p in (tmp_path / "bench" / "runs" /
                                                                              "pretrain").iterdir()}
    assert pre["pcl"]["steps"] == 2 and pre["spade-nodebias"]["steps"] == 3  # per-method overrides win
    assert pre["spade-nodebias"]["spade"]["local_points"] == 16 and pre["pcl"]["spade"]["local_points"] == 1024
    assert all(r["labeled"] == 1 and r["val"] == 0 and r["fold"] == 0 and 0 <= r["dice"] <= 1 for r in rows)
    assert all(r["converged"] in (0.0, 1.0) and 0 <= r["train_dice"] <= 1 for r in rows)
    md = (tmp_path / "bench" / "results.md").read_text(encoding="utf-8")
    assert "| scratch |" in md and "| pcl |" in md and "One fold only (fold 0)" in md
    assert "| pcl | M=1 |" in md and "50% of steps" in md
    png = (tmp_path / "bench" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the same labelled draw for every method
    runs = tmp_path / "bench" / "runs" / "fold0_seed0"
    drawn = {m: json.loads((runs / f"finetune_{m}_M1" / "split.json").read_text())["labeled"]
             for m in ("scratch", "pcl")}
    assert drawn["scratch"] == drawn["pcl"]
    # a rerun finds every cell finished and adds nothing
    run_benchmark(phantom_cache, tmp_path / "bench", cfg, progress=False, log=lambda m: None)
    assert len(read_results(results)) == 3 * 2 * n_test


def test_cli_finetune_evaluate(phantom_cache, tmp_path, capsys):
    args = ["finetune", str(phantom_cache), "--out", str(tmp_path / "run"), "--preset", "cpu-tiny", "--folds", "2",
            "--crop", "16", "--crop", "16", "--crop", "16", "--steps", "2", "--val", "1", "--scratch-lr", "5e-3",
            "--lr-schedule", "cosine", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0 and "fine-tuned 2 steps" in capsys.readouterr().err
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    cfg = load_yaml(tmp_path / "run" / "config.yaml")
    assert len(split["validation"]) == 1 and split["label_budget"] == len(split["labeled"]) + 1
    assert cfg["scratch_lr"] == 5e-3 and cfg["lr_schedule"] == "cosine" and cfg["val"] == 1
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "run"), "--data", str(phantom_cache), "--quiet"])
    out = capsys.readouterr()
    assert exc.value.code == 0 and "| case | class | Dice | HD95 (mm) |" in out.out and "mean Dice" in out.err
    with pytest.raises(SystemExit) as exc:
        main(["finetune", str(phantom_cache), "--out", str(tmp_path / "r2"), "--labeled", "9", "--folds", "2",
              "--quiet"])
    assert exc.value.code == 2 and "budget" in capsys.readouterr().err


def test_finetune_resume_is_exact(phantom_cache, tmp_path):
    cfg = _ft(steps=6, checkpoint_every=2, val_every=0)
    finetune(phantom_cache, tmp_path / "full", cfg, progress=False)

    class Interrupt(Exception):
        pass

    real_fit = finetune_mod.fit

    def stop(row):
        if row["step"] == 4:
            raise Interrupt

    finetune_mod.fit = lambda *a, **k: real_fit(*a, **k, on_log=stop)
    try:
        with pytest.raises(Interrupt):
            finetune(phantom_cache, tmp_path / "cut", _ft(steps=6, checkpoint_every=2, val_every=0), progress=False)
    finally:
        finetune_mod.fit = real_fit
    finetune(phantom_cache, tmp_path / "cut", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith(("encoder.", "decoder.", "seg_head.")) for k in a)  # the bare backbone, for predict


def test_finetune_with_pdcr_and_uafs_from_a_pretrained_encoder(phantom_cache, pretrained, tmp_path):
    cfg = _ft(init=str(pretrained), pdcr=True, uafs=True, steps=4, log_every=2)
    result = finetune(phantom_cache, tmp_path / "run", cfg, progress=False)
    row = result.history[-1]
    assert row["pdcr_loss"] > 0 and abs(row["loss"] - (row["seg_loss"] + row["pdcr_loss"])) < 1e-4
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["uafs"] is True
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("post_decoder_blocks.") for k in weights)
    # the pretrained encoder was loaded into the UAFS network before training
    assert "pcl run" in meta["init_note"]
    # evaluate (and so predict's loader) rebuilds the UAFS blocks from model.json
    metrics = evaluate(tmp_path / "run", phantom_cache, progress=False)
    assert 0.0 <= metrics["aggregate"]["mean_dice"] <= 1.0


def test_pdcr_grid_spacing_follows_the_patch_and_strides(phantom_cache, tmp_path):
    from volcontrast.engine.finetune import pdcr_grid_spacing
    from volcontrast.nets import build_backbone

    tiny = build_backbone("plain_unet", preset="tiny", dim=3)
    assert pdcr_grid_spacing(tiny, [2, 3], (32, 32, 32), 0) == 8
    assert pdcr_grid_spacing(tiny, [2, 3], (128, 128, 128), 0) == 32
    assert pdcr_grid_spacing(tiny, [2, 3], (16, 16, 16), 0) == 8
    assert pdcr_grid_spacing(tiny, [2, 3], (32, 32, 32), 16) == 16
    with pytest.raises(InputError, match="--pdcr-stages"):
        finetune(phantom_cache, tmp_path / "bad", _ft(pdcr=True, pdcr_stages=[2, 9]), progress=False)
    # nothing written for a bad option (the run folder's lock file aside)
    assert not [p.name for p in (tmp_path / "bad").glob("*") if p.name != ".lock"]


def test_deep_supervision_with_pdcr_and_uafs(phantom_cache, tmp_path):
    cfg = _ft(deep_supervision=True, pdcr=True, uafs=True, steps=2, log_every=1)
    result = finetune(phantom_cache, tmp_path / "run", cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["architecture"]["deep_supervision"] is True
    # inference takes the full-resolution output of the deep-supervision list
    metrics = evaluate(tmp_path / "run", phantom_cache, progress=False)
    assert 0.0 <= metrics["aggregate"]["mean_dice"] <= 1.0
