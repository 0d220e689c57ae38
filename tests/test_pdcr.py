"""PDCR: loss against a direct loop formula, descriptors against brute-force counts, the sign property, AMP."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volcontrast.losses.pdcr import (
    PDCRLoss,
    SampleGrid,
    patch_label_fractions,
    pdcr_loss,
    receptive_field_sizes,
    sample_grid,
)
from volcontrast.nets import build_backbone

torch.set_num_threads(2)


# ---------------------------------------------------------------------- direct (loop) references
def brute_fractions(labels: np.ndarray, num_classes: int, window, centres) -> np.ndarray:
    """(B, *spatial) labels → (B, N, num_classes): count voxels of each class in the clipped window."""
    shape = labels.shape[1:]
    w = (window,) * len(shape) if isinstance(window, int) else tuple(window)
    out = np.zeros((labels.shape[0], len(centres), num_classes))
    for b in range(labels.shape[0]):
        for n, c in enumerate(centres):
            box = tuple(slice(max(ci - wi // 2, 0), min(ci - wi // 2 + wi, si)) for ci, wi, si in zip(c, w, shape))
            region = labels[b][box]
            counts = np.array([(region == k).sum() for k in range(num_classes)], dtype=float)
            out[b, n] = counts / counts.sum()
    return out


def centres_of(shape, spacing, offset):
    return list(itertools.product(*[range(o, s, g) for s, g, o in zip(shape, spacing, offset)]))


def divergence(hi, hj, kind):
    return 0.5 * np.abs(hi - hj).sum() if kind == "tv" else np.abs(hi[1:] - hj[1:]).sum()


def loop_pair_loss(f_rows, f_cols, h_rows, h_cols, tau, kind):
    """− mean_{i,j} log[exp(a_ij s_ij) / Σ_k exp(d_ik s_ik)], all pairs incl. i = j; f: (N, C) numpy."""
    n = len(f_rows)

    def s(i, j):
        cos = f_rows[i] @ f_cols[j] / (np.linalg.norm(f_rows[i]) * np.linalg.norm(f_cols[j]))
        return cos / tau - 1.0 / tau  # the row maximum is the self-pair, cos = 1

    total = 0.0
    for i in range(n):
        den = sum(math.exp(divergence(h_rows[i], h_cols[k], kind) * s(i, k)) for k in range(n))
        for j in range(n):
            a = 1.0 - divergence(h_rows[i], h_cols[j], kind)
            total += -(a * s(i, j) - math.log(den))
    return total / n**2


def loop_pdcr(features, labels, num_classes, strides, windows, spacing, offset, tau, kind, weight):
    """Layer-weighted mean over layers of the per-window mean over images of ``loop_pair_loss``."""
    labels = labels.numpy()
    centres = centres_of(labels.shape[1:], spacing, offset)
    layers = []
    for f, s, wins in zip(features, strides, windows):
        f = f.double().numpy()
        per_window = []
        for w in wins:
            h = brute_fractions(labels, num_classes, w, centres)
            per_image = []
            for b in range(labels.shape[0]):
                vec = np.stack([f[(b, slice(None), *[ci // s for ci in c])] for c in centres])
                per_image.append(loop_pair_loss(vec, vec, h[b], h[b], tau, kind))
            per_window.append(np.mean(per_image))
        layers.append(np.mean(per_window))
    return weight * np.mean(layers), centres


# ---------------------------------------------------------------------- descriptors
@pytest.mark.parametrize("window", [1, 3, 4, 5, (3, 2)])
def test_fractions_equal_brute_force_counts_2d_with_borders(window):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 7, 9), generator=g)
    labels[0, 0, 0] = 255  # an ignore label: excluded from the counts
    grid = SampleGrid(offset=(0, 1), spacing=(2, 3), counts=(4, 3))  # first row / column at the border
    got = patch_label_fractions(labels, 4, window, grid)
    lab = labels.numpy()
    want = brute_fractions(np.where(lab == 255, -1, lab), 4, window, centres_of((7, 9), (2, 3), (0, 1)))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-6)


def test_fractions_equal_brute_force_counts_3d_anisotropic_window():
    labels = torch.randint(0, 3, (1, 6, 8, 5), generator=torch.Generator().manual_seed(1))
    grid = sample_grid((6, 8, 5), (2, 4, 2), [(1, 2, 1)])
    got = patch_label_fractions(labels, 3, (3, 5, 2), grid)
    want = brute_fractions(labels.numpy(), 3, (3, 5, 2), centres_of((6, 8, 5), grid.spacing, grid.offset))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_grid_offsets_centred_random_and_errors():
    assert sample_grid((128, 128, 128), 32, [4, 8]) == SampleGrid((16, 16, 16), (32, 32, 32), (4, 4, 4))
    offsets = {sample_grid((64, 64), 32, [8], torch.Generator().manual_seed(s)).offset for s in range(20)}
    assert offsets <= set(itertools.product(range(0, 32, 8), repeat=2)) and len(offsets) > 4
    with pytest.raises(ValueError, match="multiple of the stage strides"):
        sample_grid((64, 64), 12, [8])
    with pytest.raises(ValueError, match="at least 2"):
        sample_grid((32, 32, 32), 32, [8])


# ---------------------------------------------------------------------- the loss against the loop formula
@pytest.mark.parametrize("kind", ["tv", "foreground_l1"])
def test_rf_pdcr_2d_equals_loop_formula(kind):
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (2, 24, 20), generator=g)
    features = [torch.randn(2, 5, 12, 10, generator=g, dtype=torch.float64),
                torch.randn(2, 7, 6, 5, generator=g, dtype=torch.float64)]
    out = pdcr_loss(features, labels, 3, [2, 4], windows="rf", rf_sizes=[5, 9], grid_spacing=4, temperature=0.5,
                    layer_weight=0.01, divergence=kind)
    want, centres = loop_pdcr(features, labels, 3, [2, 4], [[5], [9]], (4, 4), (0, 0), 0.5, kind, 0.01)
    assert out.terms["n_samples"] == len(centres) == 30
    assert out.loss.dtype == torch.float64
    assert abs(float(out.loss) - want) < 1e-10 * max(1.0, abs(want))
    f32 = pdcr_loss([f.float() for f in features], labels, 3, [2, 4], rf_sizes=[5, 9], grid_spacing=4,
                    divergence=kind)
    assert f32.loss.dtype == torch.float32 and abs(float(f32.loss) - want) < 1e-5 * abs(want)


def test_h_pdcr_3d_equals_loop_formula_several_classes():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (2, 12, 12, 16), generator=g)
    features = [torch.randn(2, 6, 12, 12, 16, generator=g, dtype=torch.float64),
                torch.randn(2, 4, 6, 6, 8, generator=g, dtype=torch.float64)]
    out = pdcr_loss(features, labels, 4, [1, 2], windows=[3, 4], grid_spacing=4, temperature=0.7, layer_weight=1.0)
    # centred offset: lattice lcm(1, 2) = 2, aligned choices {0, 2} → 2
    want, centres = loop_pdcr(features, labels, 4, [1, 2], [[3, 4], [3, 4]], (4, 4, 4), (2, 2, 2), 0.7, "tv", 1.0)
    assert len(centres) == 36
    assert abs(float(out.loss) - want) < 1e-10 * abs(want)
    assert out.terms["layer0"] != out.terms["layer1"]


def test_cross_layer_term_equals_loop_formula():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (1, 16, 16), generator=g)
    features = [torch.randn(1, 5, 8, 8, generator=g), torch.randn(1, 7, 4, 4, generator=g)]
    torch.manual_seed(0)
    crit = PDCRLoss(3, [2, 4], channels=[5, 7], rf_sizes=[5, 9], grid_spacing=4, cross_layer=(0, 1), cross_width=6,
                    cross_weight=0.005, layer_weight=0.01)
    out = crit(features, labels)
    base = pdcr_loss(features, labels, 3, [2, 4], rf_sizes=[5, 9], grid_spacing=4).loss
    centres = centres_of((16, 16), (4, 4), (0, 0))
    lab = labels.numpy()
    with torch.no_grad():
        za = crit.projections[0](torch.stack([features[0][0, :, c[0] // 2, c[1] // 2] for c in centres])).double()
        zb = crit.projections[1](torch.stack([features[1][0, :, c[0] // 4, c[1] // 4] for c in centres])).double()
    ha, hb = brute_fractions(lab, 3, 5, centres)[0], brute_fractions(lab, 3, 9, centres)[0]
    cross = 0.5 * (loop_pair_loss(za.numpy(), zb.numpy(), ha, hb, 0.5, "tv")
                   + loop_pair_loss(zb.numpy(), za.numpy(), hb, ha, 0.5, "tv"))
    assert abs(float(out.terms["cross"]) - cross) < 1e-5 * cross
    assert abs(float(out.loss.detach()) - (float(base) + 0.005 * cross)) < 1e-6
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crit.parameters())


def test_gradcheck_float64():
    labels = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(7))
    f = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pdcr_loss([x], labels, 3, [2], windows=[3, 5], grid_spacing=4).loss, (f,))


# ---------------------------------------------------------------------- the sign property
def swapped_pdcr(x: torch.Tensor, h: torch.Tensor, tau: float, swap: bool) -> torch.Tensor:
    """Local re-implementation for (1, C, n, n) features sampled at every voxel; ``swap=True`` puts the
    divergence in the numerator and the affinity in the denominator, as the released 2D code does."""
    z = F.normalize(x.flatten(2).transpose(1, 2), dim=2)
    s = (z @ z.transpose(1, 2) - 1.0) / tau
    d = 0.5 * torch.cdist(h, h, p=1)
    num_w, den_w = (d, 1.0 - d) if swap else (1.0 - d, d)
    return (torch.logsumexp(den_w * s, dim=2) - (num_w * s).mean(dim=2)).mean()


def _descend(loss_fn, x0: torch.Tensor, steps: int = 150) -> torch.Tensor:
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
    return x.detach()


def _same_diff_cosine(x: torch.Tensor, cls: torch.Tensor) -> tuple[float, float]:
    z = F.normalize(x.flatten(2)[0].T, dim=1)
    cos = z @ z.T
    same = (cls[:, None] == cls[None, :]) & ~torch.eye(len(cls), dtype=torch.bool)
    diff = cls[:, None] != cls[None, :]
    return float(cos[same].mean()), float(cos[diff].mean())


def test_descent_pulls_same_labels_together_and_pushes_different_apart_unlike_the_swapped_form():
    g = torch.Generator().manual_seed(5)
    cls = torch.randint(0, 3, (8, 8), generator=g)
    labels = cls.repeat_interleave(4, 0).repeat_interleave(4, 1)[None]  # (1, 32, 32), constant 4×4 blocks
    x0 = torch.randn(1, 16, 8, 8, generator=g)  # stride 4: one feature per block
    kwargs = dict(windows=[1], grid_spacing=4, temperature=0.5, layer_weight=1.0)
    h = patch_label_fractions(labels, 3, 1, sample_grid((32, 32), 4, [4]))
    assert torch.allclose(swapped_pdcr(x0, h, 0.5, swap=False), pdcr_loss([x0], labels, 3, [4], **kwargs).loss)

    same0, diff0 = _same_diff_cosine(x0, cls.flatten())
    same1, diff1 = _same_diff_cosine(_descend(lambda x: pdcr_loss([x], labels, 3, [4], **kwargs).loss, x0),
                                     cls.flatten())
    assert same1 > same0 + 0.3 and diff1 < diff0 - 0.1, (same0, same1, diff0, diff1)

    same2, diff2 = _same_diff_cosine(_descend(lambda x: swapped_pdcr(x, h, 0.5, swap=True), x0), cls.flatten())
    assert diff2 > diff0 + 0.1, (diff0, diff2)  # the released 2D weighting pulls different labels together
    assert not (same2 > same0 + 0.3 and diff2 < diff0 - 0.1)


# ---------------------------------------------------------------------- AMP, wiring, errors
def test_bf16_autocast_is_finite_float32_and_close_to_fp32():
    g = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv3d(2, 8, 3, padding=1)
    x = torch.randn(2, 2, 8, 8, 8, generator=g)
    labels = torch.randint(0, 3, (2, 16, 16, 16), generator=g)
    kwargs = dict(rf_sizes=[5], grid_spacing=4, layer_weight=1.0)
    ref = pdcr_loss([conv(x)], labels, 3, [2], **kwargs).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat = conv(x)
        assert feat.dtype == torch.bfloat16
        out = pdcr_loss([feat], labels, 3, [2], **kwargs).loss
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert abs(float(out.detach()) - float(ref.detach())) < 2e-2 * abs(float(ref.detach()))
    out.backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_for_backbone_on_a_unet_receptive_fields_and_gradients():
    model = build_backbone("plain_unet", preset="tiny", dim=3, num_classes=3)
    crit = PDCRLoss.for_backbone(model, stages=(2, 3), grid_spacing=8)
    assert crit.rf_sizes == [(9, 9, 9), (17, 17, 17)] and crit.strides == [(4, 4, 4), (8, 8, 8)]
    x = torch.randn(1, 1, 32, 32, 32)
    labels = torch.randint(0, 3, (1, 1, 32, 32, 32))  # (B, 1, *spatial) accepted too
    out = crit(crit.select(model.encode(x)), labels)
    assert out.terms["n_samples"] == 64 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.stages[3][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_released_nnunet_receptive_fields_and_swin_refused():
    nnunet = build_backbone("plain_unet", preset="nnunet-3d", dim=3)
    assert receptive_field_sizes(nnunet, [2, 3]) == [(23, 23, 23), (47, 47, 47)]
    with pytest.raises(ValueError, match="convolutional encoders"):
        receptive_field_sizes(build_backbone("swin_unetr", preset="tiny", dim=2), [2])


def test_bad_inputs_raise_clear_errors():
    f = [torch.randn(1, 4, 8, 8)]
    with pytest.raises(ValueError, match="integer label map"):
        pdcr_loss(f, torch.zeros(1, 16, 16), 2, [2], rf_sizes=[5], grid_spacing=4)
    with pytest.raises(ValueError, match="expected"):
        pdcr_loss(f, torch.zeros(1, 16, 12, dtype=torch.long), 2, [2], rf_sizes=[5], grid_spacing=4)
    with pytest.raises(ValueError, match="rf_sizes"):
        pdcr_loss(f, torch.zeros(1, 16, 16, dtype=torch.long), 2, [2], grid_spacing=4)
