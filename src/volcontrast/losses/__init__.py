"""Losses: the one masked multi-positive InfoNCE core and its memory queue."""

from __future__ import annotations

from volcontrast.losses.info_nce import InfoNCELoss, InfoNCEOutput, base_temperature_scale, info_nce
from volcontrast.losses.queue import MemoryQueue

__all__ = ["InfoNCELoss", "InfoNCEOutput", "MemoryQueue", "base_temperature_scale", "info_nce"]
