"""A cheap online probe: how well do pooled encoder features predict where a crop sits in the body?

A fixed set of unaugmented crops (drawn once, deterministically) is encoded; a ridge regression from the
pooled deepest-stage features to the crops' body coordinates is fitted on the crops of half the cases and
scored (R^2) on the other half, and vice versa. Random features give R^2 <= ~0; features that know anatomy
give R^2 -> 1. Cross-case splitting keeps it from memorising a case's intensity.
"""

from __future__ import annotations

import numpy as np
import torch

from volcontrast.data.cache import Cache
from volcontrast.spatial.positions import body_position
from volcontrast.views.sampler import cut_box


class BodyPositionProbe:
    def __init__(self, cache: Cache, case_ids: list[str], crop_size: tuple[int, ...], n_crops: int = 48,
                 seed: int = 0, batch_size: int = 8):
        rng = np.random.default_rng([seed, 0x9B0BE])
        self.batch_size = batch_size
        crops, positions, groups = [], [], []
        ids = sorted(case_ids)
        dim = len(crop_size)
        for i in range(n_crops):
            cid = ids[i % len(ids)]
            image = cache.image(cid)
            meta = cache.meta(cid)
            shape = np.asarray(image.shape[1:])
            if dim == 3:
                lo = np.array([rng.integers(0, s - c + 1) for s, c in zip(shape, crop_size)])
                crops.append(cut_box(image, lo, crop_size, 0.0))
                centre = lo + (np.asarray(crop_size) - 1) / 2
            else:
                z = int(rng.integers(0, shape[2]))
                lo = np.array([rng.integers(0, s - c + 1) for s, c in zip(shape[:2], crop_size)])
                crops.append(cut_box(image[..., z], lo, crop_size, 0.0))
                centre = np.r_[lo + (np.asarray(crop_size) - 1) / 2, z]
            lo_b = np.array([b[0] for b in meta.body_bbox])
            hi_b = np.array([b[1] for b in meta.body_bbox])
            positions.append(body_position(centre, lo_b, hi_b))
            groups.append(ids.index(cid) % 2)
        self.crops = torch.from_numpy(np.stack(crops))
        self.targets = np.asarray(positions, dtype=np.float64)
        self.groups = np.asarray(groups)

    @torch.no_grad()
    def features(self, encode, device: torch.device) -> np.ndarray:
        out = []
        for i in range(0, len(self.crops), self.batch_size):
            x = self.crops[i : i + self.batch_size].to(device)
            out.append(encode(x).float().cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def score(self, features: np.ndarray) -> dict[str, float]:
        """Cross-case R^2 of ridge regression features -> body position (z and mean over x, y, z)."""
        r2 = []
        for test_group in (0, 1):
            train = self.groups != test_group
            test = ~train
            if train.sum() < 2 or test.sum() < 2:
                continue
            r2.append(ridge_r2(features[train], self.targets[train], features[test], self.targets[test]))
        if not r2:
            return {}
        mean = np.mean(r2, axis=0)
        return {"probe_r2_z": float(mean[2]), "probe_r2_xyz": float(mean.mean())}

    def __call__(self, encode, device: torch.device) -> dict[str, float]:
        return self.score(self.features(encode, device))


def ridge_r2(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             alpha: float = 1.0) -> np.ndarray:
    """Per-target R^2 on the test set of a ridge regression fitted on standardised training features."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    a = (x_train - mu) / sd
    b = (x_test - mu) / sd
    y_mu = y_train.mean(0)
    w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ (y_train - y_mu))
    pred = b @ w + y_mu
    ss_res = ((y_test - pred) ** 2).sum(0)
    ss_tot = ((y_test - y_test.mean(0)) ** 2).sum(0) + 1e-12
    return 1.0 - ss_res / ss_tot
