"""Sliding-window inference: shapes, probabilities, exact stitching, 2D slice stacking, deep supervision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from volcontrast.engine.inference import predict_labels, sliding_window_probabilities, window_shape
from volcontrast.nets import build_backbone


class IdentityLogits(nn.Module):
    """Returns its input as logits (so the input channels are the classes); optional deep-supervision list."""

    def __init__(self, dim: int = 3, deep_supervision: bool = False):
        super().__init__()
        self.dim = dim
        self.min_input_multiple = (1,) * dim
        self.deep_supervision = deep_supervision
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor):
        self.seen.append(tuple(x.shape))
        if self.deep_supervision:  # full resolution first, then a coarser (wrong-size) map
            return [x.clone(), x[(slice(None), slice(None), *(slice(None, None, 2),) * self.dim)] * 0]
        return x.clone()


def one_hot_logits(labels: np.ndarray, n_classes: int, scale: float = 12.0) -> torch.Tensor:
    """(X, Y, Z) class map -> (K, X, Y, Z) logits ``scale * one_hot``."""
    return scale * torch.nn.functional.one_hot(torch.as_tensor(labels).long(), n_classes).permute(3, 0, 1, 2).float()


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_identity_model_is_stitched_exactly(overlap, rng):
    labels = rng.integers(0, 3, size=(23, 19, 17))
    logits = one_hot_logits(labels, 3)
    model = IdentityLogits()
    probs = sliding_window_probabilities(model, logits, (8, 8, 8), overlap=overlap, batch_size=3)
    assert probs.shape == (3, 23, 19, 17) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits, 0), atol=1e-5, rtol=0)
    predicted = predict_labels(model, logits.numpy(), (8, 8, 8), overlap=overlap, batch_size=3)
    np.testing.assert_array_equal(predicted, labels)
    assert all(s[0] <= 3 and s[2:] == (8, 8, 8) for s in model.seen)  # batches of <= 3 windows of the patch size


def test_small_image_is_padded_and_cropped_back_and_deep_supervision_uses_full_resolution(rng):
    labels = rng.integers(0, 2, size=(5, 12, 7))
    logits = one_hot_logits(labels, 2)
    model = IdentityLogits(deep_supervision=True)
    probs = sliding_window_probabilities(model, logits, (8, 8, 8))
    assert probs.shape == (2, 5, 12, 7)
    assert {s[2:] for s in model.seen} == {(8, 8, 8)}
    np.testing.assert_array_equal(probs.argmax(0).numpy(), labels)


def test_2d_identity_runs_slice_by_slice(rng):
    labels = rng.integers(0, 4, size=(13, 11, 6))
    model = IdentityLogits(dim=2)
    probs = sliding_window_probabilities(model, one_hot_logits(labels, 4), (8, 8), overlap=0.5)
    assert probs.shape == (4, 13, 11, 6)
    assert {s[1:] for s in model.seen} == {(4, 8, 8)}
    np.testing.assert_array_equal(probs.argmax(0).numpy(), labels)


def test_tiny_3d_backbone_on_non_multiple_size_gives_probabilities():
    torch.manual_seed(0)
    model = build_backbone("plain_unet", preset="tiny", dim=3, num_classes=3).train()
    image = torch.randn(1, 21, 18, 13)
    probs = sliding_window_probabilities(model, image, (16, 16, 16), overlap=0.5, batch_size=2)
    assert probs.shape == (3, 21, 18, 13)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(21, 18, 13), atol=1e-5, rtol=0)
    assert model.training  # the caller's mode is restored


def test_single_window_equals_a_plain_forward():
    torch.manual_seed(0)
    model = build_backbone("plain_unet", preset="tiny", dim=3, num_classes=2).eval()
    image = torch.randn(1, 16, 16, 16)
    probs = sliding_window_probabilities(model, image, (16, 16, 16))
    with torch.no_grad():
        direct = torch.softmax(model(image[None])[0], 0)
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-5)


def test_tiny_2d_backbone_matches_per_slice_forward():
    torch.manual_seed(0)
    model = build_backbone("plain_unet", preset="tiny", dim=2, num_classes=2).eval()
    image = torch.randn(1, 16, 16, 3)
    probs = sliding_window_probabilities(model, image, (16, 16, 16))  # Z of a 3-number patch is ignored
    assert probs.shape == (2, 16, 16, 3)
    with torch.no_grad():
        direct = torch.stack([torch.softmax(model(image[None, :, :, :, z])[0], 0) for z in range(3)], dim=-1)
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-5)
    odd = sliding_window_probabilities(model, torch.randn(1, 21, 10, 4), (16, 16))
    assert odd.shape == (2, 21, 10, 4)
    torch.testing.assert_close(odd.sum(0), torch.ones(21, 10, 4), atol=1e-5, rtol=0)


def test_window_is_rounded_up_to_the_model_multiple():
    model = build_backbone("plain_unet", preset="tiny", dim=3)
    assert window_shape(model, (20, 16, 9)) == (24, 16, 16)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_probabilities(model, torch.zeros(1, 8, 8, 8), (8, 8, 8), overlap=1.0)
