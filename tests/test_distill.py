"""DINO-style self-distillation: head, centering (single process and 2 gloo ranks), loss, schedules, diagnostics.

The DDP test runs this file as a script (``python tests/test_distill.py OUTDIR``) in two processes with
torchrun's environment variables, like ``tests/test_dist.py``.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from volcontrast import dist
from volcontrast.losses.distill import (
    Centering,
    DINOHead,
    cosine_schedule,
    distill_loss,
    koleo_loss,
    prototype_usage,
    teacher_entropy,
    warmup_then_constant,
)

from helpers import launch_two_gloo_ranks

K = 6
ROWS_PER_RANK = (3, 5)  # unequal on purpose: the centre must weigh ranks by their row counts
TOKENS = 2


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two steps of per-rank teacher logits: vectors (R_r, K), then tokens (R_r, TOKENS, K)."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for shape in ((K,), (TOKENS, K)):
        steps.append({r: torch.randn(n, *shape, generator=g) * (r + 1) + r for r, n in enumerate(ROWS_PER_RANK)})
    return steps


def _centre_reference() -> torch.Tensor:
    """One process on the concatenated batches, by the direct EMA formula."""
    c = torch.zeros(K)
    for step in _batches():
        rows = torch.cat([step[r].reshape(-1, K) for r in range(len(ROWS_PER_RANK))])
        c = 0.9 * c + 0.1 * rows.mean(0)
    return c


def _worker(out_dir: str) -> None:
    info = dist.init_distributed_from_env()
    assert info.distributed and info.world_size == 2
    r = dist.rank()
    centering = Centering(K, momentum=0.9)
    means = [centering.update(step[r]) for step in _batches()]
    torch.save({"centre": centering.centre, "means": means}, Path(out_dir) / f"rank{r}.pt")
    dist.barrier()
    dist.destroy()


def test_centre_on_two_gloo_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    results = launch_two_gloo_ranks(__file__, tmp_path)
    want = _centre_reference()
    for res in results:
        torch.testing.assert_close(res["centre"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0]["means"], results[1]["means"], atol=0, rtol=0)
    # averaging the per-rank means instead (ignoring the unequal row counts) would give another centre
    naive = torch.zeros(K)
    for step in _batches():
        naive = 0.9 * naive + 0.1 * (step[0].reshape(-1, K).mean(0) + step[1].reshape(-1, K).mean(0)) / 2
    assert not torch.allclose(naive, want, atol=1e-2)


def test_centre_update_is_the_ema_of_batch_means():
    c = Centering(K, momentum=0.8)
    g = torch.Generator().manual_seed(1)
    want = torch.zeros(K)
    for shape in ((5, K), (2, 3, K), (4, K)):
        x = torch.randn(*shape, generator=g) + 2.0
        mean = c.update(x)
        torch.testing.assert_close(mean, x.reshape(-1, K).mean(0))
        want = 0.8 * want + 0.2 * x.reshape(-1, K).mean(0)
        torch.testing.assert_close(c.centre, want)
    before = c.centre.clone()
    c.update(torch.empty(0, K))  # no rows: unchanged
    assert torch.equal(c.centre, before)
    assert "centre" in c.state_dict()


def test_teacher_targets_are_centred_sharpened_distributions():
    c = Centering(K)
    c.centre.copy_(torch.linspace(-1, 1, K))
    t = torch.randn(4, 3, K, requires_grad=True)
    p = c.targets(t, temperature=0.5)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 3))
    torch.testing.assert_close(p, torch.softmax((t.detach() - c.centre) / 0.5, dim=-1))
    assert not p.requires_grad
    sharp = c.targets(t, temperature=0.05)
    assert teacher_entropy(sharp) < teacher_entropy(p)
    assert (sharp.max(-1).values >= p.max(-1).values).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p16 = c.targets(t.detach().bfloat16(), temperature=0.5)
    assert p16.dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        c.targets(t, temperature=0.0)
    with pytest.raises(ValueError, match=f"\\(\\.\\.\\., {K}\\)"):
        c.targets(torch.randn(2, K + 1), 0.1)


@pytest.mark.parametrize("shape", [(5, K), (2, 4, K)])
def test_distill_loss_formula_and_minimum(shape):
    g = torch.Generator().manual_seed(2)
    p_t = torch.softmax(torch.randn(*shape, generator=g) * 2, -1)
    s = torch.randn(*shape, generator=g, requires_grad=True)
    tau = 0.1
    loss = distill_loss(s, p_t, tau)
    direct = -(p_t * torch.log_softmax(s / tau, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, direct)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # student softmax equal to the teacher: the loss is the entropy of p_t, below any other student
    optimum = (tau * p_t.log()).requires_grad_(True)
    at_optimum = distill_loss(optimum, p_t, tau)
    torch.testing.assert_close(at_optimum, teacher_entropy(p_t))
    assert at_optimum < loss.detach()
    at_optimum.backward()
    assert optimum.grad.abs().max() < 1e-5


def test_distill_loss_weights():
    g = torch.Generator().manual_seed(3)
    p_t = torch.softmax(torch.randn(3, 4, K, generator=g), -1)
    s = torch.randn(3, 4, K, generator=g, requires_grad=True)
    ce = -(p_t * torch.log_softmax(s / 0.2, -1)).sum(-1)  # (3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(distill_loss(s, p_t, 0.2, weights=mask), ce[mask].mean())
    per_sample = torch.tensor([1.0, 0.0, 3.0])
    want = (ce.mean(1) * per_sample).sum() / per_sample.sum()
    torch.testing.assert_close(distill_loss(s, p_t, 0.2, weights=per_sample), want)
    zero = distill_loss(s, p_t, 0.2, weights=torch.zeros(3, 4, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="weights"):
        distill_loss(s, p_t, 0.2, weights=torch.ones(4))


def test_dino_head_shapes_unit_prototypes_and_gradients():
    torch.manual_seed(0)
    head = DINOHead(12, num_prototypes=K, hidden_dim=32, bottleneck_dim=8)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3
    x = torch.randn(4, 12)
    assert head(x).shape == (4, K)
    assert head(torch.randn(2, 5, 12)).shape == (2, 5, K)
    norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(K))
    assert not head.last_layer.weight_g.requires_grad
    # bottleneck is unit-norm and the prototypes too: logits are cosines in [-1, 1]
    assert head(x).abs().max() <= 1 + 1e-5
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(x).square().sum().backward()
    assert head.mlp[0].weight.grad.abs().sum() > 0 and head.last_layer.weight_v.grad.abs().sum() > 0
    v_before = head.last_layer.weight_v.detach().clone()
    opt.step()
    assert not torch.equal(v_before, head.last_layer.weight_v)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(K))  # still unit after a step
    free = DINOHead(12, num_prototypes=K, hidden_dim=16, bottleneck_dim=8, num_layers=1, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad and len(free.mlp) == 1
    with pytest.raises(ValueError, match="12"):
        head(torch.randn(3, 11))


def test_schedules_hit_endpoints_clamp_and_are_monotone():
    total = 50
    m = [cosine_schedule(0.996, 1.0, s, total) for s in range(-3, total + 4)]
    assert m[3] == pytest.approx(0.996) and m[3 + total] == pytest.approx(1.0)
    assert m[0] == m[3] and m[-1] == m[3 + total]
    assert all(b >= a for a, b in itertools.pairwise(m))
    assert cosine_schedule(0.996, 1.0, total // 2, total) == pytest.approx(0.998)
    t = [warmup_then_constant(0.04, 0.07, 30, s) for s in range(0, 60)]
    assert t[0] == pytest.approx(0.04) and t[30] == pytest.approx(0.07) and t[59] == pytest.approx(0.07)
    assert t[15] == pytest.approx(0.055)
    assert all(b >= a for a, b in itertools.pairwise(t))
    assert warmup_then_constant(0.04, 0.07, 0, 0) == 0.07 and cosine_schedule(1.0, 0.0, 5, 0) == 0.0


def test_collapse_diagnostics():
    collapsed = torch.zeros(32, K)
    collapsed[:, 2] = 1.0
    usage = prototype_usage(collapsed)
    assert usage["argmax_fraction"].item() == pytest.approx(1 / K)
    assert usage["perplexity_fraction"].item() == pytest.approx(1 / K)
    assert teacher_entropy(collapsed).item() == pytest.approx(0.0)
    g = torch.Generator().manual_seed(4)
    spread = torch.softmax(torch.randn(512, K, generator=g), -1)
    usage = prototype_usage(spread)
    assert usage["argmax_fraction"].item() == 1.0
    assert usage["perplexity_fraction"].item() > 0.95
    assert teacher_entropy(torch.full((3, K), 1 / K)).item() == pytest.approx(math.log(K))


def test_koleo_loss_is_minus_mean_log_nearest_neighbour_distance_and_spreads_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * torch.arange(1, 6, dtype=torch.float64)
    z = x / x.norm(dim=1, keepdim=True)  # the loss normalises its input
    expected = -sum(math.log(min(float((z[i] - z[j]).norm()) for j in range(7) if j != i) + 1e-8)
                    for i in range(7)) / 7
    assert float(koleo_loss(x)) == pytest.approx(expected, rel=1e-12)
    # two equal rows sit at distance 0: the value is -log(eps) for them, finite
    dup = torch.cat([x[:1], x[:1]])
    assert float(koleo_loss(dup)) == pytest.approx(-math.log(1e-8))
    # a gradient step moves each row away from its nearest neighbour
    y = x.clone().float().requires_grad_(True)
    loss = koleo_loss(y)
    loss.backward()
    with torch.no_grad():
        stepped = y - 0.05 * y.grad
    assert float(koleo_loss(stepped)) < float(loss.detach())
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


if __name__ == "__main__":
    _worker(sys.argv[1])
