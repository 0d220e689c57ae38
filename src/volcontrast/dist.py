"""Small helpers for ``torch.distributed``: process-group set-up from torchrun's environment and gathers.

Every helper works without a process group (a plain single process): then ``rank() == 0``,
``world_size() == 1`` and the gathers return their input. Under ``torchrun`` call
:func:`init_distributed_from_env` once at start-up and :func:`destroy` at the end.

Gathers concatenate along dim 0 in rank order (rank 0's rows first) and accept a different number of rows
on each rank (the sizes are exchanged first); every rank receives the same tensor. Only
:func:`gather_with_grad` lets gradients flow back to the other ranks' inputs: its backward sums the
gradient of the gathered tensor over all ranks and returns this rank's rows, so that with DDP's gradient
averaging R ranks compute exactly the gradients of one process on the concatenated batch (provided the
per-rank loss is normalised by the *global* count, as :func:`volcontrast.losses.info_nce` does).

Example::

    info = init_distributed_from_env()          # no-op outside torchrun
    z_all = gather_with_grad(z)                  # (sum_r M_r, D), differentiable w.r.t. every rank's z
    ids_all = gather_no_grad(item_ids)           # (sum_r M_r,)
    ...
    destroy()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "destroy",
    "gather_no_grad",
    "gather_sizes",
    "gather_with_grad",
    "gather_with_grad_and_sizes",
    "init_distributed_from_env",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised (even with a world size of 1)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all ranks, as a new tensor (``x`` is not modified; no gradient).

    Args:
        x: any tensor with the same shape on every rank (e.g. a 0-dim loss for logging).
    """
    out = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


def gather_sizes(n: int, device: torch.device | str | None = None) -> list[int]:
    """The row counts of all ranks, in rank order (``[n]`` without a process group).

    Args:
        n: this rank's row count.
        device: where the exchange tensor lives (must be a CUDA device for the NCCL backend).
    """
    if world_size() <= 1:
        return [int(n)]
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(s) for s in torch.cat(out).tolist()]  # one host sync


def _all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate ``x`` (N_r, ...) of every rank along dim 0 (no autograd); ``sizes`` from gather_sizes."""
    is_bool = x.dtype == torch.bool
    src = x.to(torch.uint8) if is_bool else x  # gloo does not move bool tensors
    src = src.contiguous()
    n_max = max(sizes)
    if src.shape[0] < n_max:  # pad so that every rank sends the same shape
        pad = src.new_zeros((n_max - src.shape[0], *src.shape[1:]))
        src = torch.cat([src, pad], dim=0)
    parts = [torch.empty_like(src) for _ in sizes]
    dist.all_gather(parts, src)
    if all(s == n_max for s in sizes):
        out = torch.cat(parts, dim=0)
    else:
        out = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)
    return out.bool() if is_bool else out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (sums) the gradient and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        r = rank()
        ctx.start = sum(sizes[:r])
        ctx.stop = ctx.start + sizes[r]
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_with_grad_and_sizes(x: Tensor) -> tuple[Tensor, list[int]]:
    """Like :func:`gather_with_grad`, also returning every rank's row count (in rank order)."""
    if x.dim() == 0:
        raise ValueError("gather_with_grad needs a tensor with at least one dimension (rows on dim 0)")
    if world_size() <= 1:
        return x, [int(x.shape[0])]
    sizes = gather_sizes(x.shape[0], device=x.device)
    return _GatherWithGrad.apply(x, sizes), sizes


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable w.r.t. every rank's input.

    Args:
        x: ``(N_r, ...)`` rows of this rank; trailing shape and dtype equal on all ranks, ``N_r`` may differ.

    Returns:
        ``(sum_r N_r, ...)`` identical on every rank; ``x`` itself without a process group or with one rank.

    The backward sums the incoming gradient over ranks (all-reduce) and returns this rank's slice. Every
    rank must run the backward through the gathered tensor (otherwise the all-reduce waits forever).
    """
    return gather_with_grad_and_sizes(x)[0]


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, detached (positions, ids, momentum keys, queue entries).

    Args:
        x: ``(N_r, ...)``; trailing shape and dtype equal on all ranks, ``N_r`` may differ. Bool works.

    Returns:
        ``(sum_r N_r, ...)`` identical on every rank; ``x.detach()`` without a process group.
    """
    if x.dim() == 0:
        raise ValueError("gather_no_grad needs a tensor with at least one dimension (rows on dim 0)")
    if world_size() <= 1:
        return x.detach()
    x = x.detach()
    return _all_gather_rows(x, gather_sizes(x.shape[0], device=x.device))


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        distributed: a process group is initialised.
        rank: global rank.
        local_rank: rank on this node (selects the GPU).
        world_size: number of processes.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (not distributed).
        device: the device this process should train on.
    """

    distributed: bool
    rank: int
    local_rank: int
    world_size: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs and checkpoints."""
        return self.rank == 0


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed_from_env(
    backend: str | None = None, *, timeout_s: float = 1800.0, device: str | torch.device | None = None
) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``). When ``RANK``/``WORLD_SIZE`` are absent (a plain ``python``/``volcontrast`` run) nothing
    is initialised and a single-process :class:`DistInfo` is returned. When a group is already initialised
    it is reused.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when the device is CUDA, else gloo.
        timeout_s: collective timeout in seconds.
        device: the training device; default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU. For CUDA
            it is made the current device before the group is created.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else _default_device(local_rank)
    if is_distributed():
        return DistInfo(True, rank(), local_rank, world_size(), dist.get_backend(), dev)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(False, 0, 0, 1, None, dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build, but RANK/WORLD_SIZE are set")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistInfo(True, rank(), local_rank, world_size(), backend, dev)


def destroy() -> None:
    """Tear down the default process group if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()
