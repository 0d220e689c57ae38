"""Pretraining through the engine: resume determinism, run folder contract, CLI errors, each method runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from volcontrast.cli import main
from volcontrast.config import load_yaml
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import pretrain
from volcontrast.engine.run import read_log

from helpers import pretrain_interrupted, torchrun_pretrain

TINY = {"data": {"crop_size": [16, 16, 16], "workers": 0}, "probe_crops": 8, "log_every": 2,
        "checkpoint_every": 4}


def _cfg(**kw):
    """cpu-tiny <- TINY <- ``kw`` (nested dicts merge)."""
    return resolve_pretrain_config("cpu-tiny", TINY, kw)


def test_resume_repeats_an_uninterrupted_run_exactly(phantom_cache, tmp_path):
    full = pretrain(phantom_cache, tmp_path / "full", _cfg(steps=12), progress=False)
    pretrain_interrupted(phantom_cache, tmp_path / "cut", _cfg(steps=12), at_step=10)
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["step"] == 8
    pretrain(phantom_cache, tmp_path / "cut", resume=True, progress=False)
    a = read_log(tmp_path / "full" / "log.csv")
    b = read_log(tmp_path / "cut" / "log.csv")
    assert [r["step"] for r in b] == [2, 4, 6, 8, 10, 12]
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "mean_positives", "pos_cosine"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert full.steps == 12


def test_run_folder_contract(phantom_cache, tmp_path):
    pretrain(phantom_cache, tmp_path / "run", _cfg(steps=4, method="simclr"), progress=False)
    run = tmp_path / "run"
    cfg = load_yaml(run / "config.yaml")
    assert cfg["method"] == "simclr" and cfg["steps"] == 4
    meta = json.loads((run / "model.json").read_text())
    assert meta["kind"] == "pretrain" and meta["step"] == 4 and meta["backbone_prefix"] == "backbone."
    assert meta["architecture"]["name"] == "plain_unet" and meta["preprocessing"]["spacing"]
    weights = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("backbone.encoder.") for k in weights) and any(k.startswith("head.") for k in weights)
    rows = read_log(run / "log.csv")
    assert [r["step"] for r in rows] == [2, 4] and all("lr" in r and "loss" in r for r in rows)
    assert "probe_r2_z" in rows[-1]
    assert list((run / "tb").iterdir())
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state


@pytest.mark.parametrize("method", ["simclr", "gcl", "pcl"])
@pytest.mark.parametrize("dim", [2, 3])
def test_each_method_trains_in_2d_and_3d(phantom_cache, tmp_path, method, dim):
    crop = [16, 16, 16] if dim == 3 else [16, 16]
    cfg = _cfg(steps=4, method=method, dim=dim, data={"crop_size": crop})
    result = pretrain(phantom_cache, tmp_path / "run", cfg, progress=False)
    assert torch.isfinite(torch.tensor(result.last_loss))
    if method == "simclr":
        assert result.history[-1]["mean_positives"] == pytest.approx(1.0)
    else:
        assert result.history[-1]["mean_positives"] >= 1.0


def _run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def test_cli_pretrain_errors(phantom_cache, tmp_path, capsys):
    base = ["pretrain", phantom_cache, "--preset", "cpu-tiny", "--crop", 16, "--crop", 16, "--crop", 16, "--steps", 2,
            "--quiet"]
    code, err = _run([*base, "--out", tmp_path / "run"], capsys)
    assert code == 0 and "pretrained 2 steps" in err
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    code, err = _run([*base, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "already holds a run; use --resume" in err
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before  # nothing lost
    code, err = _run(["pretrain", phantom_cache, "--out", tmp_path / "big", "--crop", 64, "--crop", 64, "--crop", 64,
                      "--steps", 1, "--quiet"], capsys)
    assert code == 2 and "image.npy: case" in err and "smaller than the requested crop (64, 64, 64)" in err
    code, err = _run(["pretrain", phantom_cache, "--out", tmp_path / "m", "--method", "byol", "--quiet"], capsys)
    assert code == 2 and "unknown method 'byol'" in err
    code, err = _run(["pretrain", phantom_cache, "--out", tmp_path / "nothing", "--resume", "--quiet"], capsys)
    assert code == 2 and "nothing to resume" in err
    code, err = _run(["pretrain", tmp_path / "nocache", "--out", tmp_path / "x", "--quiet"], capsys)
    assert code == 2 and "not a volcontrast cache" in err


def test_collapse_monitor_warns_when_every_pair_is_positive(phantom_cache, tmp_path):
    # GCL with a single partition makes every pair a positive: the loss is minimal when all embeddings are
    # equal, so training collapses them on purpose and the monitor must say so
    cfg = _cfg(steps=40, method="gcl", log_every=4, contrast={"partitions": 1}, optim={"lr": 5e-3})
    with pytest.warns(UserWarning, match="collapse value"):
        result = pretrain(phantom_cache, tmp_path / "run", cfg, progress=False)
    rows = result.history
    assert rows[-1]["collapse_warning"] == 1.0
    assert rows[-1]["embedding_spread"] < 0.05
    assert abs(rows[-1]["loss"] - rows[-1]["collapse_value"]) < 0.01 * rows[-1]["collapse_value"]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_gather_negatives(phantom_cache, tmp_path):
    """The README's multi-GPU line works with gloo on CPU: both ranks train, rank 0 writes one run."""
    import math

    proc = torchrun_pretrain(phantom_cache, tmp_path / "run", "--preset", "cpu-tiny", "--crop", "16", "--crop", "16",
                             "--crop", "16", "--steps", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("pretrained 4 steps") == 1  # one summary line, from rank 0
    rows = read_log(tmp_path / "run" / "log.csv")
    # 2 ranks x (2 volumes x 2 crops x 2 views) = 16 embeddings gathered: collapse value ln(15)
    assert rows[-1]["collapse_value"] == pytest.approx(math.log(15), rel=1e-4)


def test_pretrain_matches_an_nnunet_plans_json(phantom_cache, tmp_path):
    from test_nets import _new_format_plans

    plans = tmp_path / "nnUNetPlans.json"
    plans.write_text(json.dumps(_new_format_plans()))
    cfg = _cfg(steps=2, model={"plans": str(plans)}, probe_crops=0)
    pretrain(phantom_cache, tmp_path / "run", cfg, progress=False)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    kw = meta["architecture"]
    assert kw["features_per_stage"] == [8, 16, 32, 32]
    assert kw["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


def test_swin_unetr_pretrains_through_the_engine(tmp_path):
    from volcontrast.data.prepare import PrepareSettings, prepare_dataset

    from helpers import write_nnunet

    raw = write_nnunet(tmp_path / "raw", n=2, shape=(36, 36, 40))
    prepare_dataset(raw, tmp_path / "cache", PrepareSettings(spacing=(1.0, 1.0, 1.0)), workers=1, progress=False)
    # SwinUNETR needs sizes that are multiples of 32 and, in training, one axis >= 64
    cfg = _cfg(steps=2, model={"backbone": "swin_unetr", "preset": "tiny"}, probe_crops=0, log_every=1,
               data={"crop_size": [32, 32, 64], "volumes_per_batch": 1, "crops_per_volume": 1})
    result = pretrain(tmp_path / "cache", tmp_path / "run", cfg, progress=False)
    assert torch.isfinite(torch.tensor(result.last_loss))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["architecture"]["name"] == "swin_unetr"
    bad = _cfg(steps=1, model={"backbone": "swin_unetr", "preset": "tiny"}, data={"crop_size": [24, 24, 24]})
    from volcontrast.errors import InputError

    with pytest.raises(InputError, match="data.crop_size"):
        pretrain(tmp_path / "cache", tmp_path / "bad", bad, progress=False)
