"""Views: boxes cut from cached volumes on the CPU, augmented on the training device, with their geometry."""

from volcontrast.views.augment import AugmentConfig, AugmentedViews, augment, sample_views, voxel_maps
from volcontrast.views.geometry import CaseTable, ViewGeometry, view_geometry, view_to_cached
from volcontrast.views.sampler import BoxSampler, BoxSamplerConfig, box_size_for, cut_box

__all__ = [
    "AugmentConfig",
    "AugmentedViews",
    "BoxSampler",
    "BoxSamplerConfig",
    "CaseTable",
    "ViewGeometry",
    "augment",
    "box_size_for",
    "cut_box",
    "sample_views",
    "view_geometry",
    "view_to_cached",
    "voxel_maps",
]
