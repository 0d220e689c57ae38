"""MAE: block masks with an exact ratio, a loss that ignores unmasked voxels, prepare() masks what the network
sees, the sparse option re-masks every encoder stage, a short run lowers the loss, the collapse monitor, and
config errors."""

from __future__ import annotations

import math

import pytest
import torch

from volcontrast.data.cache import Cache
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import build_pretraining, pretrain
from volcontrast.engine.run import read_log
from volcontrast.errors import InputError
from volcontrast.methods.monitors import SignalBound
from volcontrast.views.masking import block_mask, masked_mse

SMALL = {"method": "mae", "data": {"crop_size": [16, 16, 16], "workers": 0}, "probe_crops": 0, "log_every": 5,
         "checkpoint_every": 1000, "mae": {"mask_block": [4, 4, 4]}}


def _cfg(**kw):
    return resolve_pretrain_config("cpu-tiny", SMALL, kw)


@pytest.fixture(scope="module")
def cache(synth_cache):
    return synth_cache[1]


@pytest.mark.parametrize(("shape", "block", "ratio"), [((32, 32, 32), 16, 0.75), ((16, 16, 16), 4, 0.75),
                                                       ((24, 16, 8), (8, 4, 4), 0.6), ((16, 12), 4, 0.5)])
def test_block_mask_ratio_is_exact_and_masks_whole_blocks(shape, block, ratio):
    m = block_mask(5, shape, ratio, block, torch.Generator().manual_seed(3))
    sizes = (block,) * len(shape) if isinstance(block, int) else block
    n_blocks = math.prod(s // b for s, b in zip(shape, sizes))
    n_masked = math.floor(ratio * n_blocks + 0.5)
    assert m.shape == (5, *shape) and m.dtype == torch.bool
    assert all(int(m[i].sum()) == n_masked * math.prod(sizes) for i in range(5))  # exactly n_masked whole blocks
    # constant inside each block: block-pooling (min == max) loses nothing
    f = m.float().unsqueeze(1)
    pool = torch.nn.functional.max_pool3d if len(shape) == 3 else torch.nn.functional.max_pool2d
    hi, lo = pool(f, sizes), -pool(-f, sizes)
    assert torch.equal(hi, lo)
    assert not torch.equal(m[0], m[1])  # independent draws per sample
    again = block_mask(5, shape, ratio, block, torch.Generator().manual_seed(3))
    assert torch.equal(m, again)


def test_loss_ignores_unmasked_voxels():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 1, 8, 8, 8, generator=g)
    pred = torch.randn(2, 1, 8, 8, 8, generator=g)
    mask = block_mask(2, (8, 8, 8), 0.75, 4, g)
    loss = masked_mse(pred, target, mask)
    changed = torch.where(mask.unsqueeze(1), pred, pred + 100.0)  # only visible voxels change
    assert masked_mse(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    direct = ((pred - target) ** 2)[mask.unsqueeze(1)].mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)


def test_prepare_masks_what_the_network_sees_and_the_loss_uses_the_masked_voxels(cache):
    method, sampler, _ = build_pretraining(Cache(cache), _cfg(steps=2))
    raw = {k: torch.as_tensor(v) for k, v in sampler[0].items()}
    with torch.no_grad():
        batch = method.prepare(raw, 0, torch.Generator().manual_seed(0), torch.device("cpu"))
    views, mask, masked = batch["views"], batch["mask"], batch["masked"]
    assert mask.float().mean().item() == 0.75  # 64 blocks of 4³, 48 masked, per sample
    m = mask.unsqueeze(1)
    assert torch.equal(masked[m], torch.zeros_like(masked[m])) and torch.equal(masked[~m], views[~m])
    loss, logs = method(batch)
    with torch.no_grad():
        pred = method.reconstruct(masked, mask)
    assert loss.item() == pytest.approx(masked_mse(pred, views, mask).item(), rel=1e-5)
    assert logs["masked_fraction"].item() == 0.75


def test_sparse_option_re_masks_every_encoder_stage(cache):
    method, sampler, _ = build_pretraining(Cache(cache), _cfg(steps=2, mae={"mask_block": [8, 8, 8], "sparse": True}))
    raw = {k: torch.as_tensor(v) for k, v in sampler[0].items()}
    with torch.no_grad():
        batch = method.prepare(raw, 0, torch.Generator().manual_seed(0), torch.device("cpu"))
        seen = []
        hooks = [stage.register_forward_hook(lambda mod, i, o: seen.append(o)) for stage in
                 method.backbone.encoder.stages]
        method.reconstruct(batch["masked"], batch["mask"])
        for h in hooks:
            h.remove()
    mask = batch["mask"].unsqueeze(1).float()
    assert len(seen) == len(method.backbone.encoder.stages)
    for out in seen[:2]:  # stages at 16³ and 8³ resolve the 8³ blocks: masked positions are exactly 0
        m = torch.nn.functional.interpolate(mask, size=tuple(out.shape[2:]), mode="nearest").bool()
        assert torch.equal(out[m.expand_as(out)], torch.zeros_like(out[m.expand_as(out)]))
        assert out[~m.expand_as(out)].abs().sum() > 0
    assert method._keep is None  # only during the masked forward: the probe and fine-tuning see dense features


def test_sparse_needs_a_cnn_encoder(tmp_path):
    from volcontrast.data.prepare import PrepareSettings, prepare_dataset

    from helpers import write_nnunet

    raw = write_nnunet(tmp_path / "raw", n=2, shape=(36, 36, 40))
    prepare_dataset(raw, tmp_path / "cache", PrepareSettings(spacing=(1.0, 1.0, 1.0)), workers=1, progress=False)
    cfg = _cfg(steps=2, model={"backbone": "swin_unetr", "preset": "tiny"}, data={"crop_size": [32, 32, 64]},
               mae={"mask_block": [8, 8, 8], "sparse": True})
    with pytest.raises(InputError, match=r"^mae\.sparse: needs a CNN encoder with stages"):
        build_pretraining(Cache(tmp_path / "cache"), cfg)
    cfg = _cfg(steps=2, log_every=1, model={"backbone": "swin_unetr", "preset": "tiny"},
               data={"crop_size": [32, 32, 64]}, mae={"mask_block": [8, 8, 8]})
    result = pretrain(tmp_path / "cache", tmp_path / "run", cfg, progress=False)
    assert len(result.history) == 2 and all(math.isfinite(r["loss"]) for r in result.history)


def test_short_pretraining_lowers_the_loss(cache, tmp_path):
    pretrain(cache, tmp_path / "run", _cfg(steps=40, log_every=5), progress=False)
    rows = read_log(tmp_path / "run" / "log.csv")
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    assert all(r["masked_fraction"] == 0.75 for r in rows)
    assert all(r["collapse_warning"] == 0.0 for r in rows) and rows[-1]["pred_spread"] > 0.05


def test_collapse_monitor_flags_a_constant_reconstruction_after_patience_rows():
    monitor = SignalBound(column="pred_spread", bound=0.01, above=False, message="constant")
    flags = [monitor.update({"pred_spread": v}, True, 3) for v in (0.5, 0.005, 0.004, 0.003, 0.002)]
    assert [f for f, _ in flags] == [False, False, False, True, True]
    assert [m for _, m in flags] == [None, None, None, "constant (pred_spread 0.0030 <= 0.01)", None]
    assert monitor.update({"pred_spread": 0.004}, False, 3) == (False, None)  # not judged yet: counting restarts


@pytest.mark.parametrize(("override", "message"), [
    ({"mae": {"mask_ratio": 1.0}}, "mae.mask_ratio: must be in (0, 1), got 1.0"),
    ({"mae": {"mask_block": [16, 16, 16]}},
     "mae.mask_block: block [16, 16, 16] cuts the crop [16, 16, 16] into 1 blocks, of which 1 would be masked; use "
     "smaller blocks (e.g. `mae: {mask_block: [4, 4, 4]}`)"),
    ({"mae": {"mask_block": [4, 4]}}, "mae.mask_block: needs 3 sizes >= 1 (one per crop axis), got [4, 4]"),
])
def test_bad_configs_are_input_errors(override, message):
    with pytest.raises(InputError) as exc:
        _cfg(**override)
    assert str(exc.value) == message
