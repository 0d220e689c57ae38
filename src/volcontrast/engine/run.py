"""The run folder (DESIGN.md contract) and its checkpoints.

``RUN/config.yaml``            the resolved config
``RUN/model.safetensors``      latest weights (safetensors; never pickles)
``RUN/model.json``             architecture, preprocessing, method, step, version
``RUN/trainer_state.pt``       optimizer state + step for ``--resume`` (tensors/containers only:
                               loaded with ``torch.load(weights_only=True)``)
``RUN/log.csv``                one row per logged step (``step``, ``loss``, ``lr``, ...)
``RUN/tb/``                    TensorBoard events
``RUN/checkpoints/step_N/``    snapshots kept every ``keep_every`` steps (same three files)

Every file is written atomically; a checkpoint is complete when ``model.json`` (written last) names its step.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from volcontrast import __version__
from volcontrast.errors import InputError
from volcontrast.nets.base import alias_map, deduplicated_state_dict
from volcontrast.utils.files import atomic_save, atomic_write_bytes, atomic_write_json, read_json

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
STATE_FILE = "trainer_state.pt"


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, model_json: dict[str, Any],
                    trainer_state: dict[str, Any] | None) -> Path:
    """Write weights, trainer state and (last) model.json into ``folder``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in deduplicated_state_dict(model).items()}
    atomic_save(folder / MODEL_FILE, lambda tmp: save_file(tensors, tmp))
    if trainer_state is not None:
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        atomic_write_bytes(folder / STATE_FILE, buf.getvalue())
    atomic_write_json(folder / MODEL_JSON, {"volcontrast_version": __version__, **model_json})
    return folder


def load_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise InputError(path, "no model weights here (is this a volcontrast run folder?)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InputError(path, f"cannot read weights: {' '.join(str(exc).split())}") from None


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
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writerow({k: _fmt(v) for k, v in row.items()})


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


class RunDir:
    """Paths and checkpoint bookkeeping of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def exists(self) -> bool:
        return (self.root / MODEL_JSON).is_file()

    def latest_step(self) -> int | None:
        if not self.exists():
            return None
        return int(load_model_json(self.root).get("step", 0))

    def open_config(self, cls: type, config: Any, resume: bool, steps: int | None) -> Any:
        """The config a run starts or continues with: its saved ``config.yaml`` on resume (``steps`` may
        extend it), else ``config`` — refusing a folder that already holds a run (nothing is overwritten)."""
        from volcontrast.config import from_dict, load_yaml

        if resume:
            if not (self.root / "config.yaml").is_file() or not self.exists():
                raise InputError(self.root, "nothing to resume here (no config.yaml / model.json)")
            try:
                config = from_dict(cls, load_yaml(self.root / "config.yaml"), where=str(self.root / "config.yaml"))
            except ValueError as exc:
                raise InputError(self.root / "config.yaml", str(exc)) from None
        elif (self.root / "config.yaml").exists() or self.exists():
            raise InputError(self.root, "already holds a run; use --resume to continue it or choose another --out")
        config = (config or cls()).validate()
        if steps is not None:
            config.steps = steps
        return config

    def save(self, model: torch.nn.Module, model_json: dict[str, Any], trainer_state: dict[str, Any], step: int,
             keep: bool) -> None:
        if keep:
            save_checkpoint(self.checkpoints / f"step_{step:07d}", model, {**model_json, "step": step}, trainer_state)
        save_checkpoint(self.root, model, {**model_json, "step": step}, trainer_state)

    def prune(self, keep_every: int) -> None:
        """Remove snapshot folders that are not multiples of ``keep_every``."""
        if not self.checkpoints.is_dir():
            return
        for d in self.checkpoints.iterdir():
            if d.name.startswith("step_") and (keep_every <= 0 or int(d.name[5:]) % keep_every):
                shutil.rmtree(d, ignore_errors=True)
