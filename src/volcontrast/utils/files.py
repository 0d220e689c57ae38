"""Atomic writes, output-folder locks, and the disk errors that are the user's to fix.

Atomic writes: write to a temporary name (``.tmp-*``) in the same folder, then rename over the target. A reader
(or a crash) never sees a half-written file: it sees the old file or the new one. A failed write (a full disk,
a read-only folder) removes its temporary file and raises :class:`~volcontrast.errors.InputError` naming the
target. Written files get the usual permissions (``0o666`` less the umask), like a plain ``open``.

Folder locks: :func:`claim_folder` holds an exclusive advisory ``fcntl.flock`` on ``FOLDER/.lock`` (which records
the holder's PID) for the rest of the process, so a second writer to the same run folder or cache stops with
"in use by ... PID N" instead of interleaving with the first.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"

# errors a user fixes by freeing space, changing permissions or choosing another folder (-> exit 2, one line)
_USER_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "permission denied (read-only folder?)",
    errno.EPERM: "operation not permitted (read-only folder?)",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EEXIST: "a file is in the way",
}


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error_problem(exc: OSError) -> str | None:
    """The one-line problem for an OSError the user can fix (full disk, read-only folder, ...), else None."""
    return _USER_ERRNOS.get(exc.errno) if isinstance(exc, OSError) else None


def as_input_error(exc: OSError, where: str | os.PathLike) -> Exception:
    """``InputError(where, ...)`` for a user-fixable OSError (see :func:`os_error_problem`), else ``exc`` itself."""
    from volcontrast.errors import InputError

    problem = os_error_problem(exc)
    if problem is None:
        return exc
    return InputError(where, f"cannot write: {problem}")


def remove_quietly(path: str | os.PathLike) -> None:
    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    p = Path(path)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{p.name}-", suffix=suffix, dir=p.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; a written file gets what open() would give it
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:
        raise as_input_error(exc, p) from None
    finally:
        if tmp is not None:
            remove_quietly(tmp)
    return p


def _fsynced(write: Callable[[Any], None], mode: str, **kw: Any) -> Callable[[str], None]:
    def go(tmp: str) -> None:
        with open(tmp, mode, **kw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    return go


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, _fsynced(lambda f: f.write(text), "w", encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, _fsynced(lambda f: f.write(data), "wb"))


def atomic_save(path: str | os.PathLike, save: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``save(tmp_path)`` (e.g. ``safetensors.torch.save_file``), then rename to ``path``. ``suffix`` ends
    the temporary name (for writers that pick the format from it, e.g. ``.nii.gz``)."""

    def go(tmp: str) -> None:
        save(tmp)
        fsync_file(tmp)

    return _atomic(path, go, suffix)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file (what a manifest records at write time)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def check_digest(path: str | os.PathLike, expected: dict[str, Any], hash: bool = True) -> str | None:
    """Why ``path`` differs from its recorded digest (missing, size, checksum), or None when it matches."""
    p = Path(path)
    if not p.is_file():
        return "is missing"
    size = p.stat().st_size
    if size != int(expected.get("size", -1)):
        return f"has {size} bytes, {expected.get('size')} were written"
    if hash and "sha256" in expected and file_digest(p)["sha256"] != expected["sha256"]:
        return "does not match the checksum recorded when it was written"
    return None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; InputError (naming it) if it is missing, unreadable or not UTF-8."""
    from volcontrast.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(p, f"not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r});"
                            " save it as UTF-8") from None
    except OSError as exc:
        raise InputError(p, f"cannot read: {exc.strerror or exc}") from None


def read_json(path: str | os.PathLike) -> Any:
    from volcontrast.errors import InputError

    p = Path(path)
    text = read_text(p)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(p, f"not valid JSON: {exc}") from None


def stable_hash(data: Any) -> str:
    """A short hex digest of JSON-serialisable ``data`` (key order independent)."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- locks

_HELD: dict[str, int] = {}  # resolved folder -> fd of its held .lock


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and parents); InputError when it is a file or cannot be created or written."""
    from volcontrast.errors import InputError

    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise InputError(p, "is a file, not a folder; choose a folder for the output")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(p, f"cannot create the folder: {os_error_problem(exc) or exc.strerror or exc}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(p, "cannot write: the folder is read-only")
    return p


def claim_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and hold an exclusive advisory lock on ``folder/.lock`` until this process
    exits (or :func:`release_folder`). Claiming a folder this process already holds is a no-op.

    Raises:
        InputError: ``folder`` is a file, cannot be created or written, or another process holds it (naming
            that process's PID).
    """
    import fcntl

    from volcontrast.errors import InputError

    p = ensure_folder(folder)
    key = str(p.resolve())
    if key in _HELD:
        return p
    lock = p / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise InputError(p, f"cannot write: {os_error_problem(exc) or exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _lock_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise InputError(p, f"is in use by another volcontrast process (PID {holder}); wait for it to finish"
                                " or choose another folder") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd
    return p


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def release_folder(folder: str | os.PathLike) -> None:
    """Give up the lock :func:`claim_folder` took (closing the lock file releases it)."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.tmp-*`` files/folders left in ``folder`` by a killed writer (call with the folder's lock held)."""
    p = Path(folder)
    removed = []
    if p.is_dir():
        for stale in p.glob(".tmp-*"):
            remove_quietly(stale)
            removed.append(stale)
    return removed
