"""The run folder (DESIGN.md contract) and its checkpoints.

``RUN/config.yaml``            the resolved config
``RUN/model.safetensors``      latest weights (safetensors; never pickles)
``RUN/model.json``             architecture, preprocessing, method, step, version
``RUN/trainer_state.pt``       optimizer state + step for ``--resume`` (tensors/containers only:
                               loaded with ``torch.load(weights_only=True)``)
``RUN/checkpoint.json``        the commit record: step, the step folder, and each file's size and sha256
``RUN/log.csv``                one row per logged step (``step``, ``loss``, ``lr``, ...)
``RUN/tb/``                    TensorBoard events
``RUN/checkpoints/step_N/``    the step folders (same three files + their checkpoint.json); the latest one and
                               those kept every ``keep_every`` steps stay, the others go
``RUN/.lock``                  advisory lock held by the process writing the run (holds its PID)

A checkpoint is one commit: its files are written into a temporary folder that is renamed to
``checkpoints/step_N``, then ``RUN/checkpoint.json`` (naming that folder) is replaced atomically — that rename is
the commit. Only then are the top-level files published (hard links to the step folder's files). ``--resume``
reads the committed step folder only, after checking every file's size and checksum, so a kill at any moment
resumes from the last complete checkpoint; stale ``.tmp-*`` files and uncommitted step folders are removed.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from volcontrast import __version__
from volcontrast.errors import InputError
from volcontrast.nets.base import alias_map, deduplicated_state_dict
from volcontrast.utils.files import (
    as_input_error,
    atomic_write_bytes,
    atomic_write_json,
    check_digest,
    claim_folder,
    file_digest,
    fsync_file,
    read_json,
    release_folder,
    remove_quietly,
    remove_stale_tmp,
    umask,
)

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, MODEL_JSON)  # publication order: model.json last


def _write_checkpoint_files(folder: Path, model: torch.nn.Module, model_json: dict[str, Any],
                            trainer_state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Write (and fsync) the checkpoint's files into ``folder`` under their final names; their digests."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in deduplicated_state_dict(model).items()}
    save_file(tensors, str(folder / MODEL_FILE))
    fsync_file(folder / MODEL_FILE)
    if trainer_state is not None:
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        with open(folder / STATE_FILE, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
    import json

    with open(folder / MODEL_JSON, "w", encoding="utf-8") as f:
        f.write(json.dumps({"volcontrast_version": __version__, **model_json}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return {name: file_digest(folder / name) for name in CHECKPOINT_FILES if (folder / name).is_file()}


def _write_step_folder(final: Path, model: torch.nn.Module, model_json: dict[str, Any],
                       trainer_state: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Build a complete checkpoint folder in a temporary sibling and rename it to ``final`` (replacing an
    uncommitted leftover of the same name). Returns its record (``checkpoint.json``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        files = _write_checkpoint_files(tmp, model, model_json, trainer_state)
        record = {"step": model_json.get("step"), **extra, "files": files}
        atomic_write_json(tmp / CHECKPOINT_JSON, record)
        if final.exists():
            remove_quietly(final)
        os.replace(tmp, final)
        tmp = None
    except OSError as exc:
        raise as_input_error(exc, final) from None
    finally:
        if tmp is not None:
            remove_quietly(tmp)
    return record


def _publish(src: Path, folder: Path, record: dict[str, Any]) -> None:
    """Make ``folder/<name>`` the committed ``src/<name>`` for each file (hard links, each swapped in atomically)."""
    for name in CHECKPOINT_FILES:
        if name not in record["files"]:
            continue
        target = folder / name
        tmp = folder / f".tmp-{name}-{os.getpid()}"
        remove_quietly(tmp)
        try:
            try:
                os.link(src / name, tmp)
            except OSError:  # no hard links here (some network file systems): copy
                shutil.copyfile(src / name, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            remove_quietly(tmp)
            raise as_input_error(exc, target) from None


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, model_json: dict[str, Any],
                    trainer_state: dict[str, Any] | None) -> Path:
    """A self-contained checkpoint folder: weights, trainer state, ``model.json`` and ``checkpoint.json``.

    The files are written into a temporary step folder that is renamed into ``folder/checkpoints/``; replacing
    ``folder/checkpoint.json`` commits it; the top-level files are then published (see the module docstring).
    """
    folder = Path(folder)
    step = int(model_json.get("step", 0))
    _commit(folder, model, {**model_json, "step": step}, trainer_state, step, keep=False)
    return folder


def _commit(root: Path, model: torch.nn.Module, model_json: dict[str, Any], trainer_state: dict[str, Any] | None,
            step: int, keep: bool) -> dict[str, Any]:
    previous = _read_record(root)
    bad = _non_finite(deduplicated_state_dict(model))
    if bad:  # a diverged run: stop, keeping the last good checkpoint
        kept = f"the last good checkpoint (step {previous.get('step')}) is kept" if previous else "nothing was saved"
        raise InputError(root, f"training diverged: weight {bad!r} is NaN or infinite at step {step}; {kept};"
                               " lower the learning rate (or enable grad_clip) and start again")
    name = f"step_{step:07d}"
    record = _write_step_folder(root / "checkpoints" / name, model, model_json, trainer_state,
                                {"folder": f"checkpoints/{name}", "keep": keep})
    atomic_write_json(root / CHECKPOINT_JSON, record)  # the commit
    _publish(root / record["folder"], root, record)
    if previous is not None and previous.get("folder") != record["folder"] and not previous.get("keep"):
        remove_quietly(root / str(previous["folder"]))
    return record


def _read_record(root: Path) -> dict[str, Any] | None:
    path = root / CHECKPOINT_JSON
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or "folder" not in record:
        raise InputError(path, "not a checkpoint record (no folder/files)")
    return record


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise InputError(path, "no model weights here (is this a volcontrast run folder?)")
    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InputError(path, f"cannot read weights: {' '.join(str(exc).split())}") from None
    bad = _non_finite(weights)
    if bad:
        raise InputError(path, f"tensor {bad!r} has NaN or infinite values (the run diverged?); these weights are"
                               " not usable")
    return weights


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinite value, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Strict load of a (deduplicated) state dict: every tensor of ``module`` must be covered, up to aliases."""
    target = module.state_dict()
    aliases = alias_map(target)
    covered = {aliases[k] for k in state if k in aliases}
    missing = [k for k in target if aliases[k] not in covered]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        raise InputError(where, f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]},"
                         f" shape-mismatched {mismatched[:3]}")
    module.load_state_dict(state, strict=False)


def load_model_json(folder: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(folder) / MODEL_JSON)


def load_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise InputError(path, "no trainer state to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot read trainer state: {' '.join(str(exc).split())}") from None


class CSVLog:
    """Append-only ``log.csv`` with a fixed header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: str | os.PathLike, columns: list[str], resume_step: int | None = None):
        self.path = Path(path)
        self.columns = list(columns)
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= resume_step]
            self._rewrite(rows)
        elif not self.path.exists() or resume_step is None:
            self._rewrite([])

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def append(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                writer.writerow({k: _fmt(v) for k, v in row.items()})
        except OSError as exc:
            raise as_input_error(exc, self.path) from None


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_log(path: str | os.PathLike) -> list[dict[str, float]]:
    """``log.csv`` rows as dicts of floats (empty cells omitted)."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return out


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


class RunDir:
    """Paths and checkpoint bookkeeping of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def exists(self) -> bool:
        """Whether the folder holds a committed checkpoint (or a model.json of a run from before checkpoint.json)."""
        return (self.root / CHECKPOINT_JSON).is_file() or (self.root / MODEL_JSON).is_file()

    def latest_step(self) -> int | None:
        record = _read_record(self.root)
        if record is not None:
            return int(record.get("step") or 0)
        if not self.exists():
            return None
        return int(load_model_json(self.root).get("step", 0))

    def committed(self) -> Path | None:
        """The folder of the last committed checkpoint, verified (every file's size and checksum), with the
        top-level files re-published from it; None when the run has no checkpoint yet.

        Raises:
            InputError: the committed step folder is damaged (a file missing, truncated or changed).
        """
        record = _read_record(self.root)
        if record is None:
            if (self.root / MODEL_JSON).is_file() and (self.root / STATE_FILE).is_file():
                return self.root  # a run folder written before checkpoint.json existed
            return None
        folder = self.root / str(record["folder"])
        for name, digest in record["files"].items():
            why = check_digest(folder / name, digest)
            if why:
                raise InputError(folder / name, f"the checkpoint of step {record.get('step')} is damaged: the file"
                                                f" {why}; resume from a kept snapshot in {self.checkpoints}")
        if _main_rank():
            for name, digest in record["files"].items():
                if check_digest(self.root / name, digest, hash=False) or not os.path.samefile(
                        self.root / name, folder / name):
                    _publish(folder, self.root, record)  # a kill during the last publication
                    break
        return folder

    def _clean(self) -> None:
        """Remove what a killed writer left: ``.tmp-*`` files and step folders that are neither committed nor kept."""
        remove_stale_tmp(self.root)
        remove_stale_tmp(self.checkpoints)
        record = _read_record(self.root)
        current = str(record["folder"]) if record else None
        committed_step = int(record.get("step") or 0) if record else 0
        if not self.checkpoints.is_dir():
            return
        for d in self.checkpoints.iterdir():
            if not d.is_dir() or not d.name.startswith("step_") or f"checkpoints/{d.name}" == current:
                continue
            own = d / CHECKPOINT_JSON
            if not own.is_file():
                continue  # a snapshot written before checkpoint.json existed: keep it
            try:
                mine = read_json(own)
            except InputError:
                mine = {}
            uncommitted = int(mine.get("step") or 0) > committed_step  # renamed into place, never committed
            if uncommitted or not mine.get("keep"):
                remove_quietly(d)

    def open_config(self, cls: type, config: Any, resume: bool, steps: int | None) -> Any:
        """The config a run starts or continues with: its saved ``config.yaml`` on resume (``steps`` may
        extend it), else ``config`` — refusing a folder that already holds a run (nothing is overwritten).

        The main process claims the folder first (an exclusive lock held until it exits): a second writer stops
        with an error naming the holder's PID. A run killed before its first checkpoint resumes from step 0.
        """
        from volcontrast.config import from_dict, load_yaml

        if _main_rank():
            claim_folder(self.root)
        elif self.root.exists() and not self.root.is_dir():
            raise InputError(self.root, "is a file, not a folder; choose a folder for the output")
        has_config = (self.root / "config.yaml").is_file()
        if resume:
            if not has_config:
                raise InputError(self.root, "nothing to resume here (no config.yaml)")
            try:
                config = from_dict(cls, load_yaml(self.root / "config.yaml"), where=str(self.root / "config.yaml"))
            except ValueError as exc:
                raise InputError(self.root / "config.yaml", str(exc)) from None
            if _main_rank():
                self._clean()
                if not self.exists():
                    print(f"note: {self.root} has no checkpoint yet (the run stopped before its first one);"
                          " starting it again from step 0", file=sys.stderr)
        elif self.exists():
            raise InputError(self.root, "already holds a run; use --resume to continue it or choose another --out")
        elif has_config:
            raise InputError(self.root, "holds a run that stopped before its first checkpoint; use --resume to start"
                                        " it again from step 0, or choose another --out")
        config = (config or cls()).validate()
        if steps is not None:
            config.steps = steps
        return config

    def save(self, model: torch.nn.Module, model_json: dict[str, Any], trainer_state: dict[str, Any], step: int,
             keep: bool, final: bool = False) -> None:
        """Commit the checkpoint of ``step`` (one atomic rename of ``checkpoint.json``); ``keep`` keeps its step
        folder as a snapshot after later checkpoints; after the ``final`` one the folder's lock is released."""
        _commit(self.root, model, {**model_json, "step": step}, trainer_state, step, keep)
        if final:
            release_folder(self.root)

    def prune(self, keep_every: int) -> None:
        """Remove snapshot folders that are not multiples of ``keep_every`` (never the committed one)."""
        if not self.checkpoints.is_dir():
            return
        record = _read_record(self.root)
        current = str(record["folder"]) if record else None
        for d in self.checkpoints.iterdir():
            if f"checkpoints/{d.name}" == current:
                continue
            if d.name.startswith("step_") and (keep_every <= 0 or int(d.name[5:]) % keep_every):
                shutil.rmtree(d, ignore_errors=True)
