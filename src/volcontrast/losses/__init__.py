"""Losses: the one masked multi-positive InfoNCE core, its memory queue, and the PDCR regulariser."""

from __future__ import annotations

from volcontrast.losses.info_nce import InfoNCELoss, InfoNCEOutput, base_temperature_scale, info_nce
from volcontrast.losses.pdcr import (
    PDCRLoss,
    PDCROutput,
    SampleGrid,
    patch_label_fractions,
    pdcr_loss,
    receptive_field_sizes,
    sample_grid,
)
from volcontrast.losses.queue import MemoryQueue

__all__ = [
    "InfoNCELoss",
    "InfoNCEOutput",
    "MemoryQueue",
    "PDCRLoss",
    "PDCROutput",
    "SampleGrid",
    "base_temperature_scale",
    "info_nce",
    "patch_label_fractions",
    "pdcr_loss",
    "receptive_field_sizes",
    "sample_grid",
]
