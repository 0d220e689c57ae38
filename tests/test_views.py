from __future__ import annotations

import numpy as np
import pytest
import torch

from volcontrast.data.cache import open_cache
from volcontrast.views import (
    AugmentConfig,
    BoxSampler,
    BoxSamplerConfig,
    CaseTable,
    augment,
    box_size_for,
    cut_box,
    view_geometry,
)


def test_cut_box_pads_outside():
    a = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    box = cut_box(a, np.array([-1, 2, 3]), (3, 4, 4), pad_value=-7.0)
    assert box.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(box[:, 1:, :3, :3], a[:, 0:2, 2:5, 3:6])
    assert (box[:, 0] == -7).all() and (box[:, :, 3] == -7).all() and (box[:, :, :, 3] == -7).all()


def test_sampler_is_a_function_of_the_step(phantom_cache):
    cache = open_cache(phantom_cache)
    cfg = BoxSamplerConfig(crop_size=(8, 8, 8), box_size=(12, 12, 12), volumes_per_batch=2, crops_per_volume=3)
    s = BoxSampler(phantom_cache, cache.ids, cfg, seed=3, steps=10)
    a, b, c = s[4], s[4], s[5]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["boxes"], c["boxes"])
    assert a["boxes"].shape == (6, 1, 12, 12, 12)
    # the unaugmented crop inside the box is exactly the cached array there
    for i in range(6):
        cid = cache.ids[a["case_index"][i]]
        lo = a["crop_lower"][i]
        inner = a["boxes"][i][:, 2:10, 2:10, 2:10]
        np.testing.assert_array_equal(inner, cache.image(cid)[:, lo[0]:lo[0] + 8, lo[1]:lo[1] + 8, lo[2]:lo[2] + 8])
    # another rank draws other data
    other = BoxSampler(phantom_cache, cache.ids, cfg, seed=3, rank=1, steps=10)[4]
    assert not np.array_equal(other["boxes"], a["boxes"])


def test_sampler_rejects_case_smaller_than_crop(phantom_cache):
    cache = open_cache(phantom_cache)
    cfg = BoxSamplerConfig(crop_size=(64, 8, 8), box_size=(64, 8, 8))
    from volcontrast.errors import InputError

    with pytest.raises(InputError, match=r"image.npy: case .* smaller than the requested crop \(64, 8, 8\)"):
        BoxSampler(phantom_cache, cache.ids, cfg)


def test_identity_and_flip_views_are_exact():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.randn(4, 2, 10, 10, 10)
    out = augment(boxes, (6, 6, 6), AugmentConfig.none(), gen)
    torch.testing.assert_close(out.views, boxes[:, :, 2:8, 2:8, 2:8], atol=1e-5, rtol=0)
    flip = AugmentConfig.none()
    flip.flip_prob = 1.0
    out = augment(boxes, (6, 6, 6), flip, gen)
    torch.testing.assert_close(out.views, boxes[:, :, 2:8, 2:8, 2:8].flip(2, 3, 4), atol=1e-5, rtol=0)
    assert out.params["flip"].all()


@pytest.mark.parametrize("dim", [2, 3])
def test_recorded_transform_matches_resampling(dim):
    """Views of a box whose channels hold its own voxel coordinates agree with the recorded voxel map."""
    box = (16,) * dim
    crop = (8,) * dim
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in box], indexing="ij"))
    boxes = coords[None].repeat(6, 1, *([1] * dim))
    cfg = AugmentConfig(rotation_deg=25.0, scale_range=(0.8, 1.2), brightness_prob=0, contrast_prob=0,
                        gamma_prob=0, noise_prob=0, blur_prob=0)
    out = augment(boxes, crop, cfg, torch.Generator().manual_seed(1))
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in crop], indexing="ij"), -1)
    m = out.voxel_to_box
    expected = grid.reshape(-1, dim) @ m[:, :dim, :dim].transpose(1, 2) + m[:, None, :dim, dim]
    got = out.views.double().reshape(6, dim, -1).transpose(1, 2)
    inside = ((expected >= 0) & (expected <= 15)).all(-1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(got[inside], expected[inside], atol=1e-3, rtol=0)
    assert not torch.allclose(m[:, :dim, :dim], torch.eye(dim, dtype=torch.float64))  # something happened


def test_geometry_world_centre_and_positions(phantom_cache):
    cache = open_cache(phantom_cache)
    table = CaseTable.from_cache(cache, cache.ids)
    cfg = BoxSamplerConfig(crop_size=(8, 8, 8), box_size=box_size_for((8, 8, 8), 1.5), volumes_per_batch=4,
                           crops_per_volume=2)
    batch = BoxSampler(phantom_cache, cache.ids, cfg, seed=0, steps=1)[0]
    out = augment(torch.from_numpy(batch["boxes"]), (8, 8, 8), AugmentConfig.none(), torch.Generator())
    g = view_geometry(torch.from_numpy(batch["case_index"]), torch.from_numpy(batch["box_lower"]),
                      out.voxel_to_box, (8, 8, 8), table)
    for i in range(len(g.case_index)):
        meta = cache.meta(cache.ids[int(g.case_index[i])])
        centre_cached = batch["crop_lower"][i] + 3.5
        np.testing.assert_allclose(g.world_centre[i].numpy(), (meta.affine @ np.r_[centre_cached, 1])[:3], atol=1e-9)
        lo = np.array([b[0] for b in meta.body_bbox])
        hi = np.array([b[1] for b in meta.body_bbox])
        np.testing.assert_allclose(g.body_centre[i].numpy(), (centre_cached + 0.5 - lo) / (hi - lo), atol=1e-9)
        full = centre_cached + np.array(meta.crop_offset)
        np.testing.assert_allclose(g.index_position[i].numpy(), (full + 0.5) / np.array(meta.resampled_shape))
    # body and index positions differ when the body box does not fill the resampled volume
    assert not torch.allclose(g.positions("body"), g.positions("index"))


def test_slice_views_geometry(phantom_cache):
    cache = open_cache(phantom_cache)
    table = CaseTable.from_cache(cache, cache.ids)
    cfg = BoxSamplerConfig(crop_size=(8, 8), box_size=(12, 12), volumes_per_batch=2, crops_per_volume=3, dim=2)
    batch = BoxSampler(phantom_cache, cache.ids, cfg, seed=0, steps=1)[0]
    assert batch["boxes"].shape == (6, 1, 12, 12)
    out = augment(torch.from_numpy(batch["boxes"]), (8, 8), AugmentConfig.pcl_paper(), torch.Generator().manual_seed(0))
    assert out.views.shape == (6, 1, 8, 8) and out.voxel_to_box.shape == (6, 3, 3)
    g = view_geometry(torch.from_numpy(batch["case_index"]), torch.from_numpy(batch["box_lower"]),
                      out.voxel_to_box, (8, 8), table)
    z = batch["box_lower"][:, 2]
    off = table.crop_offset[g.case_index, 2].numpy()
    n = table.resampled_shape[g.case_index, 2].numpy()
    np.testing.assert_allclose(g.index_position[:, 2].numpy(), (z + off + 1) / n)  # paper's (i + 1) / n
    np.testing.assert_allclose(g.voxel_to_cached[:, 2, 3].numpy(), z)


NO_OTHER_INTENSITY = {"brightness_prob": 0.0, "contrast_prob": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0,
                      "blur_prob": 0.0}


def test_remap_curve_equals_numpy_interp_per_view():
    from volcontrast.views.augment import apply_curves, remap_curves

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 6, 7, 8, generator=gen) * 3 + 1
    curves, fired = remap_curves(5, AugmentConfig(remap_prob=1.0, remap_points=3), gen)
    assert bool(fired.all())
    assert curves.shape == (5, 5)
    y = apply_curves(x, curves)
    for n in range(5):
        v = x[n].double().numpy().ravel()
        lo, hi = v.min(), v.max()
        want = lo + np.interp((v - lo) / (hi - lo), np.linspace(0, 1, 5), curves[n].numpy()) * (hi - lo)
        np.testing.assert_allclose(y[n].double().numpy().ravel(), want, rtol=0, atol=1e-4)
    # the identity curve gives the input back, and a tent curve maps min and max to min, the middle to max
    x1 = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(apply_curves(x1, torch.linspace(0, 1, 4, dtype=torch.float64)[None]), x1, atol=1e-6)
    tent = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert apply_curves(x1, tent).tolist() == [[0.0, 2.0, 4.0, 2.0, 0.0]]


def test_monotone_remap_keeps_the_intensity_order_and_range():
    from volcontrast.views.augment import intensity_augment

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 5, 5, 5, generator=gen)
    y, params = intensity_augment(x.clone(), AugmentConfig(remap_prob=1.0, remap_points=5, remap_monotone=True,
                                                           **NO_OTHER_INTENSITY), gen)
    assert params["remap"].shape == (8, 7)
    for n in range(8):
        order = torch.argsort(x[n].ravel())
        assert bool((y[n].ravel()[order].diff() >= -1e-6).all())
        assert y[n].min() >= x[n].min() - 1e-6 and y[n].max() <= x[n].max() + 1e-6


def test_remap_changes_exactly_the_views_it_fires_on():
    from volcontrast.views.augment import intensity_augment

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 4, 4, 4, generator=gen)
    y, params = intensity_augment(x.clone(), AugmentConfig(remap_prob=0.5, **NO_OTHER_INTENSITY), gen)
    fired = (params["remap"] != torch.linspace(0, 1, 6, dtype=torch.float64)).any(dim=1)
    assert 0 < int(fired.sum()) < 64
    assert torch.equal(y[~fired], x[~fired])
    assert bool(((y[fired] - x[fired]).abs().amax(dim=(1, 2, 3, 4)) > 1e-3).all())


def test_remap_off_keeps_the_random_stream():
    from volcontrast.views.augment import intensity_augment

    x = torch.rand(6, 1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    _, p = intensity_augment(x.clone(), AugmentConfig(remap_points=9, remap_monotone=True),
                             torch.Generator().manual_seed(5))
    assert "remap" not in p
    # the first draws are still contrast's, as before remap existed: fires (6 uniforms), then values (6 uniforms)
    g = torch.Generator().manual_seed(5)
    fires = torch.rand(6, generator=g, dtype=torch.float64) < 0.5
    values = 0.75 + 0.5 * torch.rand(6, generator=g, dtype=torch.float64)
    assert torch.equal(p["contrast"], torch.where(fires, values, torch.ones(6, dtype=torch.float64)))
