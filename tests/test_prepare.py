from __future__ import annotations

import json
import os

import numpy as np
import pytest

from volcontrast.data import prepare as prepare_mod
from volcontrast.data.cache import open_cache
from volcontrast.data.prepare import PrepareSettings, prepare_dataset
from volcontrast.data.preprocess import resample_grid, resample_label
from volcontrast.errors import InputError
from volcontrast.io import load_volume, orientation_affine, save_volume

from helpers import phantom, write_nnunet


def _world(affine, ijk):
    return (np.asarray(affine) @ np.r_[np.asarray(ijk, float), 1.0])[:3]


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PSL"])
def test_marker_keeps_world_position_through_prepare(tmp_path, codes):
    image, _, affine = phantom(modality="mr")
    marker = (9, 8, 7)
    image[marker] = 3000.0  # inside the body
    root = tmp_path / "raw"
    (root / "imagesTr").mkdir(parents=True)
    save_volume(root / "imagesTr" / "m.nii.gz", image, affine, like=orientation_affine(codes))
    # MR scheme (z-score, no clipping) so the marker stays the unique maximum; a plain folder of scans
    cache = tmp_path / "cache"
    prepare_dataset(root / "imagesTr", cache, PrepareSettings(modality="mr"), workers=1, progress=False)
    c = open_cache(cache)
    (cid,) = c.ids
    arr = c.image(cid)[0]
    ijk = np.unravel_index(np.argmax(arr), arr.shape)
    np.testing.assert_allclose(_world(c.meta(cid).affine, ijk), _world(affine, marker), atol=1e-6)
    # resampled to a finer grid: the marker's world position moves by less than half a new voxel
    cache2 = tmp_path / "cache2"
    prepare_dataset(root / "imagesTr", cache2, PrepareSettings(modality="mr", spacing=(1.0, 1.5, 1.2)),
                    workers=1, progress=False)
    c2 = open_cache(cache2)
    arr2 = c2.image(cid)[0]
    ijk2 = np.unravel_index(np.argmax(arr2), arr2.shape)
    err = np.abs(_world(c2.meta(cid).affine, ijk2) - _world(affine, marker))
    assert np.all(err <= np.array([1.0, 1.5, 1.2]) / 2 + 1e-6), err


def test_resample_grid_preserves_world_and_label_centroid(rng):
    affine = np.diag([0.8, 1.1, 2.7, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 10.0]
    shape = (40, 36, 20)
    grid = resample_grid(shape, affine, (1.3, 0.9, 1.5))
    # any new voxel maps to the old voxel with the same world position
    for new in rng.uniform(0, 1, size=(5, 3)) * np.array(grid.shape):
        old = (grid.index_map @ np.r_[new, 1.0])[:3]
        np.testing.assert_allclose(_world(grid.affine, new), _world(affine, old), atol=1e-9)
    np.testing.assert_allclose(np.sqrt((grid.affine[:3, :3] ** 2).sum(0)), (1.3, 0.9, 1.5))
    # a label sphere keeps its world centroid within half a new voxel
    centre_w = _world(affine, (20.3, 17.6, 9.4))
    idx = np.indices(shape).reshape(3, -1).T
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    label = (np.linalg.norm(world - centre_w, axis=1) < 9.0).reshape(shape).astype(np.uint8)
    for mode in ("linear", "nearest"):
        out = resample_label(label, grid, mode)
        pts = np.argwhere(out == 1)
        centroid = _world(grid.affine, pts.mean(0))
        assert np.all(np.abs(centroid - centre_w) <= np.array([1.3, 0.9, 1.5]) / 2), (mode, centroid - centre_w)


def test_ct_statistics_and_normalisation(tmp_path):
    root = write_nnunet(tmp_path / "raw", n=3)
    prepare_dataset(root, tmp_path / "cache", workers=1, progress=False)
    c = open_cache(tmp_path / "cache")
    stats = c.manifest["ct_stats"]
    fg = []
    for i in range(3):
        img = load_volume(root / "imagesTr" / f"case{i:02d}_0000.nii.gz").array
        lab = load_volume(root / "labelsTr" / f"case{i:02d}.nii.gz", label=True).array
        fg.append(img[lab > 0])
    fg = np.concatenate(fg)  # fewer voxels than the per-case sample cap: all foreground voxels are used
    lo, hi = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(fg, lo, hi)
    assert stats["clip_low"] == pytest.approx(lo, rel=1e-5)
    assert stats["clip_high"] == pytest.approx(hi, rel=1e-5)
    assert stats["mean"] == pytest.approx(clipped.mean(), rel=1e-4)
    assert stats["std"] == pytest.approx(clipped.std(), rel=1e-4)
    # all cases share the target spacing, so no resampling: cached = (clip(raw) - mean) / std exactly
    raw = load_volume(root / "imagesTr" / "case00_0000.nii.gz")
    m = c.meta("case00")
    x0, y0, z0 = m.crop_offset
    X, Y, Z = m.shape
    expected = (np.clip(raw.array[x0:x0 + X, y0:y0 + Y, z0:z0 + Z], lo, hi) - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(c.image("case00")[0], expected, atol=1e-3)
    label = load_volume(root / "labelsTr" / "case00.nii.gz", label=True).array
    np.testing.assert_array_equal(c.label("case00"), label[x0:x0 + X, y0:y0 + Y, z0:z0 + Z])


def test_mr_per_volume_zscore_over_body(tmp_path):
    root = write_nnunet(tmp_path / "raw", n=2, modality="mr")
    prepare_dataset(root, tmp_path / "cache", workers=1, progress=False)
    c = open_cache(tmp_path / "cache")
    assert c.modality == "mr"
    assert c.manifest["fingerprint"]["channels"] == [{"name": "T1", "modality": "mr",
                                                      "why": "dataset.json channel_names"}]
    assert c.manifest["resolved"]["ct_stats"] is None and "channel_ct_stats" not in c.manifest["resolved"]
    for cid in c.ids:
        body = c.body(cid).astype(bool)
        vals = c.image(cid)[0][body]
        assert abs(vals.mean()) < 1e-4 and vals.std() == pytest.approx(1.0, abs=1e-4)
        assert 0.2 < body.mean() < 1.0  # Otsu found a body, not the whole box


def test_resume_skips_unchanged_and_redoes_changed(tmp_path):
    root = write_nnunet(tmp_path / "raw", n=3, spacings=[(2, 2, 3)] * 3)
    cache = tmp_path / "cache"
    first = prepare_dataset(root, cache, workers=1, progress=False)
    assert sorted(first.prepared) == ["case00", "case01", "case02"]
    before = (cache / "cases" / "case00" / "image.npy").stat().st_mtime_ns
    again = prepare_dataset(root, cache, workers=1, progress=False)
    assert again.prepared == [] and sorted(again.reused) == ["case00", "case01", "case02"]
    assert (cache / "cases" / "case00" / "image.npy").stat().st_mtime_ns == before
    # a changed image file is redone ... (its intensities change the CT statistics -> all cases redone)
    p = root / "labelsTr" / "case01.nii.gz"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    third = prepare_dataset(root, cache, PrepareSettings(ct_foreground="body"), workers=1, progress=False)
    assert sorted(third.prepared) == ["case00", "case01", "case02"]  # settings changed
    fourth = prepare_dataset(root, cache, PrepareSettings(ct_foreground="body"), workers=1, progress=False)
    assert fourth.prepared == []
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # label only: body stats unchanged
    fifth = prepare_dataset(root, cache, PrepareSettings(ct_foreground="body"), workers=1, progress=False)
    assert fifth.prepared == ["case01"]


def test_parallel_equals_serial(tmp_path):
    root = write_nnunet(tmp_path / "raw", n=3, spacings=[(2, 2, 3), (1.5, 2.5, 2), (2.2, 2, 3.5)])
    prepare_dataset(root, tmp_path / "a", workers=1, progress=False)
    prepare_dataset(root, tmp_path / "b", workers=2, progress=False)
    for cid in ("case00", "case01", "case02"):
        for name in ("image.npy", "label.npy", "body.npy"):
            a, b = (tmp_path / side / "cases" / cid / name for side in ("a", "b"))
            assert a.read_bytes() == b.read_bytes()


def test_interrupted_prepare_leaves_no_broken_case(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path / "raw", n=3)
    cache = tmp_path / "cache"
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(path, arr, *a, **k):
        calls["n"] += str(path).endswith("body.npy")
        if calls["n"] == 2:  # in the middle of the second case
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(prepare_mod.np, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(root, cache, workers=1, progress=False)
    monkeypatch.setattr(prepare_mod.np, "save", real_save)
    for d in (cache / "cases").iterdir():
        if not d.name.startswith("."):
            assert (d / "meta.json").exists() and (d / "image.npy").exists(), d
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["cases"]) >= 1
    c = open_cache(cache)
    for cid in c.ids:
        assert c.image(cid).shape[0] == 1
    done_before = set(manifest["cases"])
    report = prepare_dataset(root, cache, workers=1, progress=False)
    assert set(report.reused) == done_before and len(report.reused) + len(report.prepared) == 3
    assert not list((cache / "cases").glob(".tmp-*"))


def test_crop_larger_than_case_is_an_error(tmp_path):
    root = write_nnunet(tmp_path / "raw", n=1)
    prepare_dataset(root, tmp_path / "cache", workers=1, progress=False)
    c = open_cache(tmp_path / "cache")
    c.check_min_size((8, 8, 8))
    msg = r"cases/case00/image.npy: case case00 has shape .* smaller than the requested crop \(64, 64, 64\)"
    with pytest.raises(InputError, match=msg):
        c.check_min_size((64, 64, 64))


def test_same_data_in_another_folder_gives_the_same_cache(tmp_path):
    import shutil

    root = write_nnunet(tmp_path / "a" / "raw", n=2, shape=(40, 38, 36))
    shutil.copytree(root, tmp_path / "b" / "raw")
    settings = PrepareSettings(stats_samples_per_case=500)  # fewer samples than voxels: a random draw
    prepare_dataset(root, tmp_path / "a" / "cache", settings, workers=1, progress=False)
    prepare_dataset(tmp_path / "b" / "raw", tmp_path / "b" / "cache", settings, workers=1, progress=False)
    a = json.loads((tmp_path / "a" / "cache" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "cache" / "manifest.json").read_text())
    assert a["ct_stats"] == b["ct_stats"]
    for cid in ("case00", "case01"):
        assert (tmp_path / "a" / "cache" / "cases" / cid / "image.npy").read_bytes() == \
            (tmp_path / "b" / "cache" / "cases" / cid / "image.npy").read_bytes()
