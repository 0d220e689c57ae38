"""Coordinates and spatial priors: positions of slices and crops, positive masks, cross-scan correspondences."""

from __future__ import annotations

from volcontrast.spatial.correspondence import CorrespondenceProvider, get_provider, map_points, register_provider
from volcontrast.spatial.masks import (
    gcl_positive_mask,
    pcl_positive_mask,
    simclr_positive_mask,
    view_item_ids,
)
from volcontrast.spatial.positions import body_position, index_position, partition_index

__all__ = [
    "CorrespondenceProvider",
    "body_position",
    "gcl_positive_mask",
    "get_provider",
    "index_position",
    "map_points",
    "partition_index",
    "pcl_positive_mask",
    "register_provider",
    "simclr_positive_mask",
    "view_item_ids",
]
