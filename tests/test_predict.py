"""``predict``: segmentations come back in each scan's own stored geometry (oracle round trips), run checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from volcontrast.data.prepare import PrepareSettings, prepare_dataset
from volcontrast.engine.inference import sliding_window_probabilities
from volcontrast.engine.predict import (
    canonical_voxel_map,
    labels_in_canonical_grid,
    load_segmentation_model,
    predict_scans,
    preprocess_scan,
    segmentation_path,
)
from volcontrast.engine.run import save_checkpoint
from volcontrast.errors import InputError
from volcontrast.io import load_volume, orientation_affine, save_volume
from volcontrast.nets import build_backbone
from volcontrast.utils.files import atomic_write_json, read_json

from helpers import phantom, write_dicom_series

N_CLASSES = 3


@pytest.fixture(scope="module")
def run_dir(phantom_cache, tmp_path_factory) -> Path:
    """A segmentation run (tiny random 3D U-Net) whose preprocessing is the phantom cache's: spacing (2, 2, 3)."""
    torch.manual_seed(0)
    model = build_backbone("plain_unet", preset="tiny", dim=3, num_classes=N_CLASSES)
    manifest = read_json(phantom_cache / "manifest.json")
    assert manifest["resolved"]["spacing"] == [2.0, 2.0, 3.0]
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, model, {
        "kind": "segmentation", "architecture": model.arch_config(), "dim": 3, "patch_size": [16, 16, 16],
        "preprocessing": manifest["resolved"], "channel_names": ["CT"],
        "label_names": {"0": "background", "1": "organ1", "2": "organ2"}, "step": 0,
    }, None)
    return run


@pytest.fixture(scope="module")
def raw(phantom_cache) -> Path:
    """The nnU-Net raw phantoms behind the cache: case00 RAS (2,2,3) mm, case01 LPS (1.8,2.2,2.5) mm,
    case02 PSL (2,2,3) mm, case03 RAS (2.4,1.9,3.5) mm."""
    return phantom_cache.parent / "raw"


def oracle(labels: dict[str, Path], preprocessing: dict):
    """A perfect network: one-hot logits of the scan's reference label, preprocessed exactly like the scan,
    blended by the real sliding window (identity model, overlapping 8³ windows)."""

    def predict(case, volume):
        label = load_volume(labels[volume.path], label=True).array
        reference = preprocess_scan(volume, preprocessing, label=label)
        np.testing.assert_array_equal(reference.image, case.image)  # deterministic, scan left untouched
        one_hot = torch.nn.functional.one_hot(torch.as_tensor(reference.label).long(), N_CLASSES)
        logits = 12.0 * one_hot.permute(3, 0, 1, 2).float()
        return sliding_window_probabilities(lambda x: x, logits, (8, 8, 8), overlap=0.5)

    return predict


def _predict_with_oracle(run_dir, scans, labels, out):
    preprocessing = read_json(run_dir / "model.json")["preprocessing"]
    return predict_scans(run_dir, scans, out, progress=False,
                         predictor=oracle({str(s): lab for s, lab in zip(scans, labels)}, preprocessing))


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())


def test_oracle_round_trip_is_exact_in_stored_nifti_geometry(run_dir, raw, tmp_path):
    scans = [raw / "imagesTr" / f"case{i:02d}_0000.nii.gz" for i in (0, 2)]
    labels = [raw / "labelsTr" / f"case{i:02d}.nii.gz" for i in (0, 2)]
    written = _predict_with_oracle(run_dir, scans, labels, tmp_path / "out")
    assert [p.name for p in written] == ["case00_0000_seg.nii.gz", "case02_0000_seg.nii.gz"]
    for out, ref in zip(written, labels):
        got, want = nib.load(str(out)), nib.load(str(ref))
        assert got.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
    assert nib.aff2axcodes(nib.load(str(written[1])).affine) == ("P", "S", "L")  # stored layout, not RAS


def test_oracle_round_trip_is_exact_for_nrrd(run_dir, tmp_path):
    image, label, affine = phantom((28, 26, 24), (2.0, 2.0, 3.0), seed=5)
    layout = orientation_affine("ILP")
    scan = save_volume(tmp_path / "scan.nrrd", image, affine, like=layout)
    ref = save_volume(tmp_path / "label.nrrd", label, affine, like=layout)
    (out,) = _predict_with_oracle(run_dir, [scan], [ref], tmp_path / "out")
    assert out.name == "scan_seg.nrrd"
    got, want = sitk.ReadImage(str(out)), sitk.ReadImage(str(ref))
    assert got.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want))
    for attr in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(got, attr)(), getattr(want, attr)(), atol=1e-5)
    assert set(np.unique(sitk.GetArrayFromImage(got))) == {0, 1, 2}


def test_oracle_round_trip_is_exact_for_a_dicom_folder(run_dir, tmp_path):
    image, label, _ = phantom((28, 26, 24), (2.0, 2.0, 3.0), seed=6)
    write_dicom_series(tmp_path / "series7", np.rint(image), spacing=(2.0, 2.0, 3.0))
    lps_as_ras = np.diag([-2.0, -2.0, 3.0, 1.0])  # DICOM axes point L, P, S
    ref = save_volume(tmp_path / "label.nii.gz", label, lps_as_ras)
    (out,) = _predict_with_oracle(run_dir, [tmp_path / "series7"], [ref], tmp_path / "out")
    assert out.name == "series7_seg.nii.gz"
    got = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), label)
    np.testing.assert_allclose(got.affine, lps_as_ras, atol=1e-4)


@pytest.fixture(scope="module")
def resampling_run(run_dir, raw, tmp_path_factory) -> Path:
    """The same network with the preprocessing of a cache prepared at (1.6, 1.7, 2.4) mm, a spacing no scan has."""
    root = tmp_path_factory.mktemp("resampling")
    prepare_dataset(raw, root / "cache", PrepareSettings(spacing=(1.6, 1.7, 2.4)), workers=1, progress=False)
    run = root / "run"
    shutil.copytree(run_dir, run)
    model_json = read_json(run / "model.json")
    model_json["preprocessing"] = read_json(root / "cache" / "manifest.json")["resolved"]
    atomic_write_json(run / "model.json", model_json)
    return run


def test_oracle_round_trip_through_resampling_keeps_dice_high(resampling_run, raw, tmp_path):
    scans = [raw / "imagesTr" / f"case{i:02d}_0000.nii.gz" for i in (1, 2)]  # LPS (1.8,2.2,2.5), PSL (2,2,3)
    labels = [raw / "labelsTr" / f"case{i:02d}.nii.gz" for i in (1, 2)]
    written = _predict_with_oracle(resampling_run, scans, labels, tmp_path / "out")
    for out, ref in zip(written, labels):
        got, want = nib.load(str(out)), nib.load(str(ref))
        assert got.shape == want.shape
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
        got_arr, want_arr = np.asanyarray(got.dataobj), np.asanyarray(want.dataobj)
        for value in (0, 1, 2):
            assert dice(got_arr, want_arr, value) > 0.9, (out.name, value, dice(got_arr, want_arr, value))


def test_crop_restricted_resampling_equals_resampling_the_whole_grid(resampling_run, raw, rng):
    """labels_in_canonical_grid only resamples around the body crop; the result must equal resampling the full
    resampled grid (background 1 outside the crop) through the canonical -> resampled voxel map."""
    preprocessing = read_json(resampling_run / "model.json")["preprocessing"]
    case = preprocess_scan(load_volume(raw / "imagesTr" / "case01_0000.nii.gz"), preprocessing)
    meta = case.meta
    assert tuple(meta["shape"]) != tuple(meta["resampled_shape"])  # the body crop removed something
    probs = rng.dirichlet(np.ones(N_CLASSES), size=tuple(meta["shape"])).astype(np.float32)
    probs = np.moveaxis(probs, -1, 0)
    full = np.zeros((N_CLASSES, *meta["resampled_shape"]), np.float32)
    full[0] = 1.0
    full[(slice(None), *(slice(o, o + s) for o, s in zip(meta["crop_offset"], meta["shape"])))] = probs
    m = canonical_voxel_map(meta)
    direct = np.stack([ndimage.affine_transform(f, m[:3, :3], offset=m[:3, 3], output_shape=meta["canonical_shape"],
                                                order=1, mode="nearest") for f in full]).argmax(0)
    np.testing.assert_array_equal(labels_in_canonical_grid(probs, meta), direct)


def test_real_model_writes_labels_in_scan_geometry(run_dir, raw, tmp_path):
    scan = raw / "imagesTr" / "case02_0000.nii.gz"
    (out,) = predict_scans(run_dir, [scan], tmp_path, progress=True)
    got, src = nib.load(str(out)), nib.load(str(scan))
    assert got.shape == src.shape and got.get_data_dtype() == np.uint8
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-5)
    assert int(np.asanyarray(got.dataobj).max()) < N_CLASSES


def test_pretraining_run_is_refused_with_a_clear_error(tmp_path):
    model = build_backbone("plain_unet", preset="tiny", dim=3)
    save_checkpoint(tmp_path / "pre", model, {"kind": "pretraining", "method": "pcl",
                                              "architecture": model.arch_config()}, None)
    with pytest.raises(InputError) as info:
        load_segmentation_model(tmp_path / "pre")
    assert info.value.where == str(tmp_path / "pre" / "model.json")
    assert "not a segmentation run" in info.value.problem and "pcl" in info.value.problem
    with pytest.raises(InputError, match="model.json: file not found"):
        load_segmentation_model(tmp_path)


def test_segmentation_run_with_missing_fields_or_wrong_weights_is_refused(run_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    model_json = read_json(broken / "model.json")
    atomic_write_json(broken / "model.json", {k: v for k, v in model_json.items() if k != "patch_size"})
    with pytest.raises(InputError, match="lacks patch_size"):
        load_segmentation_model(broken)
    model_json["architecture"]["num_classes"] = 5
    atomic_write_json(broken / "model.json", model_json)
    with pytest.raises(InputError, match="model.safetensors: weights do not fit"):
        load_segmentation_model(broken)


def test_inputs_are_never_overwritten_and_bad_scans_name_the_file(run_dir, raw, tmp_path):
    shutil.copy(raw / "imagesTr" / "case00_0000.nii.gz", tmp_path / "a.nii.gz")
    shutil.copy(raw / "imagesTr" / "case02_0000.nii.gz", tmp_path / "a_seg.nii.gz")
    before = (tmp_path / "a_seg.nii.gz").read_bytes()
    with pytest.raises(InputError, match="would overwrite an input scan"):
        predict_scans(run_dir, [tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz"], tmp_path, progress=False)
    assert (tmp_path / "a_seg.nii.gz").read_bytes() == before

    (tmp_path / "bad.nii.gz").write_bytes(b"not a scan")
    with pytest.raises(InputError) as info:
        predict_scans(run_dir, [tmp_path / "a.nii.gz", tmp_path / "bad.nii.gz"], tmp_path / "out", progress=False)
    assert info.value.where == str(tmp_path / "bad.nii.gz") and "\n" not in str(info.value)
    assert (tmp_path / "out" / "a_seg.nii.gz").is_file()  # the scan before the bad one is kept


def test_output_names_keep_the_format_where_possible(tmp_path):
    (tmp_path / "dicom_series").mkdir()
    names = {s: segmentation_path(tmp_path / s, "o").name
             for s in ("x.nii.gz", "x.nii", "x.NRRD", "x.mha", "x.mgz", "x.nhdr", "x.mhd", "dicom_series")}
    assert names == {"x.nii.gz": "x_seg.nii.gz", "x.nii": "x_seg.nii", "x.NRRD": "x_seg.nrrd", "x.mha": "x_seg.mha",
                     "x.mgz": "x_seg.nii.gz", "x.nhdr": "x_seg.nrrd", "x.mhd": "x_seg.mha",
                     "dicom_series": "dicom_series_seg.nii.gz"}


def test_scan_smaller_than_the_patch_is_padded_and_keeps_its_geometry(run_dir, tmp_path):
    """A 10x9x6 scan (after the body crop smaller still) under a 16³ patch: padded for the network, cropped back,
    and the oracle's labels come back exactly in the scan's own grid."""
    image, label, affine = phantom(shape=(10, 9, 6), spacing=(2.0, 2.0, 3.0), origin=(-10.0, -9.0, -9.0))
    scan = save_volume(tmp_path / "small.nii.gz", image, affine, like=orientation_affine("LPS"))
    ref = save_volume(tmp_path / "small_ref.nii.gz", label, affine, like=orientation_affine("LPS"))
    preprocessing = read_json(run_dir / "model.json")["preprocessing"]

    def predict(case, volume):  # the oracle, run through a window larger than the case on every axis
        assert all(s < 16 for s in case.image.shape[1:])
        reference = preprocess_scan(volume, preprocessing, label=load_volume(ref, label=True).array)
        one_hot = torch.nn.functional.one_hot(torch.as_tensor(reference.label).long(), N_CLASSES)
        return sliding_window_probabilities(lambda x: x, 12.0 * one_hot.permute(3, 0, 1, 2).float(), (16, 16, 16))

    (out,) = predict_scans(run_dir, [scan], tmp_path / "oracle", progress=False, predictor=predict)
    got, src = nib.load(str(out)), nib.load(str(scan))
    assert got.shape == src.shape == (10, 9, 6)
    np.testing.assert_array_equal(got.affine, src.affine)
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(nib.load(str(ref)).dataobj))
    (out,) = predict_scans(run_dir, [scan], tmp_path / "model", progress=False)  # the real network pads too
    got = nib.load(str(out))
    assert got.shape == src.shape and np.array_equal(got.affine, src.affine)


def test_predict_warns_once_when_a_scan_does_not_look_like_the_training_data(run_dir, tmp_path, capsys):
    from volcontrast.engine.predict import training_data_mismatch

    ct, _, affine = phantom(shape=(20, 18, 16), modality="ct")
    mr, _, _ = phantom(shape=(20, 18, 16), modality="mr")
    preprocessing = read_json(run_dir / "model.json")["preprocessing"]
    ct_scan = save_volume(tmp_path / "ct.nii.gz", ct, affine)
    mr_scan = save_volume(tmp_path / "mr.nii.gz", mr, affine)
    wrong_units = np.where(ct > -500, ct * 20.0, ct).astype(np.float32)  # body in the wrong units, air as it was
    shifted = save_volume(tmp_path / "shifted.nii.gz", wrong_units, affine)
    predict_scans(run_dir, [ct_scan, mr_scan], tmp_path / "out", progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    p1 = float(np.percentile(mr, 1))
    assert err == [f"warning: {mr_scan}: the model was trained on CT but this scan looks like MR (no air below "
                   f"-500 HU: 1st percentile {p1:.0f}); its segmentation may be meaningless"]
    assert training_data_mismatch(load_volume(ct_scan), preprocessing) is None
    message = training_data_mismatch(load_volume(shifted), preprocessing)
    assert message is not None and message.startswith("the median body intensity 8") and "far outside" in message
    mr_model = {**preprocessing, "modality": "mr", "ct_stats": None}
    assert training_data_mismatch(load_volume(mr_scan), mr_model) is None
    assert "trained on MR but this scan looks like CT" in training_data_mismatch(load_volume(ct_scan), mr_model)
