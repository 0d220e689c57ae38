"""Atomic writes: write to a temporary name in the same folder, then rename over the target.

A reader (or a crash) never sees a half-written file: it sees the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{p.name}-", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic(path, write)


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Call ``save(tmp_path)`` (e.g. ``safetensors.torch.save_file``), then rename to ``path``."""
    return _atomic(path, save)


def read_json(path: str | os.PathLike) -> Any:
    from volcontrast.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(p, f"not valid JSON: {exc}") from None


def stable_hash(data: Any) -> str:
    """A short hex digest of JSON-serialisable ``data`` (key order independent)."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]
