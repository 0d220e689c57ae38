"""Collapse monitors: each condition trips after ``patience`` judged rows, says so once, and resets."""

from __future__ import annotations

import pytest

from volcontrast.methods.monitors import ContrastiveCollapse, SelfDistillationCollapse, SignalBound


def _row(loss, value=5.0, spread=0.2, pos=0.8, neg=0.2):
    return {"loss": loss, "collapse_value": value, "embedding_spread": spread, "pos_cosine": pos, "neg_cosine": neg}


@pytest.mark.parametrize(("row", "collapsed"), [
    (_row(4.0), False),  # learning: far below the collapse value
    (_row(4.95, spread=0.2), False),  # near the value but positives and negatives apart (GCL-like)
    (_row(4.95, spread=0.01), True),  # near and no spread
    (_row(4.925, pos=0.97, neg=0.94), True),  # the near-collapse: 1.5% below, cosines 0.97 / 0.94
    (_row(4.80, pos=0.97, neg=0.94), True),  # cosines converged high, whatever the loss
    (_row(4.80, pos=0.50, neg=0.47), False),  # close cosines but low and the loss away from the value
    (_row(4.0, spread=1e-4), True),  # no spread at all
    ({"loss": 1.0}, False),  # a method without the diagnostics
])
def test_contrastive_collapse_conditions(row, collapsed):
    assert (ContrastiveCollapse().collapsed(row) is not None) == collapsed


def test_contrastive_monitor_trips_after_patience_and_resets():
    m = ContrastiveCollapse()
    bad, good = _row(4.95, spread=0.01), _row(4.0)
    out = [m.update(r, True, 3) for r in (bad, bad, bad, bad, good, bad)]
    assert [f for f, _ in out] == [False, False, True, True, False, False]
    assert [msg is not None for _, msg in out] == [False, False, True, False, False, False]
    assert out[2][1].startswith("the loss sits within 3% of the collapse value 5.0000")
    assert m.update(bad, False, 3) == (False, None) and m.count == 0  # not judged yet


def test_self_distillation_collapse_one_prototype_or_uniform():
    m = SelfDistillationCollapse(usage_floor=0.01, entropy_ceiling=5.0)
    assert m.collapsed({"prototype_usage": 0.5, "teacher_entropy": 2.0}) is None
    assert "same prototype" in m.collapsed({"prototype_usage": 0.004, "teacher_entropy": 2.0})
    assert "uniform" in m.collapsed({"prototype_usage": 0.5, "teacher_entropy": 5.5})


def test_signal_bound_above_and_below():
    above = SignalBound(column="c", bound=0.99, above=True, message="alike")
    below = SignalBound(column="c", bound=0.01, above=False, message="flat")
    assert above.collapsed({"c": 0.995}) == "alike (c 0.9950 >= 0.99)" and above.collapsed({"c": 0.5}) is None
    assert below.collapsed({"c": 0.005}) == "flat (c 0.0050 <= 0.01)" and below.collapsed({"c": 0.5}) is None
    assert above.collapsed({}) is None
