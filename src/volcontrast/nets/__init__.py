"""Backbones by name with uniform encoder/decoder feature access, and projection heads.

>>> model = build_backbone("plain_unet", dim=3, preset="tiny", num_classes=3)
>>> skips = model.encode(x)            # shallow → deep, channels model.encoder_channels
>>> feats = model.decode(skips)        # deep → shallow, channels model.decoder_channels
>>> logits = model.segment(feats)      # (B, 3, *spatial)

State-dict groups: ``encoder.*`` (what pretraining transfers), ``decoder.*``, ``seg_head.*``
(depends on num_classes), ``post_decoder_blocks.*`` (optional per-decoder-stage blocks, e.g. UAFS).
"""

from volcontrast.nets.backbones import backbone_from_config, build_backbone
from volcontrast.nets.base import (
    Backbone,
    EncoderLoadReport,
    count_parameters,
    deduplicated_state_dict,
    load_backbone_state,
    load_encoder_state,
)
from volcontrast.nets.heads import (
    DenseProjectionHead,
    GlobalProjectionHead,
    ProjectionHead,
    ReconstructionHead,
)
from volcontrast.nets.plans import backbone_from_nnunet_plans
from volcontrast.nets.presets import BACKBONE_NAMES, PRESETS, Preset, list_presets
from volcontrast.nets.swin import to_monai_state_dict
from volcontrast.nets.uafs import UAFS, add_uafs, uafs_parameter_prefix
from volcontrast.nets.unet import to_nnunet_state_dict

__all__ = [
    "BACKBONE_NAMES",
    "PRESETS",
    "UAFS",
    "Backbone",
    "DenseProjectionHead",
    "EncoderLoadReport",
    "GlobalProjectionHead",
    "Preset",
    "ProjectionHead",
    "ReconstructionHead",
    "add_uafs",
    "backbone_from_config",
    "backbone_from_nnunet_plans",
    "build_backbone",
    "count_parameters",
    "deduplicated_state_dict",
    "list_presets",
    "load_backbone_state",
    "load_encoder_state",
    "to_monai_state_dict",
    "to_nnunet_state_dict",
    "uafs_parameter_prefix",
]
