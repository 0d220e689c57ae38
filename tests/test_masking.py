"""Tube masks (exact ratio, tube and block structure, randomness), apply_mask and masked_mse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from volcontrast.views.masking import apply_mask, masked_mse, tube_mask


def _plane(mask: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """The (B, H, W) in-plane mask, after checking that it is constant along the slice axis."""
    first = mask.select(slice_axis + 1, 0)
    assert torch.equal(mask, first.unsqueeze(slice_axis + 1).expand_as(mask))
    return first


def _blocks(plane: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """(B, gh, gw) block grid of a (B, H, W) plane; asserts every block (partial ones too) is uniform."""
    b, h, w = plane.shape
    gh, gw = -(-h // bh), -(-w // bw)
    grid = torch.zeros(b, gh, gw, dtype=torch.bool)
    for i in range(gh):
        for j in range(gw):
            cell = plane[:, i * bh : (i + 1) * bh, j * bw : (j + 1) * bw].flatten(1)
            assert torch.equal(cell.all(1), cell.any(1)), "a block is partly masked"
            grid[:, i, j] = cell[:, 0]
    return grid


@pytest.mark.parametrize("slice_axis", [2, 0, -2])
def test_exact_ratio_tubes_and_block_alignment(slice_axis):
    shape = [32, 32, 32]
    shape[slice_axis % 3] = 6  # the slice axis has its own length
    g = torch.Generator().manual_seed(0)
    mask = tube_mask(4, shape, ratio=0.75, block=(8, 8), slice_axis=slice_axis, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (4, *shape)
    # 4×4 grid of 8×8 blocks, 12 masked: exactly 75 % of the voxels of every sample
    assert mask.flatten(1).float().mean(1).tolist() == [0.75] * 4
    plane = _plane(mask, slice_axis % 3)  # every masked voxel's column along the slice axis is fully masked
    grid = _blocks(plane, 8, 8)
    assert grid.flatten(1).sum(1).tolist() == [12] * 4


def test_partial_blocks_and_rectangular_block():
    # plane 20 × 13 with 8 × 5 blocks: a 3 × 3 grid (last row/column partial); round(0.5 · 9) = 5 blocks
    mask = tube_mask(6, (20, 5, 13), ratio=0.5, block=(8, 5), slice_axis=1, generator=torch.Generator().manual_seed(3))
    plane = _plane(mask, 1)
    assert plane.shape == (6, 20, 13)
    grid = _blocks(plane, 8, 5)
    assert grid.flatten(1).sum(1).tolist() == [5] * 6
    # partial blocks mask exactly the voxels they cover: the mask is the grid upsampled and cropped
    up = grid.repeat_interleave(8, 1).repeat_interleave(5, 2)[:, :20, :13]
    assert torch.equal(plane, up)


def test_different_samples_and_seeded_determinism():
    def make(seed: int) -> torch.Tensor:
        return tube_mask(8, (16, 16, 4), 0.75, block=4, generator=torch.Generator().manual_seed(seed))

    a, b, c = make(7), make(7), make(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    distinct = {tuple(m.flatten().tolist()) for m in a}
    assert len(distinct) > 1  # each sample draws its own blocks


def test_two_dimensional_masks_have_no_extrusion():
    mask = tube_mask(3, (24, 16), ratio=0.25, block=8, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (3, 24, 16)
    grid = _blocks(mask, 8, 8)  # 3 × 2 grid, round(1.5) = 2 blocks (half rounded up)
    assert grid.flatten(1).sum(1).tolist() == [2] * 3
    assert mask.flatten(1).float().mean(1).tolist() == pytest.approx([2 / 6] * 3)


def test_zero_ratio_and_device():
    mask = tube_mask(2, (8, 8, 8), ratio=0.0, block=4, device="cpu")
    assert not mask.any()
    assert tube_mask(0, (8, 8, 8), block=4).shape == (0, 8, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"block": (0, 4)}, "block"),
        ({"block": (4, 4, 4)}, "block"),
        ({"slice_axis": 3}, "slice_axis"),
        ({"spatial_shape": (4, 4, 4, 4)}, "spatial_shape"),
        ({"spatial_shape": (4, 0, 4)}, "spatial_shape"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"batch": 1, "spatial_shape": (8, 8, 8), "block": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        tube_mask(**args)


def test_apply_mask_zeroes_every_channel_of_masked_voxels_only():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, 4, generator=g) + 1.0  # strictly positive
    mask = tube_mask(2, (8, 8, 4), 0.5, block=4, generator=g)
    out = apply_mask(x, mask)
    m = mask.unsqueeze(1).expand_as(x)
    assert (out[m] == 0).all() and torch.equal(out[~m], x[~m])
    assert apply_mask(x, mask, value=-1.0)[m].eq(-1.0).all()
    with pytest.raises(ValueError, match="bool"):
        apply_mask(x, mask.float())
    with pytest.raises(ValueError, match="mask must be"):
        apply_mask(x, mask[:, :4])


def test_masked_mse_ignores_visible_voxels_and_matches_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 2, 8, 8, 4, generator=g), torch.randn(2, 2, 8, 8, 4, generator=g)
    mask = tube_mask(2, (8, 8, 4), 0.75, block=4, generator=g)
    m = mask.unsqueeze(1).expand_as(pred)
    loss = masked_mse(pred, target, mask)
    direct = ((pred - target) ** 2)[m].sum() / m.sum()
    torch.testing.assert_close(loss, direct)
    visible_changed = pred.clone()
    visible_changed[~m] += 100.0
    torch.testing.assert_close(masked_mse(visible_changed, target, mask), loss, rtol=0, atol=0)
    masked_changed = pred.clone()
    masked_changed[m.nonzero()[0].unbind()] += 1.0
    assert not torch.allclose(masked_mse(masked_changed, target, mask), loss)
    # all-voxel mode (Alice code) and no mask
    torch.testing.assert_close(masked_mse(pred, target, mask, masked_only=False), F.mse_loss(pred, target))
    torch.testing.assert_close(masked_mse(pred, target), F.mse_loss(pred, target))


def test_masked_mse_without_masked_voxels_is_zero_with_a_graph():
    pred = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    loss = masked_mse(pred, torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and not pred.grad.any()


def test_masked_mse_gradient_only_on_masked_voxels():
    pred = torch.randn(1, 1, 8, 8, 2, requires_grad=True)
    mask = tube_mask(1, (8, 8, 2), 0.5, block=4, generator=torch.Generator().manual_seed(2))
    masked_mse(pred, torch.zeros_like(pred), mask).backward()
    assert torch.equal(pred.grad[0, 0] != 0, mask[0])
