"""Small hand-made scans for tests (fast, with known geometry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volcontrast.io import orientation_affine, save_volume


def phantom(shape=(20, 18, 16), spacing=(2.0, 2.0, 3.0), origin=(-20.0, -18.0, -24.0), seed=0, modality="ct"):
    """A body ellipsoid with two labelled organs, in RAS canonical layout.

    Returns (image float32, label uint8, affine). CT in HU (air -1000, body 40, organ 1 80, organ 2 200).
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    world = idx * spacing + origin
    r_body = ((world / (np.array(shape) * spacing * 0.42)) ** 2).sum(1)
    body = (r_body < 1).reshape(shape)
    organ1 = (((world - [-5, 0, 0]) / [6, 6, 8]) ** 2).sum(1).reshape(shape) < 1
    organ2 = (((world - [8, 2, 4]) / [4, 5, 6]) ** 2).sum(1).reshape(shape) < 1
    label = np.zeros(shape, np.uint8)
    label[organ1 & body] = 1
    label[organ2 & body] = 2
    if modality == "ct":
        image = np.full(shape, -1000.0, np.float32)
        image[body] = 40
        image[label == 1] = 80
        image[label == 2] = 200
        image += rng.normal(0, 10, shape).astype(np.float32)
    else:
        image = np.full(shape, 5.0, np.float32)
        image[body] = 300
        image[label == 1] = 500
        image[label == 2] = 150
        image += np.abs(rng.normal(0, 10, shape)).astype(np.float32)
    return image.astype(np.float32), label, affine


def write_nnunet(root: Path, n: int = 3, orientations=("RAS", "LPS", "PSL"), modality="ct", shape=(20, 18, 16),
                 spacings=None) -> Path:
    """An nnU-Net v2 raw dataset of ``n`` phantoms stored in varying orientations."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        spacing = spacings[i] if spacings else (2.0, 2.0, 3.0)
        image, label, affine = phantom(shape, spacing, seed=i, modality=modality)
        codes = orientations[i % len(orientations)]
        save_volume(root / "imagesTr" / f"case{i:02d}_0000.nii.gz", image, affine, like=orientation_affine(codes))
        save_volume(root / "labelsTr" / f"case{i:02d}.nii.gz", label, affine, like=orientation_affine(codes))
    meta = {
        "channel_names": {"0": "CT" if modality == "ct" else "T1"},
        "labels": {"background": 0, "organ1": 1, "organ2": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_dicom_series(folder: Path, array_xyz: np.ndarray, spacing=(1.0, 1.5, 2.0), origin=(0.0, 0.0, 0.0)) -> None:
    """Write an int16 (X, Y, Z) array as an axial DICOM series (LPS geometry as DICOM defines it)."""
    from volcontrast.io.readers import preserve_locale

    with preserve_locale():
        _write_dicom_series(folder, array_xyz, spacing, origin)


def _write_dicom_series(folder: Path, array_xyz: np.ndarray, spacing, origin) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.transpose(array_xyz.astype(np.int16), (2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.99"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.98",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


class Interrupt(Exception):
    """Raised by :func:`pretrain_interrupted` to stop a run between checkpoints."""


def pretrain_interrupted(cache, out, config, at_step: int) -> None:
    """Run ``pretrain`` and stop it with :class:`Interrupt` when the log reaches ``at_step`` (a crash mid-run)."""
    from volcontrast.engine import pretrain as pretrain_mod

    def stop(row):
        if row["step"] == at_step:
            raise Interrupt

    real_fit = pretrain_mod.fit
    pretrain_mod.fit = lambda *a, **k: real_fit(*a, **k, on_log=stop)
    try:
        pretrain_mod.pretrain(cache, out, config, progress=False)
    except Interrupt:
        return
    finally:
        pretrain_mod.fit = real_fit
    raise AssertionError(f"the run ended before step {at_step}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_pretrain(cache, out, *args: str, timeout_s: float = 300.0):
    """``torchrun --nproc_per_node 2 -m volcontrast pretrain CACHE --out OUT --quiet ARGS`` on CPU (gloo, one thread
    per rank); returns the finished ``subprocess.CompletedProcess`` (text output captured)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "volcontrast", "pretrain", str(cache), "--out", str(out), "--quiet", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def launch_two_gloo_ranks(script: str, out_dir: Path, timeout_s: float = 120.0) -> list[dict]:
    """Run ``python script out_dir`` as ranks 0 and 1 of a gloo group (torchrun's environment variables) and
    load what each rank saved as ``out_dir/rank<r>.pt``. Retries once if the free port was taken meanwhile."""
    import os
    import subprocess
    import sys

    import torch

    logs: list[str] = []
    for _attempt in range(2):
        port = free_port()
        procs = []
        for r in range(2):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
            procs.append(subprocess.Popen([sys.executable, script, str(out_dir)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"DDP workers did not finish in {timeout_s} s") from None
        if all(p.returncode == 0 for p in procs):
            return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
        if not any("ddress already in use" in log for log in logs):
            break
    raise AssertionError("DDP worker failed:\n" + "\n----\n".join(logs))
