"""Reliability (issue 20): one atomic checkpoint commit, resume from any kill, caches that survive a failed rerun,
folder locks against a second writer, and one line with exit 2 for every bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from volcontrast.cli import main
from volcontrast.data import prepare as prepare_mod
from volcontrast.data.cache import open_cache
from volcontrast.data.prepare import prepare_dataset
from volcontrast.engine import run as run_mod
from volcontrast.engine.config import resolve_pretrain_config
from volcontrast.engine.pretrain import pretrain
from volcontrast.engine.run import read_log
from volcontrast.errors import InputError
from volcontrast.io import save_volume

from helpers import phantom, pretrain_interrupted, write_nnunet

TINY = {"data": {"crop_size": [16, 16, 16], "workers": 0}, "probe_crops": 0, "log_every": 2, "checkpoint_every": 2,
        "steps": 6}
SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


def _cfg(**kw):
    return resolve_pretrain_config("cpu-tiny", TINY, kw)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def full_run(phantom_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    pretrain(phantom_cache, out, _cfg(), progress=False)
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_log(a / "log.csv"), read_log(b / "log.csv")
    assert [r["step"] for r in rb] == [2, 4, 6]
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], x["step"]
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def _leftovers(run: Path) -> list[str]:
    names = [p.name for p in run.glob(".tmp-*")] + [p.name for p in (run / "checkpoints").glob(".tmp-*")]
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    return names + (steps if steps != ["step_0000006"] else [])


class Kill(BaseException):
    """Stands for a kill inside a checkpoint write (BaseException: no ``except Exception`` swallows it)."""


# ----------------------------------------------------------------------------- 1. one atomic checkpoint


@pytest.mark.parametrize("nth", [1, 2, 3, 4, 5])
def test_interrupting_the_checkpoint_at_each_rename_resumes_exactly(phantom_cache, full_run, tmp_path, monkeypatch,
                                                                    nth):
    """The step-4 checkpoint is interrupted at its nth rename (step folder, commit record, three publications):
    --resume continues from a complete checkpoint (step 2 or 4) and ends equal to the uninterrupted run."""
    real_replace, real_save = os.replace, run_mod.RunDir.save
    calls = {"armed": False, "n": 0}

    def replace(src, dst):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == nth:
                raise Kill
        return real_replace(src, dst)

    def save(self, model, model_json, state, step, keep, **kw):
        calls["armed"] = step == 4
        try:
            return real_save(self, model, model_json, state, step, keep, **kw)
        finally:
            calls["armed"] = False

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(run_mod.RunDir, "save", save)
    with pytest.raises(Kill):
        pretrain(phantom_cache, tmp_path / "cut", _cfg(), progress=False)
    monkeypatch.undo()
    assert calls["n"] == nth
    pretrain(phantom_cache, tmp_path / "cut", resume=True, progress=False)
    _assert_same_run(full_run, tmp_path / "cut")
    assert _leftovers(tmp_path / "cut") == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{src!r}, {tests!r}]
    from volcontrast.engine import run as run_mod
    from volcontrast.engine.config import resolve_pretrain_config
    from volcontrast.engine.pretrain import pretrain
    nth, armed, n = {nth}, [False], [0]
    real_replace, real_save = os.replace, run_mod.RunDir.save
    def replace(src, dst):
        if armed[0]:
            n[0] += 1
            if n[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    def save(self, model, model_json, state, step, keep, **kw):
        armed[0] = step == 4
        return real_save(self, model, model_json, state, step, keep, **kw)
    os.replace, run_mod.RunDir.save = replace, save
    pretrain({cache!r}, {out!r}, resolve_pretrain_config("cpu-tiny", {tiny!r}, {{}}), progress=False)
""")


@pytest.mark.parametrize("nth", [2, 4])
def test_sigkill_inside_the_checkpoint_resumes_exactly(phantom_cache, full_run, tmp_path, nth):
    """A real SIGKILL before the commit (nth=2) and in the middle of publishing (nth=4): stale ``.tmp-*`` and
    uncommitted step folders are removed and the resumed run equals the uninterrupted one."""
    script = KILLER.format(src=SRC, tests=TESTS, nth=nth, cache=str(phantom_cache), out=str(tmp_path / "cut"),
                           tiny=TINY)
    # the killed run uses as many threads as this process (the uninterrupted run's), so results match bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pretrain(phantom_cache, tmp_path / "cut", resume=True, progress=False)
    _assert_same_run(full_run, tmp_path / "cut")
    assert _leftovers(tmp_path / "cut") == []


def test_resume_refuses_a_damaged_committed_checkpoint(phantom_cache, tmp_path):
    out = tmp_path / "run"
    pretrain(phantom_cache, out, _cfg(steps=2), progress=False)
    weights = out / "checkpoints" / "step_0000002" / "model.safetensors"
    data = weights.read_bytes()
    os.unlink(weights)  # (the top-level file is a hard link of the same data)
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"model.safetensors: the checkpoint of step 2 is damaged: the file has \d+"
                                         r" bytes, \d+ were written"):
        pretrain(phantom_cache, out, resume=True, steps=4, progress=False)



def test_kept_snapshots_stay_and_each_step_folder_is_self_describing(phantom_cache, tmp_path):
    import json

    from volcontrast.utils.files import file_digest

    out = tmp_path / "run"
    pretrain(phantom_cache, out, _cfg(keep_every=4), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    record = json.loads((out / "checkpoint.json").read_text())
    assert record["step"] == 6 and record["folder"] == "checkpoints/step_0000006"
    assert record["files"] == {n: file_digest(out / n) for n in ("model.safetensors", "trainer_state.pt",
                                                                 "model.json")}
    assert json.loads((out / "checkpoints" / "step_0000004" / "checkpoint.json").read_text())["keep"] is True
    (out / "checkpoints" / "step_0000001").mkdir()  # a snapshot from before checkpoint.json: never removed
    pretrain(phantom_cache, out, resume=True, steps=8, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000004", "step_0000008"]

# ----------------------------------------------------------------------------- 2. killed before its first checkpoint


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(phantom_cache, full_run, tmp_path, capsys):
    out = tmp_path / "cut"
    pretrain_interrupted(phantom_cache, out, _cfg(checkpoint_every=4), at_step=2)
    assert (out / "config.yaml").is_file() and not (out / "checkpoint.json").exists()
    base = ["pretrain", phantom_cache, "--out", out, "--quiet"]
    code, err = run_cli(base, capsys)
    assert code == 2 and err == (f"error: {out}: holds a run that stopped before its first checkpoint; use --resume"
                                 " to start it again from step 0, or choose another --out\n")
    code, err = run_cli([*base, "--resume"], capsys)
    assert code == 0 and "has no checkpoint yet (the run stopped before its first one); starting it again from step" \
                         " 0" in err
    ra, rb = read_log(full_run / "log.csv"), read_log(out / "log.csv")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


# ----------------------------------------------------------------------------- 4. locks


HOLDER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{src!r}]
    from volcontrast.utils.files import claim_folder
    claim_folder({folder!r})
    print("ready", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that claims a folder (as a running pretrain/prepare would) and holds it."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=SRC, folder=str(folder))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)


def test_a_second_writer_to_a_run_folder_exits_2_naming_the_holder(phantom_cache, tmp_path, capsys, holder):
    out = tmp_path / "run"
    p = holder(out)
    code, err = run_cli(["pretrain", phantom_cache, "--out", out, "--quiet", "--steps", 2, "--crop", 16, "--crop", 16,
                         "--crop", 16], capsys)
    assert code == 2 and err == (f"error: {out}: is in use by another volcontrast process (PID {p.pid}); wait for it"
                                 " to finish or choose another folder\n")
    assert not (out / "config.yaml").exists()


def test_a_second_prepare_on_one_cache_exits_2_naming_the_holder(tmp_path, capsys, holder):
    raw = write_nnunet(tmp_path / "raw", n=2)
    p = holder(tmp_path / "cache")
    code, err = run_cli(["prepare", raw, "--out", tmp_path / "cache"], capsys)
    assert code == 2 and err == (f"error: {tmp_path / 'cache'}: is in use by another volcontrast process (PID {p.pid});"
                                 " wait for it to finish or choose another folder\n")
    assert not (tmp_path / "cache" / "manifest.json").exists()



def test_locks_are_released_when_the_writer_finishes(phantom_cache, tmp_path, holder):
    pretrain(phantom_cache, tmp_path / "run", _cfg(steps=2), progress=False)
    holder(tmp_path / "run")  # another process can claim it now
    prepare_dataset(write_nnunet(tmp_path / "raw", n=1), tmp_path / "cache", workers=1, progress=False)
    holder(tmp_path / "cache")

# ----------------------------------------------------------------------------- 3. a failed prepare rerun


def test_a_failed_prepare_rerun_leaves_the_good_cache_valid(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path / "raw", n=3)
    cache = tmp_path / "cache"
    prepare_dataset(root, cache, workers=1, progress=False)
    manifest = (cache / "manifest.json").read_bytes()
    arrays = {p: p.read_bytes() for p in (cache / "cases").rglob("*.npy")}
    # one more case (its intensities change the CT statistics, so every case is redone) that fails mid-run
    image, label, affine = phantom(seed=7)
    save_volume(root / "imagesTr" / "case03_0000.nii.gz", image, affine)
    save_volume(root / "labelsTr" / "case03.nii.gz", label, affine)
    real = prepare_mod.preprocess_case

    def fails_on_case03(image, label, resolved):
        if "case03" in str(image.path):
            raise InputError(image.path, "bad case")
        return real(image, label, resolved)

    monkeypatch.setattr(prepare_mod, "preprocess_case", fails_on_case03)
    with pytest.raises(InputError, match="bad case"):
        prepare_dataset(root, cache, workers=1, progress=False)
    assert (cache / "manifest.json").read_bytes() == manifest
    assert {p: p.read_bytes() for p in arrays} == arrays
    c = open_cache(cache)
    assert c.ids == ["case00", "case01", "case02"] and c.manifest["complete"] is True
    # the cases finished in the failed run (in folders the old manifest did not use) are reused next time
    monkeypatch.undo()
    report = prepare_dataset(root, cache, workers=1, progress=False)
    assert report.reused == ["case00", "case01", "case02"] and report.prepared == ["case03"]
    c = open_cache(cache)
    assert c.ids == ["case00", "case01", "case02", "case03"] and c.manifest["complete"] is True
    assert sorted(p.name for p in (cache / "cases").iterdir() if not p.name.startswith(".")) == \
        sorted(c.case_dir(cid).name for cid in c.ids)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_prepare_rerun_redoes_a_damaged_case(tmp_path, damage):
    root = write_nnunet(tmp_path / "raw", n=2)
    cache = tmp_path / "cache"
    prepare_dataset(root, cache, workers=1, progress=False)
    target = cache / "cases" / "case01" / ("image.npy" if damage != "truncate" else "body.npy")
    good = target.read_bytes()
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(good[:-10])
    else:  # same size, one byte changed: only the checksum tells
        target.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    report = prepare_dataset(root, cache, workers=1, progress=False)
    assert report.reused == ["case00"] and report.prepared == ["case01"]
    assert open_cache(cache).case_dir("case01").joinpath(target.name).read_bytes() == good


# ----------------------------------------------------------------------------- 5. one line, exit 2, for bad input


def _one_line(err: str, where: Path, problem: str) -> None:
    assert err == f"error: {where}: {problem}\n", err


def _nrrd(path: Path, directions: str) -> Path:
    header = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 9 10\n"
              f"space directions: {directions}\nkinds: domain domain domain\nendian: little\nencoding: raw\n"
              "space origin: (0,0,0)\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + bytes(4 * 8 * 9 * 10))
    return path


def _scans(folder: Path, names: list[str]) -> Path:
    image, _, affine = phantom()
    for name in names:
        save_volume(folder / name, image, affine)
    return folder


def test_prepare_2d_scan_and_singular_nrrd_are_one_line_and_skippable(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    raw = _scans(tmp_path / "raw", ["good.nii.gz"])
    flat = raw / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10), np.float32), np.eye(4)), str(flat))
    code, err = run_cli(["prepare", raw, "--out", tmp_path / "c1"], capsys)
    assert code == 2
    _one_line(err, flat, "2D image (shape (10, 10)) where a 3D volume is expected")
    flat.unlink()
    bent = _nrrd(raw / "bent.nrrd", "(1,0,0) (1,0,0) (0,0,1)")
    code, err = run_cli(["prepare", raw, "--out", tmp_path / "c2"], capsys)
    assert code == 2
    _one_line(err, bent, "scan has an invalid (singular or non-finite) affine / direction matrix")
    code, err = run_cli(["prepare", raw, "--out", tmp_path / "c3", "--skip-bad"], capsys)
    assert code == 0 and f"skipped bent: {bent}: scan has an invalid" in err
    assert open_cache(tmp_path / "c3").ids == ["good"]


@pytest.mark.parametrize("kind", ["dataset.json", "list.csv"])
def test_non_utf8_dataset_files_are_one_line(tmp_path, capsys, kind):
    _scans(tmp_path / "raw" / "imagesTr", ["é_0000.nii.gz"])
    if kind == "dataset.json":
        path = tmp_path / "raw" / "dataset.json"
        path.write_bytes('{"channel_names": {"0": "CT"}, "labels": {"background": 0}, "name": "Leber é"}'
                         .encode("latin-1"))
    else:
        path = tmp_path / "raw" / "list.csv"
        path.write_bytes("image\nimagesTr/é_0000.nii.gz\n".encode("latin-1"))
    code, err = run_cli(["prepare", path, "--out", tmp_path / "cache"], capsys)
    assert code == 2
    _one_line(err, path, f"not UTF-8 text (byte {path.read_bytes().index(0xE9)}: b'\\xe9'); save it as UTF-8")


MSD = {"name": "T", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ1", "2": "organ2"},
       "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}], "test": []}


@pytest.mark.parametrize("variant,problem", [
    ({"labels": {"background": 0, "organ1": 1, "organ2": 2}}, None),  # nnU-Net style labels are understood
    ({"modality": {"CT": "CT"}}, '"modality" keys must be the channel indices "0", "1", ..., got [\'CT\']'),
    ({"training": [{"image": 123}]}, 'training entry 0: "image" must be a file path (a string), got 123'),
    ({"labels": {"organ1": "one"}}, '"labels" must map names to integer values; \'organ1\' has "one"'),
    ({"training": [], "channel_names": {"0": "CT"}, "dataset": {"a": {"label": "labelsTr/a.nii.gz"}}},
     '"dataset" entry \'a\' needs an "images" list of paths'),
])
def test_msd_dataset_json_variants(tmp_path, capsys, variant, problem):
    import json

    root = tmp_path / "raw"
    image, label, affine = phantom()
    save_volume(root / "imagesTr" / "a.nii.gz", image, affine)
    save_volume(root / "labelsTr" / "a.nii.gz", label, affine)
    meta = {**MSD, **variant}
    if "dataset" in variant:
        del meta["training"]
    (root / "dataset.json").write_text(json.dumps(meta))
    code, err = run_cli(["prepare", root, "--out", tmp_path / "cache"], capsys)
    if problem is None:
        assert code == 0 and open_cache(tmp_path / "cache").label_names == {0: "background", 1: "organ1",
                                                                              2: "organ2"}
    else:
        assert code == 2
        _one_line(err, root / "dataset.json", problem)


def test_out_that_is_a_file_is_one_line(phantom_cache, tmp_path, capsys):
    raw = _scans(tmp_path / "raw", ["a.nii.gz"])
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["prepare", raw, "--out", tmp_path / "file"], capsys)
    assert code == 2
    _one_line(err, tmp_path / "file", "is a file, not a folder; choose a folder for the output")
    code, err = run_cli(["pretrain", phantom_cache, "--out", tmp_path / "file", "--quiet"], capsys)
    assert code == 2
    _one_line(err, tmp_path / "file", "is a file, not a folder; choose a folder for the output")


@pytest.mark.parametrize("errno_,problem,modality,folder", [
    (28, "no space left on the device", "ct", ".stats"),  # CT: the statistics samples are the first file written
    (30, "the folder is on a read-only file system", "mr", "cases"),
    (28, "no space left on the device", "mr", "cases"),
])
def test_prepare_full_disk_or_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch, errno_, problem, modality,
                                                           folder):
    raw = _scans(tmp_path / "raw", ["a.nii.gz"])
    real = prepare_mod.np.save

    def save(path, arr, *a, **k):
        real(path, arr[: len(arr) // 2], *a, **k)  # part of the file, then the disk is full / read-only
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(prepare_mod.np, "save", save)
    code, err = run_cli(["prepare", raw, "--out", tmp_path / "cache", "--workers", 1, "--modality", modality], capsys)
    assert code == 2
    _one_line(err, tmp_path / "cache" / folder, f"cannot write: {problem}")
    assert list((tmp_path / "cache").rglob(".tmp-*")) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mhd"])
def test_save_volume_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch, suffix):
    """predict writes segmentations with save_volume: a full disk is one line and leaves no ``.tmp-*``."""
    import nibabel as nib
    import SimpleITK as sitk

    image, _, affine = phantom()
    target = tmp_path / "out" / f"seg{suffix}"
    save_volume(target, image, affine)
    before = target.read_bytes()

    def full(_img, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    monkeypatch.setattr(sitk, "WriteImage", full)
    with pytest.raises(InputError, match="cannot write: no space left on the device") as exc:
        save_volume(target, image * 2, affine)
    assert exc.value.where == str(target)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [target.name] + (["seg.raw"] if suffix == ".mhd" else []))
    assert target.read_bytes() == before


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_last_one(phantom_cache, tmp_path, monkeypatch):
    real = run_mod.save_file

    def save_file(tensors, path):
        if "step_0000004" in str(Path(path).parent.name) or ".tmp-step_0000004" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(run_mod, "save_file", save_file)
    out = tmp_path / "run"
    with pytest.raises(InputError) as exc:
        pretrain(phantom_cache, out, _cfg(), progress=False)
    assert exc.value.line() == f"{out / 'checkpoints' / 'step_0000004'}: cannot write: no space left on the device"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert run_mod.RunDir(out).latest_step() == 2


# ----------------------------------------------------------------------------- 6. ITK's warnings


def test_plain_folder_stderr_has_no_itk_warnings(tmp_path, capfd):
    raw = _scans(tmp_path / "raw", ["a.nii.gz"])
    (raw / "notes").mkdir()
    (raw / "notes" / "readme.txt").write_text("not a scan")  # GDCM looks for a DICOM series here
    _nrrd(raw / "bent.nrrd", "(1,0,0) (1,0,0) (0,0,1)")
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(raw), "--out", str(tmp_path / "cache")])
    err = capfd.readouterr().err
    assert exc.value.code == 2
    assert err == f"error: {raw / 'bent.nrrd'}: scan has an invalid (singular or non-finite) affine / direction" \
                  " matrix\n"


# ----------------------------------------------------------------------------- 7. case ids


def test_non_ascii_names_keep_distinct_ids(tmp_path):
    from volcontrast.data.dataset import open_dataset

    raw = _scans(tmp_path / "raw", ["肝臓.nii.gz", "肺.nii.gz", "病例_1.nii.gz", "★.nii.gz", "☆.nii.gz",
                                    "a b.nii.gz", "a_b.nii.gz"])
    ids = sorted(c.id for c in open_dataset(raw).cases)
    assert len(set(ids)) == 7
    assert {"肝臓", "肺", "病例_1", "a_b"} <= set(ids)
    symbols = [i for i in ids if i.startswith("case-")]
    assert len(symbols) == 2 and all(len(i) == 15 for i in symbols)
    assert sorted(c.id for c in open_dataset(raw).cases) == ids  # stable
    report = prepare_dataset(raw, tmp_path / "cache", workers=1, progress=False)
    assert sorted(report.prepared) == ids and open_cache(tmp_path / "cache").image("肝臓").shape[0] == 1


# ----------------------------------------------------------------------------- 8. non-finite weights


def test_non_finite_weights_are_refused(phantom_cache, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    pretrain(phantom_cache, out, _cfg(steps=2), progress=False)
    weights = load_file(str(out / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name][..., 0] = float("nan")
    os.unlink(out / "model.safetensors")
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(InputError) as exc:
        run_mod.load_weights(out)
    assert exc.value.line() == (f"{out / 'model.safetensors'}: tensor {name!r} has NaN or infinite values (the run"
                                " diverged?); these weights are not usable")


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(phantom_cache, tmp_path, monkeypatch):
    from volcontrast.engine import pretrain as pretrain_mod

    real_fit = pretrain_mod.fit

    def fit(task, *a, **k):
        real_after = task.after_step

        def after_step(step):
            real_after(step)
            if step == 2:  # the weights blow up after step 3's update
                with torch.no_grad():
                    next(task.module.parameters()).fill_(float("inf"))

        task.after_step = after_step
        return real_fit(task, *a, **k)

    monkeypatch.setattr(pretrain_mod, "fit", fit)
    out = tmp_path / "run"
    # the trainer stops at the first logged row whose loss is not finite (step 4), before any checkpoint of it
    with pytest.raises(InputError, match=r"training diverged: the loss is NaN or infinite at step 4; the last good"
                                         r" checkpoint \(step 2\) is kept"):
        pretrain(phantom_cache, out, _cfg(), progress=False)
    assert run_mod.RunDir(out).latest_step() == 2
    run_mod.load_weights(out)  # finite


# ----------------------------------------------------------------------------- 9. umask


def test_written_files_honour_the_umask(tmp_path):
    from volcontrast.utils.files import atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        save_volume(tmp_path / "s.nii.gz", *phantom()[::2])
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "s.nii.gz").stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------- 9. containment


@pytest.mark.parametrize("layout", ["msd", "csv"])
def test_listed_files_outside_the_dataset_folder_are_refused(tmp_path, capsys, layout):
    import json

    image, _, affine = phantom()
    save_volume(tmp_path / "elsewhere" / "x.nii.gz", image, affine)
    root = tmp_path / "raw"
    root.mkdir()
    outside = "../elsewhere/x.nii.gz"
    if layout == "msd":
        listed = root / "dataset.json"
        listed.write_text(json.dumps({**MSD, "training": [], "test": [outside]}))
        what = "test entry 0"
    else:
        listed = root / "list.csv"
        listed.write_text(f"image\n{outside}\n")
        what = 'row 1: "image"'
    code, err = run_cli(["prepare", listed, "--out", tmp_path / "cache"], capsys)
    assert code == 2
    _one_line(err, listed, f"{what} {outside!r} is outside the dataset folder {root}; use --allow-outside if that"
                           " is intended")
    if layout == "csv":  # an absolute path elsewhere, too
        listed.write_text(f"image\n{tmp_path / 'elsewhere' / 'x.nii.gz'}\n")
        code, err = run_cli(["prepare", listed, "--out", tmp_path / "cache"], capsys)
        assert code == 2 and "is outside the dataset folder" in err
    code, err = run_cli(["prepare", listed, "--out", tmp_path / "cache", "--allow-outside", "--workers", 1], capsys)
    assert code == 0 and open_cache(tmp_path / "cache").ids == ["x"]


def test_a_read_only_run_folder_is_one_line(phantom_cache, tmp_path, capsys, monkeypatch):
    """(Simulated: the tests may run as root, for whom permission bits do not stop a write.)"""
    from volcontrast.utils import files as files_mod

    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(files_mod.os, "open", read_only)
    code, err = run_cli(["pretrain", phantom_cache, "--out", tmp_path / "ro", "--quiet"], capsys)
    assert code == 2
    _one_line(err, tmp_path / "ro", "cannot write: the folder is on a read-only file system")


def test_an_unknown_yaml_key_names_the_file(phantom_cache, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("stepz: 3\n")
    code, err = run_cli(["pretrain", phantom_cache, "--out", tmp_path / "run", "--config", tmp_path / "c.yaml",
                         "--quiet"], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'c.yaml'}: config: unknown key(s) ['stepz']; known:")
    assert err.count("\n") == 1


@pytest.mark.parametrize("verb,augment,where,problem", [
    ("pretrain", "{remap_prob: 1.5}", "augment.remap_prob", "must be a probability in [0, 1], got 1.5"),
    ("finetune", "{remap_points: -1}", "augment.remap_points", "must be >= 0, got -1"),
])
def test_a_bad_augmentation_setting_is_one_line(phantom_cache, tmp_path, capsys, verb, augment, where, problem):
    (tmp_path / "c.yaml").write_text(f"augment: {augment}\n")
    code, err = run_cli([verb, phantom_cache, "--out", tmp_path / "run", "--config", tmp_path / "c.yaml", "--quiet"],
                        capsys)
    assert code == 2 and err == f"error: {where}: {problem}\n"
    assert not (tmp_path / "run").exists()


_WORKER_SCRIPT = r'''
import os, sys, time
from pathlib import Path


def nap(cache, folder, *, progress, log):
    Path(folder, f"{os.getpid()}.pid").write_text("")
    time.sleep(120)
    return os.getpid(), []


if __name__ == "__main__":
    from volcontrast.bench.benchmark import _Workers
    from volcontrast.data.cache import Cache

    with _Workers(Cache(sys.argv[1]), 2) as workers:
        for _ in workers.run([(nap, (sys.argv[2],)), (nap, (sys.argv[2],))], False, print):
            pass
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_benchmark_workers_stop_when_the_benchmark_is_killed(phantom_cache, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "script.py").write_text(_WORKER_SCRIPT)
    (tmp_path / "pids").mkdir()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(phantom_cache), str(tmp_path / "pids")])
    try:
        deadline = time.time() + 120  # two spawned workers import torch
        while len(list((tmp_path / "pids").iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.2)
        pids = [int(p.stem) for p in (tmp_path / "pids").iterdir()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)  # no handler can run: only the workers' own watch stops them
        proc.wait()
        deadline = time.time() + 30  # they look every 0.5 s
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        proc.kill()
