"""The built-in synthetic cohort: layout, determinism, geometry, anatomy and landmark ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volcontrast.data.anatomy import LABEL_INDEX, LABELS, VERTEBRAE, sample_subject
from volcontrast.data.anatomy_render import render
from volcontrast.data.synth import generate_cohort, synthesize_case
from volcontrast.errors import InputError
from volcontrast.io import load_volume

SIZE = (40, 40, 44)
N_CASES = 5
SEED = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return generate_cohort(out, cases=N_CASES, seed=SEED, size=SIZE, preview=True, progress=False)


@pytest.fixture(scope="module")
def cohort_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_again") / "cohort"
    return generate_cohort(out, cases=N_CASES, seed=SEED, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def many_cases() -> list:
    """16 small in-memory cases: enough for statistics over the random fields of view."""
    return [synthesize_case(i, seed=7, size=(48, 48, 40)) for i in range(16)]


def _case_ids(root: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").glob("*.nii.gz"))


def _landmarks(root: Path, case: str) -> dict:
    return json.loads((root / "landmarks" / f"{case}.json").read_text())


def _label_centroid_world(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    ijk = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_nnunet_layout_and_dataset_json(cohort: Path) -> None:
    meta = json.loads((cohort / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"]["background"] == 0
    assert sorted(meta["labels"].values()) == list(range(len(LABELS) + 1))
    assert meta["numTraining"] == N_CASES and meta["file_ending"] == ".nii.gz"
    block = meta["volcontrast_synth"]
    assert (block["seed"], block["modality"], block["size"]) == (SEED, "ct", list(SIZE)) and block["version"]
    ids = _case_ids(cohort)
    assert ids == [f"synth_{i:03d}" for i in range(N_CASES)]
    for case in ids:
        assert (cohort / "imagesTr" / f"{case}_0000.nii.gz").is_file()
        assert (cohort / "landmarks" / f"{case}.json").is_file()
    png = (cohort / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_files_are_byte_identical_across_runs(cohort: Path, cohort_again: Path) -> None:
    files = sorted(p.relative_to(cohort) for p in cohort.rglob("*") if p.is_file() and p.suffix != ".png")
    assert len(files) == 3 * N_CASES + 1
    for rel in files:
        data = (cohort / rel).read_bytes()
        assert data == (cohort_again / rel).read_bytes(), rel
        if rel.name.endswith(".gz"):
            assert data[4:8] == b"\0\0\0\0", f"{rel}: gzip header carries a modification time"
    other = synthesize_case(0, seed=SEED + 1, size=SIZE)
    assert not np.array_equal(other.image, np.asanyarray(nib.load(cohort / "imagesTr/synth_000_0000.nii.gz").dataobj))


def test_a_case_depends_only_on_its_index(cohort: Path) -> None:
    case = synthesize_case(3, seed=SEED, size=SIZE)  # made alone, out of order
    stored = nib.load(cohort / "imagesTr" / "synth_003_0000.nii.gz")
    assert np.array_equal(np.asanyarray(stored.dataobj), case.image)
    assert np.allclose(stored.affine, case.affine, atol=1e-4)
    assert case.landmark_record() == _landmarks(cohort, "synth_003")


def test_nibabel_and_simpleitk_see_the_same_scan(cohort: Path) -> None:
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    for case in _case_ids(cohort):
        for path in (cohort / "imagesTr" / f"{case}_0000.nii.gz", cohort / "labelsTr" / f"{case}.nii.gz"):
            img = nib.load(path)
            itk = sitk.ReadImage(str(path))
            direction = np.asarray(itk.GetDirection()).reshape(3, 3)
            itk_affine = lps_to_ras @ direction @ np.diag(itk.GetSpacing())
            assert np.allclose(itk_affine, img.affine[:3, :3], atol=1e-4), path
            assert np.allclose(lps_to_ras @ np.asarray(itk.GetOrigin()), img.affine[:3, 3], atol=1e-3), path
            assert np.array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), np.asanyarray(img.dataobj))
        image = sitk.ReadImage(str(cohort / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(cohort / "labelsTr" / f"{case}.nii.gz"))
        # nnU-Net's integrity check: same grid for image and segmentation
        assert image.GetSize() == label.GetSize() and image.GetSpacing() == label.GetSpacing()
        assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()


def test_stored_orientations_vary_and_dtypes(cohort: Path) -> None:
    codes = set()
    for case in _case_ids(cohort):
        img = nib.load(cohort / "imagesTr" / f"{case}_0000.nii.gz")
        lab = nib.load(cohort / "labelsTr" / f"{case}.nii.gz")
        stored = "".join(nib.aff2axcodes(img.affine))
        assert stored == _landmarks(cohort, case)["acquisition"]["axcodes"]
        codes.add(stored)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        values = set(np.unique(np.asanyarray(lab.dataobj)).tolist())
        assert values <= set(range(len(LABELS) + 1))
        hu = np.asanyarray(img.dataobj)
        assert hu.min() >= -1024 and np.percentile(hu, 5) < -900  # air around the body
    assert len(codes) >= 2


def test_centroid_landmarks_agree_with_the_label_maps(cohort: Path) -> None:
    errors = []  # per axis, in voxels
    for case in _case_ids(cohort):
        label = load_volume(cohort / "labelsTr" / f"{case}.nii.gz", label=True)
        marks = _landmarks(cohort, case)
        for name, info in marks["structures"].items():
            if info["fraction_in_fov"] < 1.0:
                continue
            found = _label_centroid_world(label.array, label.affine, info["label"])
            expected = np.asarray(marks["landmarks"][f"centroid_{name}"]["world_mm"])
            errors.append(np.abs(found - expected) / np.asarray(label.spacing))
            assert errors[-1].max() < 0.4, (case, name, errors[-1])
            volume = (label.array == info["label"]).sum() * np.prod(label.spacing) / 1000.0
            assert volume == pytest.approx(info["volume_ml"], rel=0.15), (case, name)
    assert len(errors) >= 2 * N_CASES
    assert np.mean(errors) < 0.1  # no systematic offset between landmarks and label maps


def test_landmark_files_are_complete_and_flag_the_field_of_view(cohort: Path) -> None:
    outside = 0
    for case in _case_ids(cohort):
        geom = load_volume(cohort / "labelsTr" / f"{case}.nii.gz", label=True)
        marks = _landmarks(cohort, case)["landmarks"]
        assert len(marks) >= 20
        assert {f"vertebra_{v}" for v in VERTEBRAE} <= set(marks)
        assert {f"centroid_{n}" for n in ("liver", "heart", "lung_left")} <= set(marks)
        for name, info in marks.items():
            ijk = np.linalg.solve(geom.affine[:3, :3], np.asarray(info["world_mm"]) - geom.affine[:3, 3])
            inside = bool(np.all((ijk >= -0.5) & (ijk <= np.asarray(geom.shape) - 0.5)))
            assert inside == info["in_fov"], (case, name)
            outside += not inside
    assert outside > 0  # landmarks beyond the field of view are written too


def test_point_landmarks_lie_in_their_structure() -> None:
    for i in range(60):  # exact, in atlas space, over many subjects
        subject = sample_subject(np.random.default_rng([11, i, 0]))
        points = subject.point_landmarks()
        labels = render(subject, np.stack([p for p, _ in points.values()], axis=1))[0]
        for k, (name, (_, structure)) in enumerate(points.items()):
            if structure is not None:
                assert labels[k] == LABEL_INDEX[structure], (i, name)


def test_point_landmarks_in_the_label_maps(many_cases: list) -> None:
    checked = 0
    for case in many_cases:
        _, label, affine = case.canonical()
        for name, pos in case.landmarks.items():
            structure = case.landmark_structure[name]
            if name.startswith("centroid_") or structure is None or not case.in_fov[name]:
                continue
            ijk = np.rint(np.linalg.solve(affine[:3, :3], np.asarray(pos) - affine[:3, 3])).astype(int)
            lo, hi = np.maximum(ijk - 1, 0), ijk + 2
            assert (label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == LABEL_INDEX[structure]).any(), name
            checked += 1
    assert checked > 100


def test_atlas_world_round_trip() -> None:
    case = synthesize_case(2, seed=1, size=(24, 24, 24))
    atlas = np.array([[0.0, 0.0, 300.0], [60.0, -40.0, 500.0], [-100.0, 30.0, 100.0]])
    world = case.atlas_to_world(atlas)
    assert np.abs(case.world_to_atlas(world) - atlas).max() < 1e-3
    apex = case.subject.point_landmarks()["heart_apex"][0]
    assert np.allclose(case.atlas_to_world(apex[None])[0], case.landmarks["heart_apex"], atol=1e-3)


def test_structures_present_in_most_cases(many_cases: list) -> None:
    present = {name: 0 for name in LABELS}
    for case in many_cases:
        _, label, _ = case.canonical()
        found = set(np.unique(label).tolist()) - {0}
        assert len(found) >= 4, case.case_id
        for name in LABELS:
            present[name] += LABEL_INDEX[name] in found
    assert all(n >= 0.4 * len(many_cases) for n in present.values()), present
    assert np.mean(list(present.values())) >= 0.7 * len(many_cases), present


def test_positions_follow_the_body_not_the_slice_index(many_cases: list) -> None:
    """Heart centroid (from the label map): tight in body coordinates, spread in array-index terms."""
    body_z, index_z, body_xy, index_xy = [], [], [], []
    for case in many_cases:
        if case.structures.get("heart", {}).get("fraction_in_fov", 0.0) < 1.0:
            continue
        image, label, affine = case.canonical()
        ijk = np.argwhere(label == LABEL_INDEX["heart"]).mean(axis=0)
        world = affine[:3, :3] @ ijk + affine[:3, 3]
        # along z: between the L5 and T1 vertebral-body centres (the skeleton), wherever the scan starts
        z_l5, z_t1 = case.landmarks["vertebra_L5"][2], case.landmarks["vertebra_T1"][2]
        body_z.append((world[2] - z_l5) / (z_t1 - z_l5))
        index_z.append(ijk[2] / (label.shape[2] - 1))
        # in-plane: within the body's bounding box on that slice, from the thresholded image
        body = image[:, :, int(np.rint(ijk[2]))] > -500
        box = [np.flatnonzero(body.any(axis=1 - a)) for a in (0, 1)]
        body_xy.append([(ijk[a] - box[a][0]) / (box[a][-1] - box[a][0]) for a in (0, 1)])
        index_xy.append(ijk[:2] / (np.asarray(label.shape[:2]) - 1))
    assert len(body_z) >= 8
    assert np.std(body_z) < 0.04 and np.std(index_z) > 4 * np.std(body_z)
    assert np.all(np.std(body_xy, axis=0) < 0.05)
    assert np.std(np.asarray(index_xy)[:, 0]) > 1.5 * np.std(np.asarray(body_xy)[:, 0])


def test_mr_cohort_shares_the_anatomy(tmp_path: Path) -> None:
    ct = synthesize_case(1, modality="ct", seed=5, size=(24, 24, 28))
    mr = synthesize_case(1, modality="mr", seed=5, size=(24, 24, 28))
    assert np.array_equal(ct.label, mr.label) and ct.landmarks == mr.landmarks
    assert mr.image.dtype == np.int16 and mr.image.min() >= 0
    organs = (mr.label > 0) & (mr.label != LABEL_INDEX["lung_left"]) & (mr.label != LABEL_INDEX["lung_right"])
    corners = mr.image[[0, -1]][:, [0, -1]][:, :, [0, -1]]
    assert mr.image[organs].mean() > 2 * corners.mean()  # tissue brighter than the air (noise floor) around
    out = generate_cohort(tmp_path / "mr", cases=1, modality="mr", seed=5, size=(24, 24, 28), progress=False)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "MR"}


def test_regenerating_with_fewer_cases_drops_the_extra_files(tmp_path: Path) -> None:
    out = tmp_path / "c"
    generate_cohort(out, cases=3, size=(16, 16, 16), progress=False)
    generate_cohort(out, cases=2, size=(16, 16, 16), progress=False)
    assert _case_ids(out) == ["synth_000", "synth_001"]
    assert sorted(p.name for p in (out / "landmarks").iterdir()) == ["synth_000.json", "synth_001.json"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [({"modality": "pet"}, "--modality"), ({"size": (0, 40, 40)}, "--size"), ({"cases": 0}, "--cases")],
)
def test_bad_arguments_are_input_errors(tmp_path: Path, kwargs: dict, where: str) -> None:
    with pytest.raises(InputError) as err:
        generate_cohort(tmp_path / "x", progress=False, **kwargs)
    assert err.value.where == where and "\n" not in str(err.value)


def test_refuses_a_folder_with_other_data(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "mine", "labels": {}}))
    with pytest.raises(InputError, match="not a volcontrast synthetic cohort"):
        generate_cohort(tmp_path, cases=1, size=(16, 16, 16), progress=False)
    assert json.loads((tmp_path / "dataset.json").read_text())["name"] == "mine"


def test_fixed_field_of_view_gives_one_protocol_and_bad_fov_is_rejected():
    cases = [synthesize_case(i, size=(24, 24, 24), fov="chest") for i in range(4)]
    assert {c.protocol for c in cases} == {"chest"}
    varied = {synthesize_case(i, size=(24, 24, 24)).protocol for i in range(12)}
    assert len(varied) > 1
    with pytest.raises(InputError, match="--fov"):
        synthesize_case(0, size=(24, 24, 24), fov="head")
