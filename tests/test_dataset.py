from __future__ import annotations

import json

import numpy as np
import pytest

from volcontrast.data.dataset import open_dataset
from volcontrast.errors import InputError
from volcontrast.io import save_volume

from helpers import phantom, write_dicom_series, write_nnunet


def _msd(root, n=2, test=1):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    training = []
    for i in range(n):
        img, lab, aff = phantom(seed=i)
        save_volume(root / "imagesTr" / f"liver_{i}.nii.gz", img, aff)
        save_volume(root / "labelsTr" / f"liver_{i}.nii.gz", lab, aff)
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    tests = []
    for i in range(test):
        img, _, aff = phantom(seed=10 + i)
        save_volume(root / "imagesTs" / f"liver_{10 + i}.nii.gz", img, aff)
        tests.append(f"./imagesTs/liver_{10 + i}.nii.gz")
    meta = {"name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "numTraining": n, "training": training, "test": tests}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_layout(tmp_path):
    ds = open_dataset(_msd(tmp_path / "Task03"))
    assert ds.layout == "msd" and ds.modality == "ct"
    assert ds.modalities == ["ct"] and ds.modality_why == "dataset.json modality"
    assert [c.id for c in ds.cases] == ["liver_0", "liver_1", "liver_10"]
    assert [c.labelled for c in ds.cases] == [True, True, False]
    assert ds.label_names == {0: "background", 1: "liver", 2: "tumour"}


def test_msd_missing_listed_file(tmp_path):
    root = _msd(tmp_path / "Task03")
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/liver_1.nii.gz: file listed in .*dataset.json is missing"):
        open_dataset(root)


def test_nnunet_layout(tmp_path):
    ds = open_dataset(write_nnunet(tmp_path / "Dataset001_X", n=3))
    assert ds.layout == "nnunet" and ds.modality == "ct" and ds.channel_names == ["CT"]
    assert ds.modalities == ["ct"] and ds.modality_why == "dataset.json channel_names"
    meta = json.loads((tmp_path / "Dataset001_X" / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T2", "1": "CT"}  # per channel: only a channel named CT is CT
    (tmp_path / "Dataset001_X" / "dataset.json").write_text(json.dumps(meta))
    for i in range(3):
        (tmp_path / "Dataset001_X" / "imagesTr" / f"case{i:02d}_0001.nii.gz").write_bytes(b"")
    ds = open_dataset(tmp_path / "Dataset001_X")
    assert ds.modalities == ["mr", "ct"] and ds.modality == "mr" and ds.num_channels == 2
    assert [c.id for c in ds.cases] == ["case00", "case01", "case02"]
    assert all(c.label.name == f"{c.id}.nii.gz" for c in ds.cases)
    assert ds.label_names == {0: "background", 1: "organ1", 2: "organ2"}


def test_nnunet_missing_label_and_channel(tmp_path):
    root = write_nnunet(tmp_path / "D", n=2)
    (root / "labelsTr" / "case01.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/case01.nii.gz: label of training case case01 is missing"):
        open_dataset(root)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"case00_0001.nii.gz: channel 1 of case case00 is missing"):
        open_dataset(root)


def test_plain_folder_with_formats_and_dicom(tmp_path):
    img, _, aff = phantom()
    save_volume(tmp_path / "a.nii.gz", img, aff)
    save_volume(tmp_path / "sub" / "b.nrrd", img, aff)
    save_volume(tmp_path / "c.mha", img, aff)
    write_dicom_series(tmp_path / "dicom_case", np.zeros((4, 4, 3)))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder"
    assert sorted(c.id for c in ds.cases) == ["a", "c", "dicom_case", "sub_b"]
    assert not any(c.labelled for c in ds.cases)
    # a label map next to a scan makes a pair (tests/test_prepare_data.py has the rules)
    save_volume(tmp_path / "sub" / "b_seg.nrrd", np.zeros((20, 18, 16), np.uint8), aff)
    ds = open_dataset(tmp_path)
    assert sorted(c.id for c in ds.cases) == ["a", "c", "dicom_case", "sub_b"]
    assert [c.label.name for c in ds.cases if c.labelled] == ["b_seg.nrrd"]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no scans found"):
        open_dataset(tmp_path / "empty")


def test_csv_and_json_lists(tmp_path):
    img, lab, aff = phantom()
    save_volume(tmp_path / "scans" / "x.nii.gz", img, aff)
    save_volume(tmp_path / "scans" / "x_seg.nii.gz", lab, aff)
    save_volume(tmp_path / "scans" / "y.nii.gz", img, aff)
    (tmp_path / "list.csv").write_text("image,label\nscans/x.nii.gz,scans/x_seg.nii.gz\nscans/y.nii.gz,\n")
    ds = open_dataset(tmp_path / "list.csv")
    assert ds.layout == "list" and [c.id for c in ds.cases] == ["x", "y"]
    assert ds.cases[0].label.name == "x_seg.nii.gz" and ds.cases[1].label is None
    assert ds.modalities is None and ds.label_names == {}  # nothing said: prepare looks at every case
    (tmp_path / "list.json").write_text(json.dumps([{"image": "scans/x.nii.gz", "id": "p1"}, "scans/y.nii.gz"]))
    ds = open_dataset(tmp_path / "list.json")
    assert [c.id for c in ds.cases] == ["p1", "y"]
    (tmp_path / "bad.csv").write_text("path\nscans/x.nii.gz\n")
    with pytest.raises(InputError, match='bad.csv: CSV needs a header with an "image" column'):
        open_dataset(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("image\nscans/nope.nii.gz\n")
    with pytest.raises(InputError, match=r"nope.nii.gz: file listed in .*missing.csv is missing"):
        open_dataset(tmp_path / "missing.csv")
