from __future__ import annotations

import gzip
import importlib.resources

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volcontrast.errors import InputError
from volcontrast.io import load_volume, orientation_affine, read_geometry, save_volume

from helpers import write_dicom_series

NIB_DATA = importlib.resources.files("nibabel") / "tests" / "data"


def _marker_world(vol, value):
    ijk = np.argwhere(vol.array == value)[0]
    return (vol.affine @ np.r_[ijk, 1.0])[:3]


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PSL", "ILA"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mgz"])
def test_orientation_round_trip_same_canonical_array(tmp_path, rng, codes, suffix):
    arr = rng.normal(size=(7, 6, 5)).astype(np.float32)
    arr[2, 3, 4] = 100.0  # marker
    affine = np.diag([0.8, 1.2, 2.5, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 40.0]
    ref = load_volume(save_volume(tmp_path / f"ref{suffix}", arr, affine))
    vol = load_volume(save_volume(tmp_path / f"x{suffix}", arr, affine, like=orientation_affine(codes)))
    assert "".join(vol.original_axcodes) == codes
    assert vol.axcodes == ("R", "A", "S")
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    # the marker keeps its world position
    np.testing.assert_allclose(_marker_world(vol, 100.0), (affine @ [2, 3, 4, 1.0])[:3], atol=1e-4)
    # and going back to the stored layout gives the stored array
    stored = nib.load(str(tmp_path / f"x{suffix}")) if suffix in (".nii.gz", ".mgz") else None
    if stored is not None:
        np.testing.assert_array_equal(vol.in_original_orientation(), np.asarray(stored.dataobj))


def test_canonical_axes_point_to_ras(tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    # stored LPS: array axis 0 runs to the patient's Left
    path = save_volume(tmp_path / "lps.nii.gz", arr, np.eye(4), like=orientation_affine("LPS"))
    stored_affine = nib.load(str(path)).affine
    assert nib.aff2axcodes(stored_affine) == ("L", "P", "S")
    vol = load_volume(path)
    assert np.all(np.diag(vol.affine)[:3] > 0)


def test_nibabel_shipped_nifti_and_mgz():
    vol = load_volume(NIB_DATA / "anatomical.nii")
    img = nib.load(str(NIB_DATA / "anatomical.nii"))
    assert vol.array.dtype == np.float32
    assert sorted(vol.shape) == sorted(img.shape)
    assert vol.axcodes == ("R", "A", "S")
    np.testing.assert_allclose(sorted(vol.spacing), sorted(img.header.get_zooms()[:3]), rtol=1e-6)
    assert vol.array.sum() == pytest.approx(float(np.asarray(img.dataobj, dtype=np.float64).sum()), rel=1e-5)
    # world position of the array's first voxel is preserved
    first_world = img.affine @ [0, 0, 0, 1.0]
    ijk = np.linalg.solve(vol.affine, first_world)[:3]
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-6)
    assert vol.array[tuple(np.round(ijk).astype(int))] == np.asarray(img.dataobj)[0, 0, 0]


def test_4d_file_is_an_error_and_channels_allowed():
    with pytest.raises(InputError, match=r"example4d.nii.gz: 4D image .* where a 3D volume is expected"):
        load_volume(NIB_DATA / "example4d.nii.gz")
    vol = load_volume(NIB_DATA / "example4d.nii.gz", channels=2)
    assert vol.array.shape == (2, 128, 96, 24)
    with pytest.raises(InputError, match="4D image"):
        load_volume(NIB_DATA / "test.mgz")  # (3, 4, 5, 2)


def test_dicom_series_reads_with_geometry(tmp_path, rng):
    arr = rng.integers(-1000, 1000, size=(8, 7, 5)).astype(np.int16)
    write_dicom_series(tmp_path / "series", arr, spacing=(1.0, 1.5, 2.0), origin=(10.0, 20.0, 30.0))
    vol = load_volume(tmp_path / "series")
    assert vol.shape == (8, 7, 5)
    np.testing.assert_allclose(vol.spacing, (1.0, 1.5, 2.0), atol=1e-5)
    # DICOM/ITK voxel (0,0,0) sits at LPS (10, 20, 30) = RAS (-10, -20, 30); RAS canonical flips x and y
    np.testing.assert_array_equal(vol.array, arr[::-1, ::-1, :].astype(np.float32))
    world = vol.affine @ [7, 6, 0, 1.0]
    np.testing.assert_allclose(world[:3], [-10.0, -20.0, 30.0], atol=1e-4)
    g = read_geometry(tmp_path / "series")
    assert g.shape == (8, 7, 5)


def test_nrrd_and_mha_written_by_sitk_read_back(tmp_path, rng):
    arr = rng.normal(size=(5, 4, 3)).astype(np.float32)
    img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
    img.SetSpacing((0.5, 0.7, 1.9))
    img.SetOrigin((1.0, 2.0, 3.0))
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(img, str(tmp_path / f"a{suffix}"))
        vol = load_volume(tmp_path / f"a{suffix}")
        np.testing.assert_array_equal(vol.array, arr[::-1, ::-1, :])
        np.testing.assert_allclose(vol.spacing, (0.5, 0.7, 1.9), atol=1e-6)
        np.testing.assert_allclose(vol.affine[:3, 3], [-1.0 - 0.5 * 4, -2.0 - 0.7 * 3, 3.0], atol=1e-6)


def test_header_geometry_matches_loaded(tmp_path, rng):
    arr = rng.normal(size=(6, 5, 4)).astype(np.float32)
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    for codes in ("PSL", "LPS"):
        for suffix in (".nii.gz", ".nrrd"):
            p = save_volume(tmp_path / f"{codes}{suffix}", arr, aff, like=orientation_affine(codes))
            g, v = read_geometry(p), load_volume(p)
            assert g.shape == v.shape
            np.testing.assert_allclose(g.affine, v.affine, atol=1e-5)


def test_bad_files_raise_one_line_errors(tmp_path):
    arr = np.ones((6, 6, 6), np.float32)
    good = save_volume(tmp_path / "good.nii.gz", arr, np.eye(4))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(InputError, match=r"trunc.nii.gz: cannot read scan"):
        load_volume(truncated)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(InputError, match=r"garbage.nii: cannot read scan"):
        load_volume(garbage)
    nan = arr.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"nan.nii.gz: image contains 1 NaN or infinite voxels"):
        load_volume(save_volume(tmp_path / "nan.nii.gz", nan, np.eye(4)))
    frac = np.zeros((6, 6, 6), np.float32)
    frac[0, 0, 0] = 0.5
    with pytest.raises(InputError, match=r"frac.nii.gz: label map has non-integer values"):
        load_volume(save_volume(tmp_path / "frac.nii.gz", frac, np.eye(4)), label=True)
    with pytest.raises(InputError, match="file not found"):
        load_volume(tmp_path / "missing.nii.gz")
    for err in (InputError("a.nii", "x\ny"),):
        assert "\n" not in str(err)


def test_label_dtype_and_deterministic_gzip(tmp_path):
    lab = np.zeros((5, 5, 5), np.float64)
    lab[1:3, 1:3, 1:3] = 3
    p = save_volume(tmp_path / "l.nii.gz", lab, np.eye(4))
    vol = load_volume(p, label=True)
    assert vol.array.dtype == np.uint8 and vol.array.max() == 3
    # NIfTI gzip from nibabel is deterministic (no mtime), so equal inputs give equal bytes
    p2 = save_volume(tmp_path / "l2.nii.gz", lab, np.eye(4))
    assert gzip.decompress(p.read_bytes()) == gzip.decompress(p2.read_bytes())


def test_dicom_reading_keeps_the_process_locale(tmp_path):
    import locale

    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(tmp_path / "s", np.zeros((4, 4, 3)))
    load_volume(tmp_path / "s")
    assert locale.setlocale(locale.LC_ALL) == before
