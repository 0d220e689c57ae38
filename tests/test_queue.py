"""MemoryQueue: FIFO semantics, wrap-around, oversize batches, metadata alignment, exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from volcontrast.losses import MemoryQueue


def _batches(sizes: list[int], dim: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    start = 0
    for b in sizes:
        ids = torch.arange(start, start + b)
        keys = torch.randn(b, dim, generator=g)
        yield keys, {"centre": torch.rand(b, 3, generator=g), "case": ids}
        start += b


def _queue(size: int = 7) -> MemoryQueue:
    return MemoryQueue(size, 3, meta={"centre": (3,), "case": ((), torch.int64)})


def test_fifo_matches_reference_with_wrap_and_oversize_batches():
    sizes = [2, 3, 4, 1, 9, 0, 5, 6]
    q = _queue(7)
    all_keys, all_case = [], []
    for keys, meta in _batches(sizes):
        q.enqueue(keys, **meta)
        all_keys.append(keys)
        all_case.append(meta["case"])
        total = sum(len(k) for k in all_keys)
        keys_seen, case_seen = torch.cat(all_keys), torch.cat(all_case)
        got_keys, got_meta = q.get()
        assert len(q) == min(total, 7) == len(got_keys) == len(got_meta["case"])
        # row t of the stream lives in slot t % size, for the most recent `size` rows
        for t in range(max(0, total - 7), total):
            assert torch.equal(got_keys[t % 7], keys_seen[t])
            assert int(got_meta["case"][t % 7]) == int(case_seen[t])
        assert int(q.ptr) == total % 7
    # metadata stays aligned with its key
    keys, meta = q.get()
    assert meta["centre"].shape == (7, 3) and meta["case"].dtype == torch.int64


def test_get_returns_only_filled_entries():
    q = _queue(10)
    assert q.get()[0].shape == (0, 3)
    keys, meta = next(_batches([4]))
    q.enqueue(keys, **meta)
    got, got_meta = q.get()
    assert torch.equal(got, keys) and torch.equal(got_meta["case"], meta["case"])


def test_state_dict_resumes_exactly():
    stream = list(_batches([3, 5, 4, 6, 2], seed=1))
    a = _queue(8)
    for keys, meta in stream[:3]:
        a.enqueue(keys, **meta)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _queue(8)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for keys, meta in stream[3:]:
        a.enqueue(keys, **meta)
        b.enqueue(keys, **meta)
    (ka, ma), (kb, mb) = a.get(), b.get()
    assert torch.equal(ka, kb) and all(torch.equal(ma[n], mb[n]) for n in ma)
    assert int(a.ptr) == int(b.ptr) and len(a) == len(b)
    assert set(a.state_dict()) == {"keys", "ptr", "filled", "meta_centre", "meta_case"}


def test_reset_and_storage_dtype():
    q = MemoryQueue(4, 2, dtype=torch.bfloat16)
    q.enqueue(torch.randn(3, 2))
    assert q.keys.dtype == torch.bfloat16 and len(q) == 3
    q.reset()
    assert len(q) == 0 and q.get()[0].shape == (0, 2)


def test_bad_input_is_rejected():
    q = _queue(5)
    keys, meta = next(_batches([2]))
    with pytest.raises(ValueError, match=r"keys must be \(B, 3\)"):
        q.enqueue(torch.randn(2, 4), **meta)
    with pytest.raises(ValueError, match="needs meta fields"):
        q.enqueue(keys, centre=meta["centre"])
    with pytest.raises(ValueError, match="'centre' must have shape"):
        q.enqueue(keys, centre=torch.rand(2, 2), case=meta["case"])
    with pytest.raises(ValueError, match="expected a shape"):
        MemoryQueue(4, 2, meta={"x": ("a",)})
