"""UAFS: F·(2 − U) for a hand-set head, U range and extremes, U-Nets with UAFS (2D/3D) and weight loading."""

from __future__ import annotations

import math

import pytest
import torch

from volcontrast.nets import build_backbone, deduplicated_state_dict, load_backbone_state, load_encoder_state
from volcontrast.nets.uafs import UAFS, add_uafs, uafs_parameter_prefix

torch.set_num_threads(2)


def _constant_head(block: UAFS, bias: tuple[float, float]) -> None:
    """Make the logits the constant ``bias`` everywhere (zero output weights)."""
    with torch.no_grad():
        block.head[-1].weight.zero_()
        block.head[-1].bias.copy_(torch.tensor(bias))


@pytest.mark.parametrize("dim", [2, 3])
def test_output_is_f_times_two_minus_u_for_a_hand_set_head(dim):
    block = UAFS(3, dim, hidden=1, norm="none")
    with torch.no_grad():  # hidden = relu(channel 0 at the centre tap); logits = (hidden, −hidden) + (0.5, 0)
        first, last = block.head[0], block.head[-1]
        first.weight.zero_()
        first.weight[(0, 0, *([1] * dim))] = 1.0
        first.bias.zero_()
        last.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, *([1] * dim)))
        last.bias.copy_(torch.tensor([0.5, 0.0]))
    x = torch.randn(2, 3, *([6] * dim), generator=torch.Generator().manual_seed(0))
    r = x[:, :1].clamp_min(0)
    p = torch.sigmoid(2 * r + 0.5)  # softmax of (r + 0.5, −r) along the 2 channels
    u = -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)
    assert torch.allclose(block.uncertainty(x), u, atol=1e-6)
    assert torch.allclose(block(x), x * (2 - u), atol=1e-6)


def test_uncertainty_range_and_extremes():
    block = UAFS(8, 3)
    x = 5 * torch.randn(2, 8, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    u = block.uncertainty(x).detach()
    assert u.shape == (2, 1, 6, 6, 6) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0 and float(u.std()) > 0
    _constant_head(block, (0.3, 0.3))  # equal logits: maximal uncertainty, identity
    assert torch.allclose(block.uncertainty(x), torch.ones_like(u), atol=1e-6)
    assert torch.allclose(block(x), x, atol=1e-5)
    _constant_head(block, (30.0, -30.0))  # confident head: U = 0, output 2F
    assert float(block.uncertainty(x).detach().max()) < 1e-6
    assert torch.allclose(block(x), 2 * x, atol=1e-5)


def test_bf16_autocast_keeps_dtype_and_u_in_range():
    block = UAFS(8, 2)
    x = torch.randn(2, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x.bfloat16())
        u = block.uncertainty(x).detach()
    assert y.dtype == torch.bfloat16 and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    assert torch.allclose(y.float(), block(x), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(("dim", "shape"), [(2, (32, 32)), (3, (16, 16, 16))])
def test_unet_with_uafs_runs_and_loads_weights_saved_without_it(dim, shape):
    torch.manual_seed(0)
    plain = build_backbone("plain_unet", preset="tiny", dim=dim, num_classes=3)
    saved = deduplicated_state_dict(plain)  # written by a model without UAFS
    x = torch.randn(2, 1, *shape)
    want = plain(x)

    model = add_uafs(build_backbone("plain_unet", preset="tiny", dim=dim, num_classes=3))
    assert [b.channels for b in model.post_decoder_blocks] == model.decoder_channels
    uafs_keys = [k for k in model.state_dict() if k.startswith(uafs_parameter_prefix)]
    assert uafs_keys and not any(k.startswith(uafs_parameter_prefix) for k in saved)

    report = load_encoder_state(model, saved)
    assert report.ok
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, plain.encoder.state_dict()[k])

    missing = load_backbone_state(model, saved)
    assert sorted(missing) == sorted(uafs_keys)
    out = model(x)
    assert out.shape == want.shape == (2, 3, *shape)
    assert not torch.allclose(out, want)  # the blocks act (U < 1 somewhere)
    _ = [_constant_head(b, (0.0, 0.0)) for b in model.post_decoder_blocks]
    assert torch.allclose(model(x), want, atol=1e-5)  # U ≡ 1 → identity → the plain network exactly

    model2 = add_uafs(build_backbone("plain_unet", preset="tiny", dim=dim, num_classes=3))
    assert load_backbone_state(model2, deduplicated_state_dict(model)) == []  # round trip with UAFS


def test_uafs_heads_receive_gradients_in_training():
    model = add_uafs(build_backbone("plain_unet", preset="tiny", dim=3, num_classes=2))
    model(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    for block in model.post_decoder_blocks:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_outputs"):
        UAFS(8, 3, num_outputs=1)
    with pytest.raises(ValueError, match="norm"):
        UAFS(8, 3, norm="layer")
    with pytest.raises(ValueError, match="expects"):
        UAFS(8, 3)(torch.randn(1, 4, 4, 4, 4))
