"""Spade (methods/spade.py): the overlap warp, the debiasing masks, the local positives and a short training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from volcontrast.config import to_dict
from volcontrast.data.cache import Cache
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import build_pretraining, pretrain
from volcontrast.engine.run import read_log
from volcontrast.losses.distill import cosine_schedule
from volcontrast.losses.info_nce import info_nce
from volcontrast.methods.spade import spade_global_masks
from volcontrast.spatial.masks import friend_enemy_masks, simclr_positive_mask, view_item_ids
from volcontrast.views.augment import AugmentConfig, augment
from volcontrast.views.overlap import overlap_points, pair_shifts, sample_at

from helpers import pretrain_interrupted, torchrun_pretrain

NO_INTENSITY = {"brightness_prob": 0.0, "contrast_prob": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0,
                "blur_prob": 0.0}


def _world_boxes(n: int, box: tuple[int, int, int], affine: torch.Tensor) -> torch.Tensor:
    """(n, 3, *box): every voxel holds its own world coordinate (mm) under ``affine``."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in box], indexing="ij"))
    world = torch.einsum("ij,j...->i...", affine[:3, :3], grid) + affine[:3, 3].view(3, 1, 1, 1)
    return world.float().expand(n, -1, -1, -1, -1).contiguous()


def test_warped_features_align_between_views_within_a_voxel():
    crop, box, n = (12, 12, 12), (26, 26, 26), 6
    spacing = torch.tensor([2.0, 1.5, 3.0], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.diag(spacing)
    affine[:3, 3] = torch.tensor([-40.0, 12.0, 300.0])
    cfg = AugmentConfig(rotation_deg=20.0, scale_range=(0.8, 1.25), **NO_INTENSITY)
    gen = torch.Generator().manual_seed(3)
    s1, s2 = pair_shifts(n, crop, 0.3, gen)
    assert float((s1 - s2).abs().max()) <= (1 - 0.3 ** (1 / 3)) * 12 + 1e-9
    boxes = _world_boxes(n, box, affine)
    out = augment(torch.cat([boxes, boxes]), crop, cfg, gen, shift=torch.cat([s1, s2]))
    assert bool(out.params["flip"].any()) and bool((out.params["rotation"] != 0).any())
    p1, p2, valid = overlap_points(out.voxel_to_box[:n], out.voxel_to_box[n:], crop, 64, gen)
    assert valid.float().mean() > 0.95
    inside = ((p2 >= 0) & (p2 <= 11)).all(-1)
    assert bool(inside[valid].all())
    voxel_mm = float(spacing.min())
    # full-resolution "decoder features" that encode world mm: the same anatomy in both views
    f1, f2 = sample_at(out.views[:n], p1, crop), sample_at(out.views[n:], p2, crop)
    err = (f1 - f2).norm(dim=-1)[valid]
    assert float(err.max()) < voxel_mm, float(err.max())
    # without the warp (the same view coordinates in both views) the features do not line up
    naive = (f1 - sample_at(out.views[n:], p1, crop)).norm(dim=-1)[valid]
    assert float(naive.mean()) > 3 * voxel_mm
    # a stride-2 decoder stage (cell centres) lines up too
    pooled = F.avg_pool3d(out.views, 2)
    g1, g2 = sample_at(pooled[:n], p1, crop), sample_at(pooled[n:], p2, crop)
    assert float((g1 - g2).norm(dim=-1)[valid].max()) < 2 * voxel_mm  # one voxel of the half-resolution map


def test_friend_enemy_masks_at_known_distances():
    d = torch.tensor([0.0, 0.02, 0.049, 0.05, 0.1, 0.199, 0.2, 0.5], dtype=torch.float64)
    keys = torch.stack([d, torch.zeros_like(d), torch.zeros_like(d)], 1)
    anchor = torch.zeros(1, 3, dtype=torch.float64)
    w, ex = friend_enemy_masks(anchor, keys, r_friend=0.05, r_enemy=0.2, sigma=0.025)
    expect_w = torch.where(d < 0.05, torch.exp(-(d**2) / (2 * 0.025**2)), torch.zeros_like(d)).float()
    torch.testing.assert_close(w[0], expect_w)
    assert ex[0].tolist() == [False, False, False, True, True, True, False, False]
    # sigma 0 -> r_friend / 2
    w2, _ = friend_enemy_masks(anchor, keys, 0.05, 0.2)
    torch.testing.assert_close(w2, w)
    # no radii: every key is a plain negative
    w0, ex0 = friend_enemy_masks(anchor, keys, 0.0, 0.0)
    assert not bool(w0.any()) and not bool(ex0.any())


def test_global_masks_keep_the_other_view_and_reduce_to_plain_infonce_without_radii():
    ids = view_item_ids(3)  # (6,) two views of 3 items
    ref = torch.tensor([[0.0, 0, 0], [0.03, 0, 0], [0.1, 0, 0]]).repeat(2, 1)
    q_ref = torch.tensor([[0.0, 0, 0.01], [0.3, 0, 0]])
    pos, ex, qw, qex = spade_global_masks(ids, ref, q_ref, 0.05, 0.2, 0.025)
    assert pos[0, 3] == 1.0 and not ex[0, 3]  # the other view: positive, never excluded
    assert 0 < pos[0, 1] < 1 and pos[0, 2] == 0 and ex[0, 2]  # friend at 0.03; 0.1 is in the excluded band
    assert 0 < qw[0, 0] < 1 and qw[0, 1] == 0 and not qex[0, 1]  # queue: friend, enemy
    pos0, ex0, qw0, qex0 = spade_global_masks(ids, ref, q_ref, 0.0, 0.0)
    assert torch.equal(pos0.bool(), simclr_positive_mask(ids)) and not ex0.any() and not qw0.any()
    assert not qex0.any()
    torch.manual_seed(0)
    z, k, q = torch.randn(6, 8), torch.randn(6, 8), torch.randn(2, 8)
    ours = info_nce(z, pos0, 0.2, exclude_mask=ex0, keys=k, queue=q, queue_positive_mask=qw0, queue_exclude_mask=qex0)
    plain = info_nce(z, simclr_positive_mask(ids), 0.2, keys=k, queue=q)
    torch.testing.assert_close(ours.loss, plain.loss)


def test_momentum_schedule_endpoints():
    assert cosine_schedule(0.99, 0.999, 0, 100) == pytest.approx(0.99)
    assert cosine_schedule(0.99, 0.999, 100, 100) == pytest.approx(0.999)
    assert cosine_schedule(0.99, 0.999, 50, 100) == pytest.approx(0.9945)


def _cfg(steps: int = 4, augment: dict | None = None, **spade) -> object:
    sp = {"global_queue": 16, "local_queue": 256, "local_points": 128}
    sp.update(spade)
    over = {"method": "spade", "steps": steps, "probe_crops": 0, "log_every": 2, "checkpoint_every": 4,
            "data": {"crop_size": [16, 16, 16], "workers": 0}, "spade": sp}
    if augment is not None:
        over["augment"] = augment
    return resolve_pretrain_config("cpu-tiny", None, over)


def _batch(method, sampler, step: int = 0):
    raw = {k: torch.as_tensor(v) for k, v in sampler[step].items()}
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        return method.prepare(raw, step, gen, torch.device("cpu"))


def test_global_loss_with_zero_radii_is_the_core_infonce_and_friends_count_with_debias(synth_cache):
    _, cache_dir = synth_cache
    cache = Cache(cache_dir)
    method, sampler, _ = build_pretraining(cache, _cfg(r_friend=0.0, r_enemy=0.0))
    batch = _batch(method, sampler)
    m2 = batch["views"].shape[0]
    # a queue whose keys sit exactly at the anchors' own crop centres
    method.global_queue.enqueue(F.normalize(torch.randn(m2, 128), dim=1), ref=batch["ref_centres"])
    with torch.no_grad():
        deep = method.backbone.encode(batch["views"])[-1]
        k_deep = method.momentum["backbone"].encode(batch["views"])[-1]
        loss, logs = method.global_loss(deep, k_deep, batch)
        z = method.global_head(deep)
        k = method.momentum["global_head"](k_deep)
    q_keys, _ = method.global_queue.get()
    plain = info_nce(z, simclr_positive_mask(batch["item_ids"]), 0.2, keys=k, queue=q_keys)
    torch.testing.assert_close(loss, plain.loss)
    assert logs["mean_positives"] == pytest.approx(1.0)
    # with the default radii the queue keys at distance 0 become friends
    method_d, sampler_d, _ = build_pretraining(cache, _cfg())
    batch_d = _batch(method_d, sampler_d)
    method_d.global_queue.enqueue(F.normalize(torch.randn(m2, 128), dim=1), ref=batch_d["ref_centres"])
    with torch.no_grad():
        skips = method_d.backbone.encode(batch_d["views"])
        _, logs_d = method_d.global_loss(skips[-1], method_d.momentum["backbone"].encode(batch_d["views"])[-1],
                                         batch_d)
    assert logs_d["mean_positives"] > 1.5  # the other view + its own queued twin (+ nearby crops)


def test_local_loss_with_identical_views_has_its_positives_on_the_diagonal(synth_cache):
    _, cache_dir = synth_cache
    method, sampler, _ = build_pretraining(Cache(cache_dir),
                                           _cfg(augment=to_dict(AugmentConfig.none()), min_overlap=1.0))
    batch = _batch(method, sampler)
    torch.testing.assert_close(batch["p1"], batch["p2"])
    m = batch["views"].shape[0] // 2
    torch.testing.assert_close(batch["views"][:m], batch["views"][m:])
    method.eval()
    with torch.no_grad():
        feat = method.backbone.decode(method.backbone.encode(batch["views"]))[-1]
        k_feat = method.momentum["backbone"].decode(method.momentum["backbone"].encode(batch["views"]))[-1]
        loss, logs = method.local_loss(feat, k_feat, batch)
        valid = batch["valid"]
        a = F.normalize(method.local_head(sample_at(feat[:m], batch["p1"], (16, 16, 16))[valid]), dim=1)
        b = F.normalize(method.momentum["local_head"](sample_at(k_feat[m:], batch["p2"], (16, 16, 16))[valid]), dim=1)
    sim = a @ b.T
    assert logs["local_pos_cosine"] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(sim.diagonal(), sim.max(dim=1).values)
    assert float(logs["local_neg_cosine"]) < 0.999
    assert torch.isfinite(loss)


def test_short_cpu_pretraining_lowers_each_loss_term(synth_cache, tmp_path):
    _, cache_dir = synth_cache
    cfg = _cfg(steps=120, augment=NO_INTENSITY, min_overlap=0.7, momentum=0.9, momentum_end=0.99)
    cfg.optim.lr = 3e-3
    cfg.log_every = 20
    result = pretrain(cache_dir, tmp_path / "run", cfg, progress=False)
    rows = result.history
    assert len(rows) == 6
    for term in ("loss_global", "loss_local", "loss_restore"):
        first = (rows[0][term] + rows[1][term]) / 2
        last = (rows[-1][term] + rows[-2][term]) / 2
        print(term, [round(r[term], 3) for r in rows])
        assert last < first, term
    assert rows[-1]["global_excluded"] > 0 and rows[-1]["embedding_spread"] > 0.05
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert int(weights["global_queue.filled"]) == 16  # full (8 views per step)
    assert any(k.startswith("momentum.backbone.encoder.") for k in weights)


def test_nodebias_resume_is_exact_and_has_no_friends(synth_cache, tmp_path):
    _, cache_dir = synth_cache
    cfg = _cfg(steps=8)
    cfg.method = "spade-nodebias"
    full = pretrain(cache_dir, tmp_path / "full", cfg, progress=False)
    assert all(r["global_excluded"] == 0 and r["mean_positives"] == 1.0 for r in full.history)
    pretrain_interrupted(cache_dir, tmp_path / "cut", cfg, at_step=6)
    pretrain(cache_dir, tmp_path / "cut", resume=True, progress=False)
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert wa.keys() == wb.keys() and "local_queue.keys" in wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_affine_provider_is_fitted_once_and_used_in_mm(synth_cache, tmp_path):
    _, cache_dir = synth_cache
    cfg = _cfg(steps=2, provider="affine")
    method, _, _ = build_pretraining(Cache(cache_dir), cfg)
    assert (method.r_friend, method.r_enemy) == (15.0, 60.0)
    stored = sorted(p.stem for p in (cache_dir / "correspondence" / "affine").glob("*.json"))
    assert "reference" in stored and len(stored) == len(Cache(cache_dir).ids) + 1
    result = pretrain(cache_dir, tmp_path / "run", cfg, progress=False)
    assert math.isfinite(result.last_loss)


def test_swin_unetr_backbone_runs_spade(tmp_path):
    from volcontrast.data.prepare import PrepareSettings, prepare_dataset

    from helpers import write_nnunet

    raw = write_nnunet(tmp_path / "raw", n=2, shape=(36, 36, 40))
    prepare_dataset(raw, tmp_path / "cache", PrepareSettings(spacing=(1.0, 1.0, 1.0)), workers=1, progress=False)
    cfg = _cfg(steps=2)
    cfg.model.backbone = "swin_unetr"
    cfg.data.crop_size = (32, 32, 64)
    cfg.data.volumes_per_batch, cfg.data.crops_per_volume = 1, 1
    cfg.spade.local_points = 16
    result = pretrain(tmp_path / "cache", tmp_path / "run", cfg, progress=False)
    assert math.isfinite(result.last_loss) and "loss_local" in result.history[-1]


@pytest.mark.slow
def test_torchrun_two_ranks_share_the_queues(synth_cache, tmp_path):
    """Both ranks' keys enter every rank's queue: after 4 steps the global queue holds 2 x 4 x 8 keys."""
    _, cache_dir = synth_cache
    proc = torchrun_pretrain(cache_dir, tmp_path / "run", "--preset", "cpu-tiny", "--method", "spade", "--no-debias",
                             "--crop", "16", "--crop", "16", "--crop", "16", "--steps", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "debias: false" in config
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert int(weights["global_queue.filled"]) == 2 * 4 * 8
    rows = read_log(tmp_path / "run" / "log.csv")
    assert rows[-1]["global_excluded"] == 0.0
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["method"] == "spade"
