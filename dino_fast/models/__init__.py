"""DINO models: timm ViT backbone with swappable attention, DINO head, multi-crop wrapper."""
from .attention import BACKENDS, Attention, PackedSeqlens, auto_backend, describe_attention, set_attn_backend, \
    xformers_usable
from .build import build_models
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .pos_embed import interpolate_pos_encoding
from .resnet import (ARCH_ALIASES, RESNET_ARCHS, build_any_backbone, build_resnet, canonical_arch, infer_resnet_arch,
                     is_resnet_arch, is_resnet_state_dict)
from .vit import ARCHS, DinoViT, build_backbone

__all__ = [
    "ARCH_ALIASES", "RESNET_ARCHS", "build_any_backbone", "build_resnet", "canonical_arch", "infer_resnet_arch",
    "is_resnet_arch", "is_resnet_state_dict",
    "ARCHS", "BACKENDS", "Attention", "DINOHead", "DinoViT", "MultiCropWrapper", "PackedSeqlens",
    "build_backbone", "interpolate_pos_encoding", "set_attn_backend", "xformers_usable", "auto_backend",
    "describe_attention", "build_models",
]
