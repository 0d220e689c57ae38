"""Correspondence providers (index / body / affine) and the landmark evaluation (spatial/correspondence.py,
spatial/registration.py, spatial/landmarks.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from volcontrast.data.cache import Cache, CaseMeta
from volcontrast.errors import InputError
from volcontrast.spatial.correspondence import get_provider, map_points, provider_names, voxel_to_world
from volcontrast.spatial.landmarks import correspond, landmark_error
from volcontrast.spatial.registration import AffineSettings, register_affine, sitk_image, world_box


def _meta(cid: str, box, shape=(14, 12, 30), crop_offset=(3, 6, 0), resampled_shape=(20, 24, 30)) -> CaseMeta:
    affine = np.diag([2.0, 2.5, 4.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, -300.0]
    return CaseMeta.from_json({"case_id": cid, "affine": affine.tolist(), "spacing": [2.0, 2.5, 4.0],
                               "shape": list(shape), "body_bbox": box, "crop_offset": list(crop_offset),
                               "resampled_shape": list(resampled_shape)})


@pytest.fixture
def fake_cache(tmp_path):
    """A cache stand-in with two hand-made metas (no arrays: body/index maps need only the geometry)."""
    metas = {"a": _meta("a", [[2, 12], [0, 10], [5, 25]]), "b": _meta("b", [[0, 14], [1, 11], [0, 30]])}
    return SimpleNamespace(root=tmp_path, ids=list(metas), meta=metas.__getitem__)


def test_body_provider_known_values_and_round_trip(fake_cache, rng):
    body = get_provider("body", fake_cache)
    assert body.units == "body"
    # voxel centres of the first and last voxel of box [2, 12) x [0, 10) x [5, 25)
    np.testing.assert_allclose(body.to_reference("a", [[2, 0, 5], [11, 9, 24]]),
                               [[0.05, 0.05, 0.025], [0.95, 0.95, 0.975]])
    v = rng.uniform(-5, 30, size=(50, 3))
    np.testing.assert_allclose(body.from_reference("a", body.to_reference("a", v)), v, atol=1e-12)
    # tensors in, (..., 3) batch shapes kept
    t = torch.as_tensor(v.reshape(5, 10, 3), dtype=torch.float32)
    assert body.to_reference("a", t).shape == (5, 10, 3)
    # a -> b: the same normalised position in b's box
    dst = body.from_reference("b", body.to_reference("a", [[2, 0, 5]]))
    np.testing.assert_allclose(dst, [[0.05 * 14 - 0.5, 1 + 0.05 * 10 - 0.5, 0.025 * 30 - 0.5]])


def test_index_provider_is_pcl_position(fake_cache):
    index = get_provider("index", fake_cache)
    # (v + crop_offset + 0.5) / resampled_shape
    np.testing.assert_allclose(index.to_reference("a", [[0, 0, 0]]), [[3.5 / 20, 6.5 / 24, 0.5 / 30]])
    v = np.array([[1.25, 7.0, 29.0]])
    np.testing.assert_allclose(index.from_reference("b", index.to_reference("a", v)), v, atol=1e-12)


def test_unknown_provider_names_it(fake_cache):
    assert {"affine", "body", "index"} <= set(provider_names())
    with pytest.raises(InputError, match="'nearest-neighbour'.*affine, body, index"):
        get_provider("nearest-neighbour", fake_cache)


# ---------------------------------------------------------------------- synthetic cohort (varied FOV)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 synthetic CT cases at 48³ with the default varied field of view, prepared; affine fitted once."""
    from volcontrast.data.prepare import prepare_dataset
    from volcontrast.data.synth import generate_cohort

    root = tmp_path_factory.mktemp("corr")
    generate_cohort(root / "raw", cases=6, size=(48, 48, 48), progress=False)
    prepare_dataset(root / "raw", root / "cache", workers=1, progress=False)
    cache = Cache(root / "cache")
    report = get_provider("affine", cache).fit()
    return SimpleNamespace(raw=root / "raw", landmarks=root / "raw" / "landmarks", cache=cache, fit=report)


def test_affine_transforms_stored_and_rerun_skips(cohort):
    store = cohort.cache.root / "correspondence" / "affine"
    ref = json.loads((store / "reference.json").read_text())["reference"]
    z_extent = {cid: np.ptp(world_box(cohort.cache.meta(cid).affine, cohort.cache.meta(cid).body_bbox)[:, 2])
                for cid in cohort.cache.ids}
    assert ref == max(z_extent, key=z_extent.get) == cohort.fit.reference
    assert sorted(cohort.fit.computed) == sorted(cohort.cache.ids) and not cohort.fit.failed
    files = {cid: store / f"{cid}.json" for cid in cohort.cache.ids}
    mtimes = {cid: p.stat().st_mtime_ns for cid, p in files.items()}
    record = json.loads(files[cohort.cache.ids[0]].read_text())
    assert np.asarray(record["to_reference"]).shape == (4, 4) and record["reference"] == ref
    assert record["metric"] < 0 and len(record["settings_fingerprint"]) == 16
    np.testing.assert_allclose(json.loads(files[ref].read_text())["to_reference"], np.eye(4))
    affine = get_provider("affine", cohort.cache)
    assert min(affine.quality(cid) for cid in cohort.cache.ids) > 0.9  # CT: good registrations are trusted

    again = get_provider("affine", cohort.cache).fit()
    assert sorted(again.reused) == sorted(cohort.cache.ids) and not again.computed
    assert {cid: p.stat().st_mtime_ns for cid, p in files.items()} == mtimes


def test_affine_is_deterministic_and_recomputes_only_missing(cohort, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cohort.cache.root, copy)
    cid = next(c for c in cohort.cache.ids if c != cohort.fit.reference)
    (copy / "correspondence" / "affine" / f"{cid}.json").unlink()
    report = get_provider("affine", Cache(copy)).fit()
    assert list(report.computed) == [cid]
    old = json.loads((cohort.cache.root / "correspondence" / "affine" / f"{cid}.json").read_text())
    new = json.loads((copy / "correspondence" / "affine" / f"{cid}.json").read_text())
    assert new["to_reference"] == old["to_reference"]  # bit-identical rerun
    # other settings: everything is recomputed, and the default provider refuses the stale transforms
    quick = AffineSettings(stages=("similarity",), iterations=20)
    assert sorted(get_provider("affine", Cache(copy), settings=quick).fit().computed) == sorted(cohort.cache.ids)
    with pytest.raises(InputError, match="stale affine correspondence"):
        get_provider("affine", Cache(copy)).to_reference(cid, [[0.0, 0.0, 0.0]])


def test_registration_of_a_scan_to_itself_is_identity(cohort):
    cid = cohort.cache.ids[1]
    meta = cohort.cache.meta(cid)
    image = sitk_image(np.asarray(cohort.cache.image(cid)[0]), meta.affine)
    box = world_box(meta.affine, meta.body_bbox)
    result = register_affine(image, image, fixed_box=box, moving_box=box)
    corners = np.array([[box[(k >> a) & 1, a] for a in range(3)] for k in range(8)])
    moved = corners @ result.matrix[:3, :3].T + result.matrix[:3, 3]
    assert np.linalg.norm(moved - corners, axis=1).max() < 1.0  # mm, on a 6 mm working grid


def test_affine_map_points_round_trip_and_confidence(cohort):
    affine = get_provider("affine", cohort.cache)
    assert affine.units == "mm"
    a, b = cohort.cache.ids[0], cohort.cache.ids[2]
    body = np.argwhere(np.asarray(cohort.cache.body(a)) > 0)
    v = np.concatenate([body[:: max(1, len(body) // 200)].astype(float), [[-100.0, -100.0, -100.0]]])
    dst, conf = map_points(affine, a, v, b)
    back, _ = map_points(affine, b, dst, a)
    np.testing.assert_allclose(back, v, atol=1e-6)
    assert conf.shape == (len(v),) and np.all((conf >= 0) & (conf <= 1))
    assert conf[-1] == 0 and conf[:-1].max() == 1  # outside the scan: 0; shared body anatomy: trusted
    # the reference frame is the reference scan's world mm
    ref = affine.reference
    np.testing.assert_allclose(affine.to_reference(ref, v), voxel_to_world(cohort.cache.meta(ref), v), atol=1e-9)


def test_landmark_error_ordering_affine_body_index(cohort):
    errors = {p: landmark_error(cohort.cache, p, cohort.landmarks) for p in ("body", "affine")}
    index = errors["body"]["index_baseline"]
    assert errors["affine"]["index_baseline"] == index  # same pairs and landmarks for both
    print(f"\nlandmark error (mm) on {errors['body']['pairs']} pairs / {errors['body']['landmarks']} landmarks:")
    for name, e in (("index", index), ("body", errors["body"]["error"]), ("affine", errors["affine"]["error"])):
        print(f"  {name:7s} median {e['median_mm']:6.1f}  p90 {e['p90_mm']:6.1f}  mean {e['mean_mm']:6.1f}")
    assert errors["body"]["pairs"] == 30 and errors["body"]["landmarks"] > 300
    for stat in ("median_mm", "mean_mm"):
        assert errors["affine"]["error"][stat] < errors["body"]["error"][stat] < index[stat]
    assert errors["affine"]["error"]["p90_mm"] < errors["body"]["error"]["p90_mm"]
    assert errors["affine"]["error"]["median_mm"] < 30.0  # an affine fit to anatomy, not a coincidence


def test_landmark_error_pair_sampling(cohort):
    few = landmark_error(cohort.cache, "body", cohort.landmarks, pairs=4)
    assert few["pairs"] == 4 and few == landmark_error(cohort.cache, "body", cohort.landmarks, pairs=4)
    with pytest.raises(InputError, match="pairs"):
        landmark_error(cohort.cache, "body", cohort.landmarks, pairs=0)


def test_correspond_writes_report(cohort):
    report = correspond(cohort.cache.root, "body", cohort.landmarks, progress=False)
    saved = json.loads((cohort.cache.root / "correspondence" / "body" / "report.json").read_text())
    assert saved["landmark_error"]["error"] == pytest.approx(report["landmark_error"]["error"])
    assert saved["provider"] == "body" and saved["cases"] == 6 and saved["seconds_per_scan"]["max"] < 1.0


def test_missing_landmarks_and_unfitted_cache_are_input_errors(cohort, tmp_path):
    missing = tmp_path / "no-landmarks"
    with pytest.raises(InputError, match="no-landmarks: landmarks folder not found"):
        landmark_error(cohort.cache, "body", missing)
    copy = tmp_path / "cache"
    shutil.copytree(cohort.cache.root, copy, ignore=shutil.ignore_patterns("correspondence"))
    with pytest.raises(InputError, match="landmarks folder not found"):  # checked before any work
        correspond(copy, "affine", missing, progress=False)
    assert not (copy / "correspondence").exists()
    with pytest.raises(InputError, match="correspond CACHE --provider affine"):
        get_provider("affine", Cache(copy)).to_reference(Cache(copy).ids[0], [[1.0, 2.0, 3.0]])
    with pytest.raises(InputError, match="unknown correspondence provider 'elastic'"):
        correspond(copy, "elastic", progress=False)


def test_only_two_cases_with_landmarks_needed(cohort, tmp_path):
    folder = tmp_path / "marks"
    folder.mkdir()
    shutil.copy(Path(cohort.landmarks) / f"{cohort.cache.ids[0]}.json", folder)
    with pytest.raises(InputError, match="landmarks for 1 of the cache's cases"):
        landmark_error(cohort.cache, "body", folder)


def test_failed_registration_is_kept_with_zero_confidence(cohort, tmp_path, monkeypatch):
    import volcontrast.spatial.correspondence as corr

    copy = tmp_path / "cache"
    shutil.copytree(cohort.cache.root, copy)
    cid = next(c for c in cohort.cache.ids if c != cohort.fit.reference)
    (copy / "correspondence" / "affine" / f"{cid}.json").unlink()

    def fail(*args, **kwargs):
        raise RuntimeError("ITK ERROR: All samples map outside moving image buffer.")

    monkeypatch.setattr(corr, "register_affine", fail)
    report = correspond(copy, "affine", cohort.landmarks, progress=False)
    assert list(report["failed"]) == [cid] and "All samples map outside" in report["failed"][cid]
    affine = get_provider("affine", Cache(copy))
    assert affine.quality(cid) == 0.0
    centre = np.asarray(Cache(copy).meta(cid).shape, dtype=float)[None] / 2
    assert affine.confidence(cid, centre)[0] == 0.0
    assert report["landmark_error"]["error"]["median_mm"] > 0  # still evaluated (and counted), not hidden
