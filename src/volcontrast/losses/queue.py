"""A FIFO memory queue of keys (MoCo/Spade negatives) with optional per-key metadata.

Keys and metadata live in buffers, so the queue is part of ``state_dict()`` and a resumed run continues
with exactly the same entries, write position and fill level.

Example::

    queue = MemoryQueue(size=8192, dim=128, meta={"centre": (3,), "case": ((), torch.int64)})
    keys, meta = queue.get()                   # (Q, 128), {"centre": (Q, 3), "case": (Q,)}; Q <= 8192
    out = info_nce(z, mask, queue=keys, queue_exclude_mask=near(z_centres, meta["centre"]))
    queue.enqueue(k.detach(), centre=centres, case=case_ids)    # after the step
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from volcontrast import dist

__all__ = ["MemoryQueue"]

MetaSpec = tuple[int, ...] | tuple[tuple[int, ...], torch.dtype]


def _parse_spec(name: str, spec: MetaSpec) -> tuple[tuple[int, ...], torch.dtype]:
    if len(spec) == 2 and isinstance(spec[1], torch.dtype):
        shape, dtype = spec
        return tuple(int(s) for s in shape), dtype  # type: ignore[union-attr]
    if all(isinstance(s, int) for s in spec):
        return tuple(int(s) for s in spec), torch.float32  # type: ignore[arg-type]
    raise ValueError(f"meta field {name!r}: expected a shape like (3,) or (shape, dtype), got {spec!r}")


class MemoryQueue(nn.Module):
    """Ring buffer of the ``size`` most recent keys ``(size, dim)`` plus metadata fields.

    Args:
        size: capacity ``Q`` (number of keys kept).
        dim: key dimension ``D``.
        meta: per-key metadata fields: name -> trailing shape (float32), or name -> ``(shape, dtype)``;
            e.g. ``{"centre": (3,), "case": ((), torch.int64)}`` stores ``(Q, 3)`` float and ``(Q,)`` long.
        dtype: storage dtype of the keys (float32; bfloat16 halves the memory).
        gather: under DDP, :meth:`enqueue` gathers the batch from all ranks (in rank order) so that every
            rank holds the same queue. Turn off only if each rank should keep its own queue.

    Buffers: ``keys``, ``meta_<name>``, ``ptr`` (next write slot) and ``filled`` (valid entries).
    """

    keys: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        meta: Mapping[str, MetaSpec] | None = None,
        dtype: torch.dtype = torch.float32,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size} dim={dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.gather = bool(gather)
        self.register_buffer("keys", torch.zeros(self.size, self.dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.meta_names: tuple[str, ...] = tuple(meta or {})
        for name, spec in (meta or {}).items():
            if not name.isidentifier():
                raise ValueError(f"meta field name must be an identifier, got {name!r}")
            shape, mdtype = _parse_spec(name, spec)
            self.register_buffer(f"meta_{name}", torch.zeros((self.size, *shape), dtype=mdtype))

    def __len__(self) -> int:
        """Number of valid entries (``<= size``)."""
        return int(self.filled)

    def meta_buffer(self, name: str) -> Tensor:
        """The full ``(size, ...)`` storage of metadata field ``name`` (valid rows: see :meth:`get`)."""
        if name not in self.meta_names:
            raise KeyError(f"unknown meta field {name!r}; this queue has {list(self.meta_names)}")
        return getattr(self, f"meta_{name}")

    def get(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The valid entries: keys ``(n, D)`` and each metadata field ``(n, ...)``, ``n = len(self)``.

        Storage order (not age order): row ``i`` of the keys belongs with row ``i`` of every field.
        Returns views of the buffers; they change on the next :meth:`enqueue`.
        """
        n = len(self)
        return self.keys[:n], {name: self.meta_buffer(name)[:n] for name in self.meta_names}

    @torch.no_grad()
    def enqueue(self, keys: Tensor, **meta: Tensor) -> None:
        """Append a batch, overwriting the oldest entries once full.

        Args:
            keys: ``(B, D)`` (detached internally).
            **meta: every declared field, ``(B, ...)`` with the declared trailing shape.

        Under DDP (and ``gather=True``) every rank must call this with its own batch; the queue receives all
        ranks' batches concatenated in rank order. A batch larger than the capacity keeps its last ``size``
        rows; the write position advances by the full batch length, exactly as if the rows were written one
        by one.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got shape {tuple(keys.shape)}")
        if set(meta) != set(self.meta_names):
            raise ValueError(f"enqueue needs meta fields {sorted(self.meta_names)}, got {sorted(meta)}")
        b = keys.shape[0]
        for name, value in meta.items():
            want = (b, *self.meta_buffer(name).shape[1:])
            if tuple(value.shape) != want:
                raise ValueError(f"meta field {name!r} must have shape {want}, got {tuple(value.shape)}")
        keys = keys.detach()
        if self.gather and dist.world_size() > 1:
            keys = dist.gather_no_grad(keys)
            meta = {name: dist.gather_no_grad(value) for name, value in meta.items()}
            b = keys.shape[0]
        if b == 0:
            return
        n_write = min(b, self.size)
        ptr = int(self.ptr)
        # Row j of the batch lands in slot (ptr + j) % size; only the last `size` rows survive.
        slots = (ptr + torch.arange(b - n_write, b, device=self.keys.device)) % self.size
        self.keys[slots] = keys[b - n_write :].to(device=self.keys.device, dtype=self.keys.dtype)
        for name, value in meta.items():
            buf = self.meta_buffer(name)
            buf[slots] = value[b - n_write :].to(device=buf.device, dtype=buf.dtype)
        self.ptr.fill_((ptr + b) % self.size)
        self.filled.fill_(min(int(self.filled) + b, self.size))

    def reset(self) -> None:
        """Empty the queue (keeps the storage)."""
        self.ptr.zero_()
        self.filled.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, meta={list(self.meta_names)}, gather={self.gather}"
