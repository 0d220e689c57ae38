"""Positive masks (SimCLR, GCL, PCL) and the position conventions they are built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import volcontrast.spatial as spatial
from volcontrast.spatial import (
    body_position,
    gcl_positive_mask,
    index_position,
    partition_index,
    pcl_positive_mask,
    simclr_positive_mask,
    view_item_ids,
)


def _views(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and item ids of the 2N rows [view 1; view 2] of N items."""
    n = positions.shape[0]
    return torch.cat([positions, positions]), view_item_ids(n)


def test_view_item_ids_layout():
    assert view_item_ids(3).tolist() == [0, 1, 2, 0, 1, 2]
    assert view_item_ids(2, 3, offset=10).tolist() == [10, 11, 10, 11, 10, 11]


def test_simclr_mask_pairs_the_views():
    mask = simclr_positive_mask(view_item_ids(4))
    want = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(4):
        want[i, i + 4] = want[i + 4, i] = True
    assert torch.equal(mask, want)


def test_pcl_mask_matches_rule_and_properties():
    g = torch.Generator().manual_seed(0)
    pos, ids = _views(torch.rand(20, generator=g))
    lam = 0.1
    mask = pcl_positive_mask(pos, lam, item_ids=ids)
    m = len(pos)
    for a in range(m):
        for b in range(m):
            want = a != b and (abs(float(pos[a]) - float(pos[b])) < lam or int(ids[a]) == int(ids[b]))
            assert bool(mask[a, b]) == want
    assert mask.dtype == torch.bool
    assert torch.equal(mask, mask.T)
    assert not mask.diagonal().any()
    assert mask[torch.arange(20), torch.arange(20) + 20].all()  # both views of each item
    assert (mask.sum(1) >= 1).all()


def test_pcl_threshold_is_strict():
    pos = torch.tensor([0.25, 0.5, 0.75, 0.5])  # exact binary fractions: |Δ| = 0.25 exactly
    mask = pcl_positive_mask(pos, 0.25)
    assert not mask[0, 1] and not mask[1, 2]
    assert mask[1, 3]  # equal positions, different rows
    assert pcl_positive_mask(pos, 0.2500001)[0, 1]


def test_pcl_expected_positive_count_for_uniform_positions():
    n, lam = 2000, 0.1
    pos, ids = _views(torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    mean_pos = pcl_positive_mask(pos, lam, item_ids=ids).sum(1).double().mean().item()
    want = (2 * lam - lam**2) * (2 * n - 2) + 1
    assert mean_pos == pytest.approx(want, rel=0.03)


def test_pcl_with_zero_threshold_is_simclr():
    pos, ids = _views(torch.rand(16, generator=torch.Generator().manual_seed(2)))
    pos[3] = pos[5]  # even identical positions of different items are not positive at λ = 0
    assert torch.equal(pcl_positive_mask(pos, 0.0, item_ids=ids), simclr_positive_mask(ids))
    assert not torch.equal(pcl_positive_mask(pos, 1e-6, item_ids=ids), simclr_positive_mask(ids))


def test_pcl_per_axis_thresholds_3d():
    g = torch.Generator().manual_seed(3)
    pos, ids = _views(torch.rand(15, 3, generator=g))
    lam = (0.2, 0.3, 0.1)
    mask = pcl_positive_mask(pos, lam, item_ids=ids)
    for a in range(30):
        for b in range(30):
            close = all(abs(float(pos[a, k]) - float(pos[b, k])) < lam[k] for k in range(3))
            assert bool(mask[a, b]) == (a != b and (close or int(ids[a]) == int(ids[b])))
    # one scalar threshold applies to every axis
    assert torch.equal(pcl_positive_mask(pos, 0.2, ids), pcl_positive_mask(pos, (0.2, 0.2, 0.2), ids))
    with pytest.raises(ValueError, match="threshold has 2 values"):
        pcl_positive_mask(pos, (0.1, 0.2))


def test_gcl_same_partition_iff_positive():
    g = torch.Generator().manual_seed(4)
    pos, ids = _views(torch.rand(24, generator=g))
    pos[0] = pos[24] = 1.0  # the top edge belongs to the last partition
    mask = gcl_positive_mask(pos, partitions=4, item_ids=ids)
    part = [min(int(float(p) * 4), 3) for p in pos]
    for a in range(48):
        for b in range(48):
            assert bool(mask[a, b]) == (a != b and part[a] == part[b])
    assert torch.equal(mask, mask.T) and not mask.diagonal().any()
    # (M, 3) positions: the body (last, superior) axis decides
    pos3 = torch.stack([torch.rand(48, generator=g), torch.rand(48, generator=g), pos], dim=1)
    assert torch.equal(gcl_positive_mask(pos3, 4, ids), mask)


def test_partition_index_rule():
    p = np.array([0.0, 0.2499, 0.25, 0.5, 0.999, 1.0, 1.05, -0.01])
    assert partition_index(p, 4).tolist() == [0, 0, 1, 2, 3, 3, 3, 0]
    assert partition_index(torch.tensor(p), 4).tolist() == [0, 0, 1, 2, 3, 3, 3, 0]
    assert partition_index(0.6, 4) == 2


def test_index_position_paper_parity():
    i = np.arange(10)
    np.testing.assert_allclose(index_position(i, 10), (i + 1) / 10)
    assert torch.allclose(index_position(torch.arange(4), 4), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert index_position(4, 5) == 1.0


def test_body_position_half_open_box():
    # voxel centres of the first and last voxel inside a box [2, 12) along one axis
    assert body_position(2, 2, 12) == pytest.approx(0.05)
    assert body_position(11, 2, 12) == pytest.approx(0.95)
    # per axis, and a crop centre: crop voxels 4..7 on axis 0 has centre (4 + 8 - 1) / 2 = 5.5
    got = body_position(np.array([5.5, 3.0, 0.0]), np.array([0, 0, 0]), np.array([8, 4, 2]))
    np.testing.assert_allclose(got, [0.75, 0.875, 0.25])
    t = body_position(torch.tensor([[5.5, 3.0, 0.0]]), torch.tensor([0, 0, 0]), torch.tensor([8, 4, 2]))
    assert torch.allclose(t, torch.tensor([[0.75, 0.875, 0.25]]))
    with pytest.raises(ValueError, match="empty body box"):
        body_position(1.0, 5, 5)


def test_index_and_body_positions_agree_on_full_field_of_view_and_differ_when_cropped():
    n = 20
    j = np.arange(n)
    # scan A: the body fills all 20 slices -> the conventions differ only by a constant half slice
    body_a, index_a = body_position(j, 0, n), index_position(j, n)
    np.testing.assert_allclose(index_a - body_a, 0.5 / n)
    # scan B: the same anatomy, with 20 extra slices of air below (a wider field of view);
    # anatomy at slice j of A sits at slice j + 20 of B, body box [20, 40)
    body_b, index_b = body_position(j + 20, 20, 40), index_position(j + 20, 40)
    np.testing.assert_allclose(body_b, body_a, atol=1e-12)  # same anatomy, same body position
    assert np.abs(index_b - index_a).max() > 0.4  # the index position disagrees
    # so PCL masks across the two scans differ by convention
    pa = torch.tensor(np.concatenate([body_a, body_b]))
    pi = torch.tensor(np.concatenate([index_a, index_b]))
    cross = (slice(0, n), slice(n, 2 * n))
    assert pcl_positive_mask(pa, 0.1)[cross].diagonal().all()
    assert not pcl_positive_mask(pi, 0.1)[cross].diagonal().all()


def test_package_exports():
    for name in ("pcl_positive_mask", "gcl_positive_mask", "simclr_positive_mask", "body_position"):
        assert hasattr(spatial, name)
