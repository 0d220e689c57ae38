"""Alice through the engine: views and tube masks from prepare(), gradient flow (student yes, teacher no), teacher
targets and the EMA/centre updates, a short CPU pretraining that learns without collapse, the collapse monitor,
exact resume, two gloo ranks under torchrun, SwinUNETR, and config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from volcontrast.data.cache import Cache
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import build_pretraining, pretrain
from volcontrast.engine.run import read_log
from volcontrast.errors import InputError
from volcontrast.losses.distill import DINOHead
from volcontrast.methods.alice import Alice, GlobalHead
from volcontrast.views.pair_sampler import CrossScanPairSampler

from helpers import pretrain_interrupted, torchrun_pretrain

K = 64  # prototypes of the small test heads
SMALL = {"method": "alice", "data": {"crop_size": [16, 16, 16], "workers": 0}, "probe_crops": 0, "log_every": 5,
         "checkpoint_every": 1000,
         "alice": {"mask_block": [4, 4], "num_prototypes": K, "head_hidden": 64, "head_bottleneck": 32,
                   "casa_dim": 32, "casa_heads": 4, "pairs_per_batch": 4}}


def _cfg(**kw):
    """cpu-tiny <- SMALL <- ``kw`` (nested dicts merge)."""
    return resolve_pretrain_config("cpu-tiny", SMALL, kw)


@pytest.fixture(scope="module")
def cache(synth_cache):
    return synth_cache[1]


@pytest.fixture(scope="module")
def built(cache):
    method, sampler, _ = build_pretraining(Cache(cache), _cfg(steps=10))
    return method, sampler


def _batch(method: Alice, sampler, step: int = 0, seed: int = 0):
    raw = {k: torch.as_tensor(v) for k, v in sampler[step].items()}
    with torch.no_grad():
        return raw, method.prepare(raw, step, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_prepare_gives_masked_student_and_unmasked_teacher_inputs(built):
    method, sampler = built
    assert isinstance(method, Alice) and isinstance(sampler, CrossScanPairSampler)
    raw, batch = _batch(method, sampler)
    n = 2 * 4
    views, masked, mask = batch["views"], batch["masked"], batch["mask"]
    assert views.shape == masked.shape == batch["clean"].shape == (n, 1, 16, 16, 16)
    assert mask.shape == (n, 16, 16, 16) and mask.dtype == torch.bool
    assert batch["n_samples"] == n and batch["pairs"] == 4
    # 16x16 plane in 4x4 blocks: 12 of 16 blocks masked -> exactly 75 % of each view, tubes along z (axis 2)
    assert torch.equal(mask.float().mean(dim=(1, 2, 3)), torch.full((n,), 0.75))
    assert torch.equal(mask.all(dim=-1), mask.any(dim=-1))
    assert not torch.equal(mask[0], mask[1])  # an independent draw per view
    m = mask.unsqueeze(1)
    assert torch.all(masked[m] == 0) and torch.equal(masked[~m], views[~m])
    assert (views[m] != 0).float().mean() > 0.9  # the teacher's inputs are not masked
    # Q from scan A, K from scan B: different anatomy crops, not copies
    assert not torch.allclose(views[:4], views[4:])
    assert batch["rejected"] == float(raw["rejected"]) and batch["tries"] == float(raw["tries"])
    _, again = _batch(method, sampler)
    assert torch.equal(again["mask"], mask) and torch.equal(again["masked"], masked)


def test_gradient_reaches_the_student_not_the_teacher_and_targets_are_distributions(built):
    method, sampler = built
    method.train()
    method.zero_grad(set_to_none=True)
    _, batch = _batch(method, sampler, step=1)
    loss, logs = method(batch)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in method.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for part in ("backbone.encoder", "backbone.decoder", "global_head", "q_proj", "kv_proj", "casa", "patch_head",
                 "rec_head"):
        params = [(n, p) for n, p in method.named_parameters() if n.startswith(part + ".") and p.requires_grad]
        assert params, part
        for n, p in params:
            assert p.grad is not None, n
        assert sum(float(p.grad.abs().sum()) for _, p in params) > 0, part
    # the teacher targets: centred, sharpened distributions over the K prototypes (rows sum to 1)
    pending = method._pending
    tau = method.teacher_temperature(1)
    p_global = method.global_centre.targets(pending["global"], tau)
    p_tokens = method.token_centre.targets(pending["tokens"], tau)
    assert p_global.shape == (8, K) and p_tokens.shape[0] == 8 and p_tokens.shape[-1] == K
    torch.testing.assert_close(p_global.sum(-1), torch.ones(8))
    torch.testing.assert_close(p_tokens.sum(-1), torch.ones(p_tokens.shape[:-1]))
    # H(P_t, P_s) >= H(P_t) for every row (Gibbs), so the inter loss is at least the teacher entropy
    assert float(logs["loss_inter"]) >= float(logs["teacher_entropy"]) - 1e-5
    assert 0 < float(logs["teacher_entropy"]) < math.log(K)
    method.zero_grad(set_to_none=True)


def test_after_step_is_the_ema_of_every_teacher_parameter_and_updates_the_centres(built):
    method, sampler = built
    _, batch = _batch(method, sampler, step=2)
    with torch.no_grad():
        method(batch)
        for p in method.parameters():  # a fake optimiser step: the student moves away from the teacher
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    centre = method.global_centre.centre.clone()
    mu = method.momentum_at(2)
    assert 0.996 <= mu < 1.0
    method.after_step(2)
    for n, p in method.teacher.named_parameters():
        student = method.get_parameter(n)
        torch.testing.assert_close(p, mu * before[n] + (1 - mu) * student, rtol=1e-5, atol=1e-6)
    assert not torch.equal(method.global_centre.centre, centre)
    assert not method._pending


def test_short_pretraining_lowers_the_loss_without_collapse(cache, tmp_path):
    result = pretrain(cache, tmp_path / "run", _cfg(steps=60, log_every=10), progress=False)
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.9 * first, (first, last)
    assert rows[-1]["loss_rec"] < rows[0]["loss_rec"] and rows[-1]["loss_intra"] < rows[0]["loss_intra"]
    for r in rows:
        assert r["prototype_usage"] >= 2 / K and r["collapse_warning"] == 0.0
        assert r["teacher_entropy"] < 0.9 * math.log(K)  # not the uniform collapse either
        assert r["rejected_matches"] >= 0 and r["match_confidence"] >= 0.5
    assert sum(r["rejected_matches"] for r in rows) > 0  # the miner rejects (and the log counts) bad matches
    assert rows[-1]["teacher_temperature"] == pytest.approx(0.01)  # the sharp default teacher
    assert all(math.isfinite(r["loss_koleo"]) for r in rows)
    assert rows[-1]["momentum"] > rows[0]["momentum"] >= 0.996
    assert result.history[-1]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["method"] == "alice"
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert "global_centre.centre" in weights and any(k.startswith("teacher.backbone.encoder.") for k in weights)


def test_prototype_layers_stay_fixed_while_frozen(cache, tmp_path):
    cfg = _cfg(steps=2, alice={"freeze_last_layer_steps": 3, "head_lr_scale": 0.5})
    method, _, _ = build_pretraining(Cache(cache), cfg)  # the same seeded initialisation as the run
    groups = method.optimizer_groups()
    assert [g.get("frozen_steps", 0) for g in groups] == [0, 0, 3] and groups[2]["lr_scale"] == 0.5
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in method.parameters() if p.requires_grad)  # a partition
    init = {k: v.clone() for k, v in method.state_dict().items()}
    pretrain(cache, tmp_path / "run", cfg, progress=False)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    for key in ("global_head.head.last_layer.weight_v", "patch_head.last_layer.weight_v"):
        torch.testing.assert_close(weights[key], init[key], rtol=0, atol=0)
    for key in ("global_head.head.mlp.0.weight", "casa.norm1.weight"):
        assert not torch.equal(weights[key], init[key]), key


def test_collapse_monitor_warns_when_the_teacher_uses_one_prototype(cache, tmp_path):
    # without the batch standardisation the pooled instance-normed features of every crop are alike: the teacher
    # sends every crop to the same prototype and the monitor must say so
    cfg = _cfg(steps=12, log_every=2, alice={"global_batch_norm": False})
    with pytest.warns(UserWarning, match="prototype usage"):
        result = pretrain(cache, tmp_path / "run", cfg, progress=False)
    assert result.history[-1]["collapse_warning"] == 1.0
    assert result.history[-1]["prototype_usage"] < 2 / K
    # the other failure, a uniform teacher: an entropy ceiling below the run's entropy must be reported as such
    cfg = _cfg(steps=12, log_every=2, alice={"entropy_ceiling": 0.1, "teacher_temperature": 0.07,
                                             "teacher_temperature_end": 0.07})
    with pytest.warns(UserWarning, match="uniform for every crop"):
        result = pretrain(cache, tmp_path / "run2", cfg, progress=False)
    assert result.history[-1]["collapse_warning"] == 1.0 and result.history[0]["collapse_warning"] == 0.0


def test_resume_repeats_an_uninterrupted_run_exactly(cache, tmp_path):
    cfg = {"steps": 12, "log_every": 2, "checkpoint_every": 4}
    pretrain(cache, tmp_path / "full", _cfg(**cfg), progress=False)
    pretrain_interrupted(cache, tmp_path / "cut", _cfg(**cfg), at_step=10)
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["step"] == 8
    pretrain(cache, tmp_path / "cut", resume=True, progress=False)
    a = read_log(tmp_path / "full" / "log.csv")
    b = read_log(tmp_path / "cut" / "log.csv")
    assert [r["step"] for r in b] == [2, 4, 6, 8, 10, 12]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_inter", "loss_intra", "loss_rec", "teacher_entropy", "prototype_usage",
                    "rejected_matches"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # student, teacher and both centres
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_gather_the_teacher_rows(cache, tmp_path):
    """The README's multi-GPU line runs Alice with gloo on CPU; the usage figure counts both ranks' teacher rows."""
    import yaml

    pairs = 2
    (tmp_path / "alice.yaml").write_text(yaml.safe_dump({"alice": {**SMALL["alice"], "pairs_per_batch": pairs},
                                                         "log_every": 1}))
    proc = torchrun_pretrain(cache, tmp_path / "run", "--preset", "cpu-tiny", "--method", "alice",
                             "--config", str(tmp_path / "alice.yaml"), "--crop", "16", "--crop", "16", "--crop", "16",
                             "--steps", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("pretrained 4 steps") == 1  # one summary line, from rank 0
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # each rank has 2 x pairs teacher rows (Q and K); one rank alone could reach at most 2 * pairs / K
    usage = [r["prototype_usage"] for r in rows]
    assert max(usage) > 2 * pairs / K and max(usage) <= 2 * 2 * pairs / K
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert torch.isfinite(weights["global_centre.centre"]).all()
    assert json.loads((tmp_path / "run" / "model.json").read_text())["method"] == "alice"


def test_swin_unetr_runs_two_steps(tmp_path):
    from volcontrast.data.prepare import PrepareSettings, prepare_dataset

    from helpers import write_nnunet

    raw = write_nnunet(tmp_path / "raw", n=2, shape=(36, 36, 40))
    prepare_dataset(raw, tmp_path / "cache", PrepareSettings(spacing=(1.0, 1.0, 1.0)), workers=1, progress=False)
    # SwinUNETR: sizes multiples of 32 and, in training, one axis >= 64; one pair of the two scans per step
    cfg = _cfg(steps=2, log_every=1, model={"backbone": "swin_unetr", "preset": "tiny"},
               data={"crop_size": [32, 32, 64]}, alice={"pairs_per_batch": 1, "mask_block": [8, 8]})
    result = pretrain(tmp_path / "cache", tmp_path / "run", cfg, progress=False)
    assert len(result.history) == 2
    assert all(math.isfinite(r[k]) for r in result.history for k in ("loss", "loss_inter", "loss_intra", "loss_rec"))
    assert json.loads((tmp_path / "run" / "model.json").read_text())["architecture"]["name"] == "swin_unetr"


def test_global_head_pools_the_deepest_stages_and_checks_its_widths():
    g = torch.Generator().manual_seed(0)
    skips = [torch.randn(5, c, s, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]
    head = GlobalHead([4, 6, 8], DINOHead(14, 16, 32, 8), batch_norm=False, stages=2)
    pooled = head.pooled(skips)
    torch.testing.assert_close(pooled, torch.cat([skips[1].mean((2, 3, 4)), skips[2].mean((2, 3, 4))], dim=1))
    z = head.embed(skips)
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(head(skips), head.head(pooled))
    # batch standardisation of every pooled channel: (x - batch mean) / sqrt(biased batch variance + 1e-5)
    bn = GlobalHead([4, 6, 8], DINOHead(18, 16, 32, 8), batch_norm=True, stages=3)
    x = bn.pooled(skips)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(bn.norm(x), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="stages must be in 1..3"):
        GlobalHead([4, 6, 8], DINOHead(8, 16, 32, 8), stages=4)
    with pytest.raises(ValueError, match="the head takes 8 features, the last 2 stages give 14"):
        GlobalHead([4, 6, 8], DINOHead(8, 16, 32, 8), stages=2)


def test_bad_configs_are_input_errors(cache):
    with pytest.raises(InputError, match=r"alice.mask_block.*smaller than the crop"):
        _cfg(alice={"mask_block": [16, 16]})
    with pytest.raises(InputError, match="3D crops only"):
        _cfg(dim=2, data={"crop_size": [16, 16]})
    with pytest.raises(InputError, match="mask_ratio"):
        _cfg(alice={"mask_ratio": 1.0})
    with pytest.raises(InputError, match="momentum"):
        _cfg(alice={"momentum": 0.999, "momentum_end": 0.99})
    with pytest.raises(InputError, match="decoder_stage"):
        build_pretraining(Cache(cache), _cfg(alice={"decoder_stage": 3}))
    with pytest.raises(InputError, match="alice.koleo_weight"):
        _cfg(alice={"koleo_weight": -0.1})
    with pytest.raises(InputError, match="alice.global_stages"):
        _cfg(alice={"global_stages": -1})
    with pytest.raises(InputError, match=r"alice.global_stages.*encoder stages"):
        build_pretraining(Cache(cache), _cfg(alice={"global_stages": 9}))
    paper = resolve_pretrain_config("alice-paper")
    assert paper.alice.global_stages == 1 and paper.alice.koleo_weight == 0.0
    assert paper.method == "alice" and paper.alice.teacher_temperature == 0.008
    assert paper.alice.teacher_temperature_end == 0.01 and not paper.alice.rec_masked_only
