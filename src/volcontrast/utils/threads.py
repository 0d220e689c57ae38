"""How many CPU threads this process should use, and applying that to torch (and DataLoader workers).

On a shared machine (other jobs, SLURM, containers) the default of one torch thread per *physical* core of the
machine oversubscribes: the process may only run on a subset of the cores (``os.sched_getaffinity``) or only a
fraction of their time (cgroup ``cpu.max`` quota), and OpenMP threads that spin while waiting at a barrier burn
the CPU time the one thread still working needs. Measured on a 2-core machine with one competing busy process per
core (benchmarks/RESULTS.md, "Shared machines"), the spinning alone doubled the step time. So:

- :func:`available_cpus`: the CPUs this process may use = min(affinity set, ceil(cgroup quota / period));
- :func:`default_threads`: ``OMP_NUM_THREADS`` when set (the user's word), else :func:`available_cpus`;
- :func:`configure_threads`: sets torch's intra-op threads (and, if still possible, inter-op threads);
- :func:`set_passive_wait`: ``OMP_WAIT_POLICY=PASSIVE`` unless the user set one (must run before torch is
  imported; the command line does it first thing);
- :func:`worker_init`: a DataLoader ``worker_init_fn`` that gives each worker one thread (workers add
  processes, never threads).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "available_cpus",
    "cgroup_cpu_limit",
    "configure_threads",
    "default_threads",
    "set_passive_wait",
    "thread_report",
    "worker_init",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Folders that may hold this process's CPU limits: its own cgroup (v2 unified or v1 ``cpu`` controller)
    and the mount root (inside a container the root *is* the process's cgroup)."""
    dirs: list[Path] = []
    text = _read(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            dirs.append(root / rel)
        elif "cpu" in controllers.split(","):  # v1: cpu or cpu,cpuacct
            for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                dirs.append(root / name / rel)
                dirs.append(root / name)
    dirs.append(root)
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def cgroup_cpu_limit(root: str | os.PathLike = CGROUP_ROOT,
                     proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited or unknown.

    Reads cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) or v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (quota -1 = unlimited). The smallest limit found along the candidate folders wins.
    """
    root = Path(root)
    limits: list[float] = []
    for d in _own_cgroup_dirs(root, Path(proc_cgroup)):
        text = _read(d / "cpu.max")
        if text:
            fields = text.split()
            if len(fields) >= 2 and fields[0] != "max":
                try:
                    quota, period = float(fields[0]), float(fields[1])
                except ValueError:
                    quota, period = -1.0, 0.0
                if quota > 0 and period > 0:
                    limits.append(quota / period)
            continue
        quota_s, period_s = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota_s and period_s:
            try:
                quota, period = float(quota_s), float(period_s)
            except ValueError:
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
    return min(limits) if limits else None


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_cpus(*, affinity: int | None = None, quota: float | str | None = "read") -> int:
    """CPUs this process may use: the affinity set, capped by the cgroup quota rounded up (at least 1).

    ``affinity`` and ``quota`` override what is read from the system (tests; ``quota=None`` = unlimited).
    """
    n = affinity if affinity is not None else _affinity_count()
    q = cgroup_cpu_limit() if quota == "read" else quota
    if q is not None:
        n = min(n, max(1, math.ceil(float(q) - 1e-9)))
    return max(1, int(n))


def _env_threads(env: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` as a positive int (the first entry of a nested list such as ``4,2``), else None."""
    value = env.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    try:
        n = int(value.split(",")[0])
    except ValueError:
        return None
    return n if n > 0 else None


def default_threads(env: Mapping[str, str] | None = None, *, affinity: int | None = None,
                    quota: float | str | None = "read") -> int:
    """Intra-op threads to use: ``OMP_NUM_THREADS`` when set to a positive integer, else :func:`available_cpus`."""
    n = _env_threads(os.environ if env is None else env)
    return n if n is not None else available_cpus(affinity=affinity, quota=quota)


def set_passive_wait() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set: idle OpenMP threads sleep instead of spinning.

    Only effective before the OpenMP runtime starts (i.e. before ``import torch``); inherited by child processes.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default :func:`default_threads`) and return the number.

    Inter-op threads are set to the same number when torch still allows it (only before its first parallel
    work). ``OMP_NUM_THREADS`` is exported so processes started later (prepare workers) follow suit.
    """
    import torch

    if threads is not None and threads < 1:
        from volcontrast.errors import InputError

        raise InputError("--threads", f"must be >= 1, got {threads}")
    n = int(threads) if threads is not None else default_threads()
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already started: keep its pool
        torch.set_num_interop_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread and one BLAS/OpenMP thread per worker process."""
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except Exception:  # threadpoolctl missing or a library it cannot control: torch's setting still holds
        pass


def thread_report() -> dict[str, object]:
    """What this process sees and uses (``volcontrast bench threads --show``)."""
    import torch

    return {
        "affinity_cpus": _affinity_count(),
        "cgroup_cpu_limit": cgroup_cpu_limit(),
        "available_cpus": available_cpus(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
