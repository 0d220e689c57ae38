"""The InfoNCE core against a direct double-loop formula, NT-Xent, the collapse value and gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volcontrast.losses import InfoNCELoss, base_temperature_scale, info_nce
from volcontrast.spatial import pcl_positive_mask, simclr_positive_mask, view_item_ids


def reference_loss(
    z: np.ndarray,
    weights: np.ndarray,
    temperature: float,
    *,
    exclude: np.ndarray | None = None,
    keys: np.ndarray | None = None,
    queue: np.ndarray | None = None,
    queue_weights: np.ndarray | None = None,
    queue_exclude: np.ndarray | None = None,
    loss_scale: float = 1.0,
) -> float:
    """SupCon L_out written out term by term in plain Python floats."""

    def unit(v: np.ndarray) -> list[float]:
        n = math.sqrt(sum(float(x) ** 2 for x in v))
        return [float(x) / n for x in v]

    m = len(z)
    anchors = [unit(r) for r in z]
    key_rows = [unit(r) for r in (z if keys is None else keys)]
    w = [[float(weights[a][b]) for b in range(m)] for a in range(m)]
    ex = [[bool(exclude[a][b]) if exclude is not None else False for b in range(m)] for a in range(m)]
    if queue is not None:
        key_rows += [unit(r) for r in queue]
        for a in range(m):
            w[a] += [float(queue_weights[a][j]) if queue_weights is not None else 0.0 for j in range(len(queue))]
            ex[a] += [bool(queue_exclude[a][j]) if queue_exclude is not None else False for j in range(len(queue))]
    n_keys = len(key_rows)

    def sim(a: int, c: int) -> float:
        return sum(x * y for x, y in zip(anchors[a], key_rows[c], strict=True)) / temperature

    losses = []
    for a in range(m):
        denominator = sum(math.exp(sim(a, c)) for c in range(n_keys) if c != a and not ex[a][c])
        total, weight = 0.0, 0.0
        for b in range(n_keys):
            if b == a or ex[a][b] or w[a][b] == 0:
                continue
            total += w[a][b] * (sim(a, b) - math.log(denominator))
            weight += w[a][b]
        if weight > 0:
            losses.append(-total / weight)
    return loss_scale * sum(losses) / len(losses)


def _random_problem(seed: int, m: int = 10, d: int = 6, q: int = 5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g, dtype=torch.float64)
    keys = torch.randn(m, d, generator=g, dtype=torch.float64)
    weights = torch.rand(m, m, generator=g, dtype=torch.float64)
    weights = torch.where(weights > 0.6, weights, torch.zeros_like(weights))  # soft, sparse positives
    exclude = torch.rand(m, m, generator=g) > 0.8
    queue = torch.randn(q, d, generator=g, dtype=torch.float64)
    queue_weights = torch.where(torch.rand(m, q, generator=g) > 0.7, 0.5, 0.0).to(torch.float64)
    queue_exclude = torch.rand(m, q, generator=g) > 0.8
    return z, keys, weights, exclude, queue, queue_weights, queue_exclude


def test_hard_mask_matches_double_loop():
    z = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    pos = torch.rand(6).repeat(2)
    mask = pcl_positive_mask(pos, 0.3, item_ids=view_item_ids(6))
    got = info_nce(z, mask, temperature=0.2).loss
    want = reference_loss(z.numpy(), mask.numpy(), 0.2)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(("seed", "with_queue", "with_keys"), [(1, True, True), (2, True, False), (3, False, False)])
def test_soft_weights_exclusions_queue_and_keys_match_double_loop(seed, with_queue, with_keys):
    z, keys, w, ex, queue, qw, qex = _random_problem(seed)
    w[3] = 0.0  # an anchor without positives is skipped
    qw[3] = 0.0
    if not with_queue:
        queue = qw = qex = None
    if not with_keys:
        keys = None
    out = info_nce(
        z,
        w,
        0.15,
        exclude_mask=ex,
        queue=queue,
        queue_positive_mask=qw,
        queue_exclude_mask=qex,
        keys=keys,
        loss_scale=1.3,
    )
    want = reference_loss(
        z.numpy(),
        w.numpy(),
        0.15,
        exclude=ex.numpy(),
        keys=None if keys is None else keys.numpy(),
        queue=None if queue is None else queue.numpy(),
        queue_weights=None if qw is None else qw.numpy(),
        queue_exclude=None if qex is None else qex.numpy(),
        loss_scale=1.3,
    )
    assert float(out.loss) == pytest.approx(want, abs=1e-5)
    # skipped anchors: row 3 plus any row whose positives are all excluded or on the diagonal
    eff = w.clone().masked_fill(ex, 0).fill_diagonal_(0)
    eff_q = torch.zeros(len(z), 1) if qw is None else qw.masked_fill(qex, 0)
    n_skipped = int(((eff.sum(1) + eff_q.sum(1)) == 0).sum())
    assert n_skipped >= 1
    assert float(out.diagnostics["n_skipped"]) == n_skipped


def test_simclr_mask_gives_nt_xent():
    n, tau = 8, 0.1
    z = torch.randn(2 * n, 16, generator=torch.Generator().manual_seed(3))
    got = info_nce(z, simclr_positive_mask(view_item_ids(n)), tau).loss
    # NT-Xent as cross-entropy over the other 2N-1 rows, target = the other view
    zn = F.normalize(z, dim=1)
    logits = (zn @ zn.T / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    want = F.cross_entropy(logits, target)
    assert float(got) == pytest.approx(float(want), abs=1e-5)


def test_diagnostics_match_direct_computation():
    n = 6
    z = torch.randn(2 * n, 8, generator=torch.Generator().manual_seed(4))
    mask = pcl_positive_mask(
        torch.rand(n, generator=torch.Generator().manual_seed(5)).repeat(2), 0.25, view_item_ids(n)
    )
    d = info_nce(z, mask, 0.1).diagnostics
    cos = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T
    off = ~torch.eye(2 * n, dtype=torch.bool)
    assert float(d["mean_positives"]) == pytest.approx(float(mask.sum(1).float().mean()), abs=1e-6)
    assert float(d["pos_cosine"]) == pytest.approx(float(cos[mask].mean()), abs=1e-6)
    assert float(d["neg_cosine"]) == pytest.approx(float(cos[~mask & off].mean()), abs=1e-6)
    assert float(d["n_anchors"]) == 2 * n and float(d["n_skipped"]) == 0
    assert float(d["embedding_spread"]) > 0.5  # random embeddings are spread out


def test_collapse_value_is_exact_for_identical_embeddings():
    n = 25
    scale = base_temperature_scale(0.1)
    z = torch.ones(2 * n, 32) + 0.0
    mask = pcl_positive_mask(torch.rand(n).repeat(2), 0.1, item_ids=view_item_ids(n))
    out = info_nce(z, mask, 0.1, loss_scale=scale)
    want = scale * math.log(2 * n - 1)
    assert want == pytest.approx(5.5597, abs=1e-4)  # the plateau of PCL issue #5
    assert float(out.loss) == pytest.approx(want, abs=1e-5)
    assert float(out.diagnostics["collapse_value"]) == pytest.approx(want, abs=1e-5)
    assert float(out.diagnostics["embedding_std"]) == pytest.approx(0.0, abs=1e-6)


def test_collapse_value_with_exclusions_and_queue_follows_formula():
    m, q = 10, 7
    g = torch.Generator().manual_seed(6)
    mask = pcl_positive_mask(torch.rand(m // 2, generator=g).repeat(2), 0.3, view_item_ids(m // 2))
    exclude = (torch.rand(m, m, generator=g) > 0.7) & ~mask
    q_exclude = torch.rand(m, q, generator=g) > 0.5
    z = torch.full((m, 4), 0.5)
    out = info_nce(z, mask, 0.1, exclude_mask=exclude, queue=torch.full((q, 4), 2.0), queue_exclude_mask=q_exclude)
    n_terms = (m - 1 - exclude.fill_diagonal_(False).sum(1)) + (q - q_exclude.sum(1))
    want = float(torch.log(n_terms.double()).mean())
    assert float(out.loss) == pytest.approx(want, abs=1e-5)
    assert float(out.diagnostics["collapse_value"]) == pytest.approx(want, abs=1e-5)


def test_gradcheck_float64():
    z, keys, w, ex, queue, qw, qex = _random_problem(7, m=6, d=4, q=3)
    z.requires_grad_(True)
    keys.requires_grad_(True)

    def f(z_, k_):
        return info_nce(
            z_, w, 0.2, exclude_mask=ex, queue=queue, queue_positive_mask=qw, queue_exclude_mask=qex, keys=k_
        ).loss

    assert torch.autograd.gradcheck(f, (z, keys), eps=1e-6, atol=1e-6)
    z2 = z.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: info_nce(x, w, 0.2, exclude_mask=ex).loss, (z2,), eps=1e-6, atol=1e-6)


def test_fp32_inside_bf16_autocast():
    n = 16
    lin = torch.nn.Linear(32, 64)
    x = torch.randn(2 * n, 32, generator=torch.Generator().manual_seed(8))
    mask = simclr_positive_mask(view_item_ids(n))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        loss = info_nce(z, mask, 0.05).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # identical to the float32 computation on the same (bf16-rounded) embeddings, outside autocast
    ref = info_nce(z.float(), mask, 0.05).loss
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-6)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


def test_low_temperature_is_stable():
    z = torch.randn(12, 8, generator=torch.Generator().manual_seed(9))
    mask = simclr_positive_mask(view_item_ids(6))
    got = info_nce(z, mask, temperature=0.004).loss  # logits up to 250: exp overflows float32 unshifted
    want = info_nce(z.double(), mask, temperature=0.004).loss
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_no_positives_gives_zero_loss_with_gradient_graph():
    z = torch.randn(6, 4, requires_grad=True)
    out = info_nce(z, torch.zeros(6, 6, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.diagnostics["n_skipped"].item() == 6
    out.loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_gather_without_process_group_is_a_no_op_and_module_matches():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(10))
    mask = simclr_positive_mask(view_item_ids(4))
    a = info_nce(z, mask, 0.3, gather=True).loss
    b = InfoNCELoss(temperature=0.3)(z, mask).loss
    assert float(a) == pytest.approx(float(b), abs=0)


def test_shape_errors_are_clear():
    z = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"positive_mask must have shape \(8, 8\)"):
        info_nce(z, torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="queue must be"):
        info_nce(z, torch.zeros(8, 8, dtype=torch.bool), queue=torch.randn(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
