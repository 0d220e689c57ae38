"""Dice / HD95 against hand-computed values, and the NaN / empty-mask rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from volcontrast.engine.metrics import (
    NAN_RULE,
    aggregate,
    field_of_view_diagonal,
    format_metrics_table,
    jsonable,
    segmentation_metrics,
)
from volcontrast.errors import InputError

SPACING = (0.5, 2.0, 3.0)  # mm; the shift axis has the smallest spacing (see the derivation below)
SHAPE = (20, 12, 12)


def _box(x0: int, x1: int, label: int = 1) -> np.ndarray:
    a = np.zeros(SHAPE, np.uint8)
    a[x0:x1, 2:10, 2:10] = label
    return a


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shifted_box_dice_and_hd95_match_hand_values(k):
    # truth: 6 x 8 x 8 box at x = 4..9; prediction: the same box shifted by k voxels along x.
    # Dice = 2 |A∩B| / (|A|+|B|) = 2 * (6-k)*64 / (2 * 6*64) = (6-k)/6.
    # HD95 (MONAI: edge voxels = mask XOR its 6-connected erosion, Euclidean distance between voxel centres in
    # mm, nearest edge voxel of the other mask, 95th percentile per direction, max of both directions):
    # side-face edge voxels where the boxes overlap coincide (distance 0); the 36 inner voxels of the shifted
    # start face and the 64 voxels of the shifted end face are k voxels along x from the other box's face, i.e.
    # k * 0.5 mm (any other edge voxel is >= 2 mm away as k * 0.5 < 2). 100 of 240 edge voxels (> 5%) sit at
    # the largest distance k * 0.5 mm, so the 95th percentile is exactly k * 0.5 mm, both ways.
    m = segmentation_metrics(_box(4 + k, 10 + k), _box(4, 10), SPACING)
    assert set(m) == {1}
    assert m[1]["dice"] == pytest.approx((6 - k) / 6, abs=1e-6)
    assert m[1]["hd95"] == pytest.approx(k * SPACING[0], abs=1e-6)


def test_hd95_is_a_percentile_not_the_maximum():
    # one stray voxel far away: 1 of > 20 edge voxels, so the 95th percentile stays 0 while Dice drops slightly
    truth = _box(4, 10)
    pred = truth.copy()
    pred[18, 10, 10] = 1
    m = segmentation_metrics(pred, truth, SPACING)
    n = int(truth.sum())
    assert m[1]["dice"] == pytest.approx(2 * n / (2 * n + 1), abs=1e-6)
    assert m[1]["hd95"] == pytest.approx(0.0, abs=1e-9)


def test_2d_squares_with_anisotropic_spacing():
    # 10 x 10 square shifted by one pixel along axis 0 (0.4 mm; axis 1 is 1.5 mm):
    # Dice = 2*90/200 = 0.9; 18 of 36 edge pixels (start/end rows) are 0.4 mm away, the rest 0 -> HD95 = 0.4 mm.
    truth = np.zeros((30, 20), np.int64)
    truth[5:15, 5:15] = 2
    pred = np.zeros_like(truth)
    pred[6:16, 5:15] = 2
    m = segmentation_metrics(pred, truth, (0.4, 1.5))
    assert m[2]["dice"] == pytest.approx(0.9, abs=1e-6)
    assert m[2]["hd95"] == pytest.approx(0.4, abs=1e-6)
    # class 1 lies in 1..max but is absent from both -> NaN, NaN
    assert math.isnan(m[1]["dice"]) and math.isnan(m[1]["hd95"])


def test_class_absent_from_both_is_nan_and_skipped_by_aggregate():
    truth, pred = _box(4, 10), _box(5, 11)
    per_case = {
        "a": segmentation_metrics(pred, truth, SPACING, classes=[1, 3]),
        "b": segmentation_metrics(truth, truth, SPACING, classes=[1, 3]),
    }
    assert math.isnan(per_case["a"][3]["dice"]) and math.isnan(per_case["a"][3]["hd95"])
    agg = aggregate(per_case)
    assert agg["classes"] == [1, 3]
    assert agg["per_class"][1]["dice"] == pytest.approx((5 / 6 + 1.0) / 2, abs=1e-6)
    assert agg["per_class"][1]["hd95"] == pytest.approx((0.5 + 0.0) / 2, abs=1e-6)
    assert agg["per_class"][1]["n_dice"] == 2
    assert agg["per_class"][3]["n_dice"] == 0 and math.isnan(agg["per_class"][3]["dice"])
    # NaN class skipped: the overall mean equals the class-1 mean, not something dragged to NaN or 0
    assert agg["mean_dice"] == pytest.approx((5 / 6 + 1.0) / 2, abs=1e-6)
    assert agg["n_nan"] == {"dice": 2, "hd95": 2} and agg["n_entries"] == 4


def test_one_sided_class_gets_dice_zero_and_fov_diagonal():
    truth = _box(4, 10)
    diag = math.sqrt((20 * 0.5) ** 2 + (12 * 2.0) ** 2 + (12 * 3.0) ** 2)
    assert field_of_view_diagonal(SHAPE, SPACING) == pytest.approx(diag)
    missed = segmentation_metrics(np.zeros_like(truth), truth, SPACING)  # organ missed entirely
    hallucinated = segmentation_metrics(truth, np.zeros_like(truth), SPACING)  # organ predicted, absent in truth
    for m in (missed, hallucinated):
        assert m[1]["dice"] == 0.0
        assert m[1]["hd95"] == pytest.approx(diag)
    assert "field-of-view diagonal" in NAN_RULE


def test_aggregate_means_classes_within_case_then_cases():
    nan = math.nan
    per_case = {
        "a": {1: {"dice": 0.8, "hd95": 2.0}, 2: {"dice": 0.4, "hd95": 6.0}},
        "b": {1: {"dice": 0.6, "hd95": 4.0}, 2: {"dice": nan, "hd95": nan}},
        "c": {1: {"dice": nan, "hd95": nan}, 2: {"dice": nan, "hd95": nan}},  # all NaN: skipped
    }
    agg = aggregate(per_case)
    assert agg["per_case"]["a"]["dice"] == pytest.approx(0.6)
    assert agg["mean_dice"] == pytest.approx((0.6 + 0.6) / 2)  # case means 0.6 and 0.6; case c skipped
    assert agg["mean_hd95"] == pytest.approx((4.0 + 4.0) / 2)
    assert agg["per_class"][2]["dice"] == pytest.approx(0.4)
    assert agg["n_nan"]["dice"] == 3 and agg["n_cases"] == 3
    doc = json.loads(json.dumps(jsonable(agg), allow_nan=False))
    assert doc["per_case"]["c"]["dice"] is None and doc["per_class"]["1"]["dice"] == pytest.approx(0.7)


def test_table_lists_every_case_class_and_the_rule():
    per_case = {"c1": segmentation_metrics(_box(5, 11), _box(4, 10), SPACING, classes=[1, 2])}
    text = format_metrics_table(per_case, label_names={1: "liver"})
    assert "| c1 | 1 (liver) | 0.833 | 0.50 |" in text
    assert "| c1 | 2 | NaN | NaN |" in text
    assert NAN_RULE in text


@pytest.mark.parametrize(
    ("pred", "truth", "spacing", "needle"),
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), (1, 1, 1), "differs from truth shape"),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4), int), (1, 1, 1), "non-integer"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), (1, 1), "spacing"),
        (np.full((4, 4, 4), -1), np.zeros((4, 4, 4), int), (1, 1, 1), "negative"),
    ],
)
def test_bad_input_is_one_line_error_naming_the_case(pred, truth, spacing, needle):
    with pytest.raises(InputError, match=needle) as exc:
        segmentation_metrics(pred, truth, spacing, where="case07")
    assert str(exc.value).startswith("case07: ") and "\n" not in str(exc.value)
