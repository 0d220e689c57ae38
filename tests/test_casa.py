"""CASA cross-attention block: shapes, stop-gradient by the caller, key-order invariance; token helpers."""

from __future__ import annotations

import pytest
import torch

from volcontrast.nets.casa import CASABlock, TokenProjection, to_tokens

DIM = 16


def _block(seed: int = 0, **kwargs) -> CASABlock:
    torch.manual_seed(seed)
    return CASABlock(DIM, heads=4, **kwargs).eval()


def test_output_shapes_and_structure():
    block = _block()
    q, kv = torch.randn(2, 5, DIM), torch.randn(2, 11, DIM)
    out = block(q, kv)
    assert out.shape == (2, 5, DIM)
    assert block(q, kv, torch.randn(2, 11, DIM)).shape == (2, 5, DIM)
    # post-norm: every output token is LayerNorm'd (zero mean, unit variance before the affine, which is
    # the identity at initialisation)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    assert block.ffn[0].out_features == 4 * DIM
    assert CASABlock(DIM, heads=8).attn.num_heads == 8


def test_output_equals_the_written_formula():
    block = _block()
    q, kv = torch.randn(3, 4, DIM), torch.randn(3, 7, DIM)
    attn, _ = block.attn(q, kv, kv)
    x = block.norm1(q + attn)
    torch.testing.assert_close(block(q, kv), block.norm2(x + block.ffn(x)))


def test_gradient_reaches_student_and_block_but_not_a_detached_teacher():
    block = _block().train()
    student_q = torch.randn(2, 4, DIM, requires_grad=True)
    student_kv = torch.randn(2, 9, DIM, requires_grad=True)
    teacher_src = torch.randn(2, 9, DIM, requires_grad=True)
    teacher_kv = teacher_src * 2.0  # an upstream op, so the teacher tokens are part of a graph
    s = block(student_q, student_kv)
    t = block(student_q, teacher_kv.detach())
    (s.square().sum() + (s * t).sum()).backward()
    assert student_q.grad is not None and student_q.grad.abs().sum() > 0
    assert student_kv.grad is not None and student_kv.grad.abs().sum() > 0
    assert teacher_src.grad is None
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_key_order_does_not_matter_but_keys_do():
    block = _block()
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(2, 5, DIM, generator=g), torch.randn(2, 12, DIM, generator=g)
    perm = torch.randperm(12, generator=g)
    out = block(q, kv)
    torch.testing.assert_close(block(q, kv[:, perm]), out, atol=1e-5, rtol=0)
    # queries: equivariant (permuting them permutes the output rows)
    qperm = torch.tensor([4, 2, 0, 1, 3])
    torch.testing.assert_close(block(q[:, qperm], kv), out[:, qperm], atol=1e-5, rtol=0)
    changed = kv.clone()
    changed[:, 0] += 3.0
    assert not torch.allclose(block(q, changed), out, atol=1e-3)
    # a padded key is ignored
    padded = torch.cat([kv, torch.randn(2, 3, DIM, generator=g)], dim=1)
    pad_mask = torch.zeros(2, 15, dtype=torch.bool)
    pad_mask[:, 12:] = True
    torch.testing.assert_close(block(q, padded, key_padding_mask=pad_mask), out, atol=1e-5, rtol=0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiple of heads"):
        CASABlock(10, heads=4)
    with pytest.raises(ValueError, match="activation"):
        CASABlock(DIM, heads=4, activation="tanh")
    block = _block()
    with pytest.raises(ValueError, match="keys"):
        block(torch.randn(2, 3, DIM), torch.randn(2, 4, DIM + 1))
    with pytest.raises(ValueError, match="disagree"):
        block(torch.randn(2, 3, DIM), torch.randn(3, 4, DIM))


def test_to_tokens_order_and_projection_to_a_common_dim():
    fmap = torch.randn(2, 5, 3, 4, 2)
    tokens = to_tokens(fmap)
    assert tokens.shape == (2, 24, 5)
    # token n is voxel unravel(n, (3, 4, 2)) in C order
    assert torch.equal(tokens[1, 1 * 8 + 2 * 2 + 1], fmap[1, :, 1, 2, 1])
    bottleneck, decoder = torch.randn(2, 32, 2, 2, 2), torch.randn(2, 8, 4, 4, 4)
    proj_b, proj_d = TokenProjection(32, DIM), TokenProjection(8, DIM)
    tb, td = to_tokens(bottleneck, proj_b), to_tokens(decoder, proj_d)
    assert tb.shape == (2, 8, DIM) and td.shape == (2, 64, DIM)
    torch.testing.assert_close(tb.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)  # LayerNorm'd
    assert _block()(tb, td).shape == (2, 8, DIM)
    plain = TokenProjection(8, DIM, norm=False)
    flat = to_tokens(decoder)
    torch.testing.assert_close(plain(flat), flat @ plain.linear.weight.T + plain.linear.bias)
    with pytest.raises(ValueError, match="C, \\*spatial"):
        to_tokens(torch.randn(2, 5))
    with pytest.raises(ValueError, match="32"):
        proj_b(torch.randn(2, 3, 31))
