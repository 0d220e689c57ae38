"""Coordinates and spatial priors: normalised positions of slices and crops, and positive masks from them."""

from __future__ import annotations

from volcontrast.spatial.masks import (
    gcl_positive_mask,
    pcl_positive_mask,
    simclr_positive_mask,
    view_item_ids,
)
from volcontrast.spatial.positions import body_position, index_position, partition_index

__all__ = [
    "body_position",
    "gcl_positive_mask",
    "index_position",
    "partition_index",
    "pcl_positive_mask",
    "simclr_positive_mask",
    "view_item_ids",
]
