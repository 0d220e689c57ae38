from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory):
    """A prepared cache of 4 small labelled CT phantoms (varying orientation and spacing)."""
    from volcontrast.data.prepare import prepare_dataset

    from helpers import write_nnunet

    root = tmp_path_factory.mktemp("phantoms")
    raw = write_nnunet(root / "raw", n=4, shape=(28, 26, 24),
                       spacings=[(2.0, 2.0, 3.0), (1.8, 2.2, 2.5), (2.0, 2.0, 3.0), (2.4, 1.9, 3.5)])
    prepare_dataset(raw, root / "cache", workers=1, progress=False)
    return root / "cache"


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory):
    """6 synthetic CT cases (40³, one body range) prepared into a cache; returns (raw, cache) folders."""
    from volcontrast.data.prepare import prepare_dataset
    from volcontrast.data.synth import generate_cohort

    root = tmp_path_factory.mktemp("synth")
    generate_cohort(root / "raw", cases=6, size=(40, 40, 40), fov="chest_abdomen", progress=False)
    prepare_dataset(root / "raw", root / "cache", workers=1, progress=False)
    return root / "raw", root / "cache"
