"""Every bad input handled by `prepare` gives one line naming the file, exit code 2, and loses nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from volcontrast.cli import main
from volcontrast.data.prepare import prepare_dataset
from volcontrast.io import save_volume

from helpers import phantom, write_nnunet


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return exc.value.code, err


def _break(root, case, kind):
    img_p = root / "imagesTr" / f"{case}_0000.nii.gz"
    lab_p = root / "labelsTr" / f"{case}.nii.gz"
    image, label, affine = phantom()
    if kind == "truncated":
        data = img_p.read_bytes()
        img_p.write_bytes(data[: len(data) // 3])
        return img_p.name, "cannot read scan"
    if kind == "shape":
        save_volume(lab_p, label[:-2], affine)
        return lab_p.name, "label does not match image"
    if kind == "geometry":
        shifted = affine.copy()
        shifted[:3, 3] += [5.0, 0.0, 0.0]
        save_volume(lab_p, label, shifted)
        return lab_p.name, "world geometry differs"
    if kind == "nonint":
        save_volume(lab_p, label.astype(np.float32) * 0.5, affine)
        return lab_p.name, "non-integer values"
    if kind == "nan":
        image[3, 3, 3] = np.nan
        save_volume(img_p, image, affine)
        return img_p.name, "NaN or infinite voxels"
    if kind == "4d":
        save_volume(img_p, np.stack([image, image], axis=-1), affine)
        return img_p.name, "where a 3D volume is expected"
    if kind == "labelvalue":
        label[label == 2] = 7
        save_volume(lab_p, label, affine)
        return lab_p.name, "label values [7] are not among the dataset's labels"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "shape", "geometry", "nonint", "nan", "4d", "labelvalue"])
def test_bad_case_one_line_exit_2_and_finished_cases_kept(tmp_path, capsys, kind):
    root = write_nnunet(tmp_path / "raw", n=3)
    name, problem = _break(root, "case02", kind)
    code, err = run_cli(["prepare", root, "--out", tmp_path / "cache", "--workers", "1"], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and problem in lines[0], err
    # with skip_bad the good cases are prepared and the bad one is listed
    report = prepare_dataset(root, tmp_path / "cache", workers=1, skip_bad=True, progress=False)
    assert list(report.skipped) == ["case02"] and name in report.skipped["case02"]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["cases"] == ["case00", "case01"] and "case02" in manifest["skipped"]


def test_skip_bad_cli_lists_skipped(tmp_path, capsys):
    root = write_nnunet(tmp_path / "raw", n=3)
    _break(root, "case01", "nan")
    code, err = run_cli(["prepare", root, "--out", tmp_path / "cache", "--workers", "1", "--skip-bad"], capsys)
    assert code == 0
    assert "prepared 2 case(s)" in err and "skipped case01:" in err and "NaN" in err


def test_missing_file_in_dataset_json(tmp_path, capsys):
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    image, _, affine = phantom()
    save_volume(root / "imagesTr" / "a.nii.gz", image, affine)
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background"},
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    code, err = run_cli(["prepare", root, "--out", tmp_path / "cache"], capsys)
    assert code == 2 and "labelsTr/a.nii.gz: file listed in" in err and "is missing" in err
    assert len(err.strip().splitlines()) == 1


def test_empty_folder_and_bad_options(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["prepare", tmp_path / "empty", "--out", tmp_path / "cache"], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'empty'}: no scans found " \
        "(accepted: .nii, .nii.gz, .mgz, .mgh, .nrrd, .nhdr, .mha, .mhd, DICOM folders)"
    code, err = run_cli(["prepare", tmp_path / "nowhere", "--out", tmp_path / "cache"], capsys)
    assert code == 2 and "nowhere: dataset path not found" in err
    root = write_nnunet(tmp_path / "raw", n=1)
    code, err = run_cli(["prepare", root, "--out", tmp_path / "cache", "--modality", "pet"], capsys)
    assert code == 2 and "--modality: must be ct or mr" in err
