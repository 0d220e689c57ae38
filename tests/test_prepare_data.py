"""Real-scan data handling in ``prepare`` (issue 19, item 4): the dataset fingerprint, ``--modality`` per channel,
mixed CT/MR lists, image/label pairs in plain folders, label names from CSV/JSON lists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from volcontrast.cli import main
from volcontrast.data.cache import open_cache
from volcontrast.data.dataset import open_dataset
from volcontrast.data.prepare import PrepareSettings, format_fingerprint, prepare_dataset
from volcontrast.errors import InputError
from volcontrast.io import save_volume

from helpers import phantom, write_nnunet


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err  # status lines and errors go to stderr


def _scans(root, kinds, labels=True, shape=(20, 18, 16), spacings=None):
    """``p<i>.nii.gz`` (+ ``p<i>_seg.nii.gz``) for each modality in ``kinds``."""
    for i, kind in enumerate(kinds):
        spacing = spacings[i] if spacings else (2.0, 2.0, 3.0)
        img, lab, aff = phantom(shape, spacing, seed=i, modality=kind)
        save_volume(root / f"p{i}.nii.gz", img, aff)
        if labels:
            save_volume(root / f"p{i}_seg.nii.gz", lab, aff)
    return root


def _prep(data, out, **kw):
    return prepare_dataset(data, out, PrepareSettings(**kw), workers=1, progress=False)


# ------------------------------------------------------------------------------------------- modality


def test_csv_modality_is_detected_per_case_and_said(tmp_path):
    """The reported bug: one modality guessed silently from the first case for a whole CSV (two CT scans z-scored
    as MR). Every case is looked at (a mixed list is an error, below); the fingerprint says why CT was chosen."""
    _scans(tmp_path / "scans", ["ct", "ct"])
    (tmp_path / "ct.csv").write_text("image,label\nscans/p0.nii.gz,scans/p0_seg.nii.gz\n"
                                     "scans/p1.nii.gz,scans/p1_seg.nii.gz\n")
    report = _prep(tmp_path / "ct.csv", tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert cache.modality == "ct" and cache.manifest["resolved"]["ct_stats"] is not None
    assert [m["intensity"][0]["scheme"] for m in (cache.meta(c).raw for c in cache.ids)] == ["ct", "ct"]
    (channel,) = report.fingerprint["channels"]
    assert channel == {"name": "image", "modality": "ct", "why": "detected: darkest 1 % below -500 HU in all 2 case(s)"}
    assert cache.manifest["fingerprint"] == report.fingerprint
    assert "channel_modalities" not in cache.manifest["resolved"]  # one channel: the older form, older caches valid
    # a rerun reuses every case and the per-case detection (cached under .stats)
    assert sorted(p.name.split("-p1-")[0] for p in (tmp_path / "cache" / ".stats").glob("*-p1-*.npy")) == ["p0", "p1"]
    again = _prep(tmp_path / "ct.csv", tmp_path / "cache")
    assert sorted(again.reused) == ["p0", "p1"] and again.fingerprint == report.fingerprint


def test_mixed_ct_mr_list_is_one_line_error_naming_the_list(tmp_path, capsys):
    _scans(tmp_path / "scans", ["ct", "mr", "ct"], labels=False)
    (tmp_path / "mixed.csv").write_text("image\nscans/p0.nii.gz\nscans/p1.nii.gz\nscans/p2.nii.gz\n")
    code, err = run_cli(["prepare", tmp_path / "mixed.csv", "--out", tmp_path / "c", "--workers", 1], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {tmp_path / 'mixed.csv'}: cases look like CT (p0, p2) and MR (p1) (CT: darkest 1 % below -500 HU);"
        " give --modality ct or --modality mr, or split the dataset"]
    assert not (tmp_path / "c" / "manifest.json").exists()
    # the channel's modality given: taken as said
    code, out = run_cli(["prepare", tmp_path / "mixed.csv", "--out", tmp_path / "c", "--workers", 1,
                            "--modality", "mr"], capsys)
    assert code in (0, None) and "channel 0 (image): MR (--modality)" in out
    # the same in a plain folder names the folder
    with pytest.raises(InputError, match=r"scans: cases look like CT \(p0, p2\) and MR \(p1\)"):
        _prep(tmp_path / "scans", tmp_path / "c2")


def test_modality_column_of_a_list(tmp_path):
    _scans(tmp_path / "scans", ["ct", "mr"], labels=False)
    (tmp_path / "both.csv").write_text("image,modality\nscans/p0.nii.gz,CT\nscans/p1.nii.gz,mr\n")
    with pytest.raises(InputError) as exc:
        open_dataset(tmp_path / "both.csv")
    assert exc.value.line() == (f"{tmp_path / 'both.csv'}: rows name both CT (row 1) and MR (row 2); a dataset has one"
                                " modality per channel: split the list into a CT and an MR dataset")
    (tmp_path / "bad.csv").write_text("image,modality\nscans/p0.nii.gz,pet\n")
    with pytest.raises(InputError, match=r"bad.csv: row 1: modality must be ct or mr, got 'pet'"):
        open_dataset(tmp_path / "bad.csv")
    # a column naming MR for a scan that looks like CT: the list is believed (the user said so), no detection
    (tmp_path / "mr.json").write_text(json.dumps([{"image": "scans/p0.nii.gz", "modality": "mr"}]))
    report = _prep(tmp_path / "mr.json", tmp_path / "c")
    assert report.fingerprint["channels"][0]["modality"] == "mr"
    assert report.fingerprint["channels"][0]["why"] == "mr.json modality column"
    # ... but --modality may not contradict it
    with pytest.raises(InputError, match=r"mr.json: case p0 is listed as MR but --modality says CT"):
        _prep(tmp_path / "mr.json", tmp_path / "c3", modality="ct")
    # a column on some rows only: the others are detected and must agree
    (tmp_path / "part.csv").write_text("image,modality\nscans/p0.nii.gz,\nscans/p1.nii.gz,mr\n")
    with pytest.raises(InputError, match=r"part.csv: cases look like CT \(p0\) and MR \(p1\) \(CT: darkest 1 % "
                                         r"below -500 HU, or listed\)"):
        _prep(tmp_path / "part.csv", tmp_path / "c4")
    (tmp_path / "part.csv").write_text("image,modality\nscans/p1.nii.gz,\nscans/p0.nii.gz,mr\n")
    report = _prep(tmp_path / "part.csv", tmp_path / "c5")
    assert report.fingerprint["channels"][0]["why"] == ("1 case(s) listed in part.csv, 1 detected (darkest 1 % above "
                                                        "-500 HU)")


def test_modality_per_channel(tmp_path, capsys):
    root = tmp_path / "raw"
    root = write_nnunet(root, n=2, orientations=("RAS",))
    for i in range(2):
        _, lab, aff = phantom(seed=i)
        save_volume(root / "imagesTr" / f"case{i:02d}_0001.nii.gz", (1.0 + lab * 2.0).astype(np.float32), aff)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (root / "dataset.json").write_text(json.dumps(meta))

    # from dataset.json: CT is CT, any other name is z-scored per volume
    report = _prep(root, tmp_path / "c1")
    cache = open_cache(tmp_path / "c1")
    resolved = cache.manifest["resolved"]
    assert resolved["channel_modalities"] == ["ct", "mr"] and resolved["modality"] == "ct"
    assert resolved["channel_ct_stats"][1] is None and resolved["channel_ct_stats"][0] == resolved["ct_stats"]
    assert 60 < resolved["ct_stats"]["mean"] < 220  # organ HU (80, 200), not the PET values
    meta0 = cache.meta(cache.ids[0]).raw
    assert [m["scheme"] for m in meta0["intensity"]] == ["ct", "zscore-body"]
    body = np.asarray(cache.body(cache.ids[0])).astype(bool)
    ch1 = np.asarray(cache.image(cache.ids[0])[1])
    assert abs(ch1[body].mean()) < 1e-4 and abs(ch1[body].std() - 1) < 1e-3  # z-score over the body
    assert [c["why"] for c in report.fingerprint["channels"]] == ["dataset.json channel_names"] * 2

    # --modality, one value per channel (repeated or comma-separated): each CT channel has its own statistics
    code, out = run_cli(["prepare", root, "--out", tmp_path / "c2", "--workers", 1, "--modality", "ct",
                            "--modality", "ct"], capsys)
    assert code in (0, None)
    assert "channel 0 (CT): CT (--modality)\nchannel 1 (PET): CT (--modality)" in out
    stats = open_cache(tmp_path / "c2").manifest["resolved"]["channel_ct_stats"]
    assert stats[0] == resolved["ct_stats"] and 1 <= stats[1]["mean"] <= 5  # channel 1's values, not HU
    code, err = run_cli(["prepare", root, "--out", tmp_path / "c3", "--modality", "ct"], capsys)
    assert code == 2 and err.strip() == ("error: --modality: gives 1 value(s) but the dataset has 2 channel(s) "
                                         "(CT, PET); give one per channel, e.g. mr,mr")
    code, err = run_cli(["prepare", root, "--out", tmp_path / "c3", "--modality", "ct,pet"], capsys)
    assert code == 2 and err.strip() == "error: --modality: must be ct or mr (one per channel), got 'pet'"


# ---------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_in_manifest_and_printed(tmp_path, capsys):
    raw = write_nnunet(tmp_path / "raw", n=3, shape=(20, 18, 16),
                       spacings=[(2.0, 2.0, 3.0), (1.5, 2.5, 3.0), (2.5, 2.0, 4.0)])
    code, out = run_cli(["prepare", raw, "--out", tmp_path / "cache", "--workers", 1], capsys)
    assert code in (0, None)
    fp = open_cache(tmp_path / "cache").manifest["fingerprint"]
    # phantoms are stored RAS, LPS, PSL: canonical shapes and spacings follow the axis permutation of PSL
    assert fp["cases"] == 3 and fp["labelled"] == 3 and fp["skipped"] == 0 and fp["layout"] == "nnunet"
    assert fp["spacing"]["min"] == [1.5, 2.0, 3.0] and fp["spacing"]["max"] == [2.5, 2.5, 4.0]
    assert fp["spacing"]["median"] == [2.0, 2.0, 3.0] == fp["spacing"]["target"]
    assert fp["shape"] == {"min": [20, 18, 16], "max": [20, 18, 16]}
    assert fp["label_names"] == {"0": "background", "1": "organ1", "2": "organ2"} and fp["labels_found"] == [0, 1, 2]
    lines = format_fingerprint(fp)
    assert lines == [
        "dataset: 3 case(s) (3 labelled, 0 unlabelled), layout nnunet",
        "channel 0 (CT): CT (dataset.json channel_names)",
        "spacing (mm): median 2 x 2 x 3, range 1.5-2.5 x 2-2.5 x 3-4; resampled to 2 x 2 x 3",
        "shape (voxels): 20 x 18 x 16",
        "labels: 0 background, 1 organ1, 2 organ2 (values found: 0, 1, 2)",
    ]
    assert "\n".join(lines) in out


def test_fingerprint_counts_skipped_and_unlabelled(tmp_path):
    _scans(tmp_path / "scans", ["ct", "ct", "ct"], labels=False, shape=(20, 18, 16))
    img, _, aff = phantom((24, 18, 12), seed=5)
    save_volume(tmp_path / "scans" / "big.nii.gz", img, aff)
    (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"not a scan")
    report = prepare_dataset(tmp_path / "scans", tmp_path / "c", workers=1, progress=False, skip_bad=True)
    fp = report.fingerprint
    assert (fp["cases"], fp["labelled"], fp["skipped"]) == (4, 0, 1)
    assert fp["shape"] == {"min": [20, 18, 12], "max": [24, 18, 16]}
    assert format_fingerprint(fp)[0] == "dataset: 4 case(s) (0 labelled, 4 unlabelled, 1 skipped), layout folder"
    assert format_fingerprint(fp)[-1] == "labels: no names given"


# ---------------------------------------------------------------------------------- plain folder pairs


def test_plain_folder_reads_label_files_as_pairs(tmp_path):
    img, lab, aff = phantom()
    save_volume(tmp_path / "a.nii.gz", img, aff)
    save_volume(tmp_path / "a_seg.nii.gz", lab, aff)
    save_volume(tmp_path / "b_ct.nrrd", img, aff)  # the one b_* scan
    save_volume(tmp_path / "b_Label.nrrd", lab, aff)
    save_volume(tmp_path / "sub" / "c.nii.gz", img, aff)  # unlabelled, kept
    save_volume(tmp_path / "sub" / "c_labels.nii.gz", lab, aff)
    save_volume(tmp_path / "d.nii.gz", img, aff)
    ds = open_dataset(tmp_path)
    pairs = {c.id: (c.images[0].name, c.label.name if c.label else None) for c in ds.cases}
    assert pairs == {"a": ("a.nii.gz", "a_seg.nii.gz"), "b_ct": ("b_ct.nrrd", "b_Label.nrrd"),
                     "sub_c": ("c.nii.gz", "c_labels.nii.gz"), "d": ("d.nii.gz", None)}
    _prep(tmp_path, tmp_path.parent / "cache", modality="ct")
    cache = open_cache(tmp_path.parent / "cache")
    assert sorted(cache.ids) == ["a", "b_ct", "d", "sub_c"]
    assert sorted(cache.labelled_ids) == ["a", "b_ct", "sub_c"]
    np.testing.assert_array_equal(np.unique(cache.label("a")), [0, 1, 2])


@pytest.mark.parametrize("files,bad,problem", [
    (["x_t1", "x_t2", "x_seg"], "x_seg.nii.gz",
     "cannot tell which scan this label map belongs to (x_t1.nii.gz or x_t2.nii.gz); list image/label pairs in a "
     "CSV (columns image,label)"),
    (["y", "z_seg"], "z_seg.nii.gz",
     "label map with no scan next to it (expected z.nii.gz); list image/label pairs in a CSV (columns image,label)"),
    (["w", "w_seg", "w_label"], "w.nii.gz",
     "two label maps name this scan (w_label.nii.gz and w_seg.nii.gz); keep one"),
])
def test_plain_folder_ambiguous_pairs_are_refused(tmp_path, capsys, files, bad, problem):
    img, lab, aff = phantom()
    for name in files:
        save_volume(tmp_path / "d" / f"{name}.nii.gz", lab if "_seg" in name or "_label" in name else img, aff)
    code, err = run_cli(["prepare", tmp_path / "d", "--out", tmp_path / "c"], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {tmp_path / 'd' / bad}: {problem}"]


# ------------------------------------------------------------------------------------------ label names


def test_label_names_from_csv_and_json_reach_the_cache(tmp_path):
    _scans(tmp_path / "scans", ["ct", "ct"])
    rows = "scans/p0.nii.gz,scans/p0_seg.nii.gz,1:liver;2:tumour\nscans/p1.nii.gz,scans/p1_seg.nii.gz,\n"
    (tmp_path / "l.csv").write_text("image,label,label_names\n" + rows)
    _prep(tmp_path / "l.csv", tmp_path / "c1")
    cache = open_cache(tmp_path / "c1")
    assert cache.label_names == {0: "background", 1: "liver", 2: "tumour"} and cache.num_classes == 3
    assert cache.manifest["dataset"]["label_names"] == {"0": "background", "1": "liver", "2": "tumour"}
    # JSON: a "labels" object next to the cases (MSD or nnU-Net spelling), or per row
    cases = [{"image": f"scans/p{i}.nii.gz", "label": f"scans/p{i}_seg.nii.gz"} for i in range(2)]
    (tmp_path / "l.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2},
                                                 "cases": cases}))
    assert open_dataset(tmp_path / "l.json").label_names == {0: "background", 1: "liver", 2: "tumour"}
    cases[1]["label_names"] = {"1": "liver", "2": "tumour"}
    (tmp_path / "r.json").write_text(json.dumps(cases))
    assert open_dataset(tmp_path / "r.json").label_names == {0: "background", 1: "liver", 2: "tumour"}


def test_label_names_errors(tmp_path):
    _scans(tmp_path / "scans", ["ct", "ct"])
    (tmp_path / "diff.csv").write_text("image,label_names\nscans/p0.nii.gz,1:liver\nscans/p1.nii.gz,1:spleen\n")
    with pytest.raises(InputError) as exc:
        open_dataset(tmp_path / "diff.csv")
    assert exc.value.line() == (f"{tmp_path / 'diff.csv'}: row 2: label names 1:spleen differ from row 1's 1:liver; "
                                "give the same names on every row (or on one only)")
    (tmp_path / "fmt.csv").write_text("image,label_names\nscans/p0.nii.gz,liver tumour\n")
    with pytest.raises(InputError, match=r"fmt.csv: row 1: label names must look like 1:liver;2:tumour, got "
                                         r"'liver tumour'"):
        open_dataset(tmp_path / "fmt.csv")
    # a label value the names do not cover is refused at prepare time, naming the label file
    (tmp_path / "few.csv").write_text("image,label,label_names\nscans/p0.nii.gz,scans/p0_seg.nii.gz,1:liver\n")
    with pytest.raises(InputError, match=r"p0_seg.nii.gz: label values \[2\] are not among the dataset's labels"):
        _prep(tmp_path / "few.csv", tmp_path / "c")


def test_label_names_from_a_csv_reach_model_json_and_evaluate_table(tmp_path):
    """Issue 19's test: label names given in a CSV reach the fine-tuned model.json and evaluate's table."""
    from volcontrast.engine.evaluate import evaluate
    from volcontrast.engine.finetune import finetune, resolve_finetune_config

    _scans(tmp_path / "scans", ["ct"] * 4, shape=(24, 22, 20))
    rows = "".join(f"scans/p{i}.nii.gz,scans/p{i}_seg.nii.gz,{'1:liver;2:tumour' if i == 0 else ''}\n"
                   for i in range(4))
    (tmp_path / "l.csv").write_text("image,label,label_names\n" + rows)
    _prep(tmp_path / "l.csv", tmp_path / "cache")
    config = resolve_finetune_config("cpu-tiny", None, {"folds": 2, "steps": 2, "log_every": 1, "val_every": 2,
                                                        "data": {"crop_size": [16, 16, 16], "batch_size": 1}})
    finetune(tmp_path / "cache", tmp_path / "run", config, progress=False)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["label_names"] == {"0": "background", "1": "liver", "2": "tumour"}
    result = evaluate(tmp_path / "run", tmp_path / "cache", progress=False)
    assert result["label_names"] == {0: "background", 1: "liver", 2: "tumour"}
    assert "| 1 (liver) |" in result["table"] and "| 2 (tumour) |" in result["table"]
