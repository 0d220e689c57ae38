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

    def save(self, model, model_json, state, step, keep):
        calls["armed"] = step == 4
        try:
            return real_save(self, model, model_json, state, step, keep)
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
    def save(self, model, model_json, state, step, keep):
        armed[0] = step == 4
        return real_save(self, model, model_json, state, step, keep)
    os.replace, run_mod.RunDir.save = replace, save
    pretrain({cache!r}, {out!r}, resolve_pretrain_config("cpu-tiny", {tiny!r}, {{}}), progress=False)
""")


@pytest.mark.parametrize("nth", [2, 4])
def test_sigkill_inside_the_checkpoint_resumes_exactly(phantom_cache, full_run, tmp_path, nth):
    """A real SIGKILL before the commit (nth=2) and in the middle of publishing (nth=4): stale ``.tmp-*`` and
    uncommitted step folders are removed and the resumed run equals the uninterrupted one."""
    script = KILLER.format(src=SRC, tests=TESTS, nth=nth, cache=str(phantom_cache), out=str(tmp_path / "cut"),
                           tiny=TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
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
