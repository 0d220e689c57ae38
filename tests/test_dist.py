"""DDP helpers and the gathered InfoNCE: 2 gloo processes must reproduce one process on the whole batch.

The two worker processes run this very file as a script (``python tests/test_dist.py OUTDIR``) with
torchrun's environment variables, so :func:`volcontrast.dist.init_distributed_from_env` is exercised too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from volcontrast import dist
from volcontrast.losses import MemoryQueue, info_nce
from volcontrast.spatial import pcl_positive_mask, view_item_ids

from helpers import launch_two_gloo_ranks

ITEMS_PER_RANK = (3, 2)  # unequal on purpose: the gathers must handle different row counts
D_IN, D_OUT, LAMBDA, TAU = 6, 4, 0.3, 0.2
QUEUE_SIZE, QUEUE_PER_RANK = 7, 2


def _problem() -> dict[str, torch.Tensor]:
    """The global batch: inputs (views, items, D_IN), positions (items,), queue seed keys and positions."""
    g = torch.Generator().manual_seed(0)
    n = sum(ITEMS_PER_RANK)
    q = QUEUE_PER_RANK * len(ITEMS_PER_RANK)
    return {
        "x": torch.randn(2, n, D_IN, generator=g),
        "pos": torch.rand(n, generator=g),
        "queue_keys": torch.randn(q, D_OUT, generator=g),
        "queue_pos": torch.rand(q, generator=g),
    }


def _local(r: int) -> dict[str, torch.Tensor]:
    """Rank r's rows: views stacked view-major over its own items; ids unique across ranks."""
    p = _problem()
    start = sum(ITEMS_PER_RANK[:r])
    items = slice(start, start + ITEMS_PER_RANK[r])
    queue_rows = slice(r * QUEUE_PER_RANK, (r + 1) * QUEUE_PER_RANK)
    return {
        "x": torch.cat([p["x"][0, items], p["x"][1, items]]),
        "pos": p["pos"][items].repeat(2),
        "ids": view_item_ids(ITEMS_PER_RANK[r], offset=start),
        "queue_keys": p["queue_keys"][queue_rows],
        "queue_pos": p["queue_pos"][queue_rows],
    }


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D_OUT)


def _masks(pos: torch.Tensor, ids: torch.Tensor, queue_pos: torch.Tensor):
    """Global masks from global positions: PCL positives, a band of exclusions, queue positives."""
    mask = pcl_positive_mask(pos, LAMBDA, item_ids=ids)
    delta = (pos[:, None] - pos[None, :]).abs()
    exclude = (delta >= LAMBDA) & (delta < 1.5 * LAMBDA)
    queue_mask = (pos[:, None] - queue_pos[None, :]).abs() < LAMBDA
    return mask, exclude, queue_mask


def _rank1_rows_without_positives(mask: torch.Tensor) -> torch.Tensor:
    """The same mask with every anchor row of rank 1 emptied (rank 1 then has nothing to score)."""
    out = mask.clone()
    out[2 * ITEMS_PER_RANK[0] :] = False
    return out


def _step(model: nn.Module, x: torch.Tensor, masks, queue: MemoryQueue, gather: bool):
    """Two losses and their parameter gradients, then the embeddings are enqueued."""
    mask, exclude, queue_mask = masks
    keys, _ = queue.get()
    z = model(x)
    out = info_nce(z, mask, TAU, exclude_mask=exclude, queue=keys, queue_positive_mask=queue_mask, gather=gather)
    out.loss.backward()
    grads1 = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    z = model(x)
    out2 = info_nce(z, _rank1_rows_without_positives(mask), TAU, gather=gather)
    out2.loss.backward()
    grads2 = [p.grad.detach().clone() for p in model.parameters()]
    return out.loss.detach(), grads1, out2.loss.detach(), grads2, z.detach()


def _worker(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    info = dist.init_distributed_from_env()
    assert info.distributed and info.world_size == 2 and info.backend == "gloo"
    r = dist.rank()
    loc = _local(r)
    queue = MemoryQueue(QUEUE_SIZE, D_OUT, meta={"pos": ()})
    queue.enqueue(loc["queue_keys"], pos=loc["queue_pos"])
    pos, ids = dist.gather_no_grad(loc["pos"]), dist.gather_no_grad(loc["ids"])
    masks = _masks(pos, ids, queue.get()[1]["pos"])
    model = DistributedDataParallel(_model())
    loss1, grads1, loss2, grads2, z = _step(model, loc["x"], masks, queue, gather=True)
    queue.enqueue(z, pos=loc["pos"])
    flags = dist.gather_no_grad(torch.arange(ITEMS_PER_RANK[r]) % 2 == 0)  # bool, unequal sizes
    torch.save(
        {
            "loss1": dist.all_reduce_mean(loss1),
            "loss2": dist.all_reduce_mean(loss2),
            "grads1": grads1,
            "grads2": grads2,
            "queue": queue.state_dict(),
            "flags": flags,
            "sizes": dist.gather_sizes(len(loc["x"])),
        },
        Path(out_dir) / f"rank{r}.pt",
    )
    dist.barrier()
    dist.destroy()


def _reference():
    """One process, the concatenated batch in rank order, no gather."""
    loc = [_local(r) for r in range(2)]
    queue = MemoryQueue(QUEUE_SIZE, D_OUT, meta={"pos": ()})
    queue.enqueue(torch.cat([lo["queue_keys"] for lo in loc]), pos=torch.cat([lo["queue_pos"] for lo in loc]))
    pos, ids = torch.cat([lo["pos"] for lo in loc]), torch.cat([lo["ids"] for lo in loc])
    masks = _masks(pos, ids, queue.get()[1]["pos"])
    x = torch.cat([lo["x"] for lo in loc])
    loss1, grads1, loss2, grads2, z = _step(_model(), x, masks, queue, gather=False)
    queue.enqueue(z, pos=pos)
    return {"loss1": loss1, "grads1": grads1, "loss2": loss2, "grads2": grads2, "queue": queue.state_dict()}


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    results = launch_two_gloo_ranks(__file__, tmp_path)
    ref = _reference()
    assert results[0]["sizes"] == results[1]["sizes"] == [6, 4]
    for res in results:
        for key in ("loss1", "loss2"):
            torch.testing.assert_close(res[key], ref[key], atol=1e-5, rtol=0)
        for key in ("grads1", "grads2"):
            for got, want in zip(res[key], ref[key], strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # every rank holds the same queue, equal to one process enqueueing the whole batch
        for name, want in ref["queue"].items():
            torch.testing.assert_close(res["queue"][name], want, atol=0, rtol=0)
        assert res["flags"].dtype == torch.bool
        assert res["flags"].tolist() == [True, False, True, True, False]
    assert ref["loss2"] > 0  # rank 0's anchors still score in the second loss


def test_helpers_without_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.init_distributed_from_env(device="cpu")
    assert not info.distributed and info.rank == 0 and info.world_size == 1 and info.is_main
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.gather_with_grad(x) is x
    assert torch.equal(dist.gather_no_grad(x), x) and not dist.gather_no_grad(x).requires_grad
    mean = dist.all_reduce_mean(x)
    assert torch.equal(mean, x) and mean.data_ptr() != x.data_ptr()
    assert dist.gather_sizes(5) == [5]
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    _worker(sys.argv[1])
