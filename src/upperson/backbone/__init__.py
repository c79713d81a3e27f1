"""Frozen CLIP backbones built with open_clip."""

from upperson.backbone.loading import (
    Backbone,
    BackboneLoadError,
    BackboneSpec,
    backbone_from_state_dict,
    load_backbone,
    read_checkpoint_state_dict,
    state_dict_sha256,
)
from upperson.backbone.pos_embed import resize_visual_pos_embed

__all__ = [
    "Backbone",
    "BackboneLoadError",
    "BackboneSpec",
    "backbone_from_state_dict",
    "load_backbone",
    "read_checkpoint_state_dict",
    "resize_visual_pos_embed",
    "state_dict_sha256",
]
