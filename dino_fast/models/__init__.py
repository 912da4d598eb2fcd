"""DINO models: timm ViT backbone with swappable attention, DINO head, multi-crop wrapper."""
from .attention import BACKENDS, Attention, PackedSeqlens, auto_backend, describe_attention, set_attn_backend, \
    xformers_usable
from .build import ARCH_ALIASES, build_backbone, build_models, canonical_arch
from .head import DINOHead
from .layers import DropPath, LayerNorm
from .multicrop import MultiCropWrapper
from .pos_embed import interpolate_pos_encoding
from .resnet import RESNET_ARCHS, build_resnet, infer_resnet_arch, is_resnet_arch, is_resnet_state_dict
from .vit import ARCHS, DinoViT, build_vit

__all__ = [
    "ARCH_ALIASES", "RESNET_ARCHS", "build_resnet", "canonical_arch", "infer_resnet_arch",
    "is_resnet_arch", "is_resnet_state_dict",
    "ARCHS", "BACKENDS", "Attention", "DINOHead", "DinoViT", "DropPath", "LayerNorm", "MultiCropWrapper",
    "PackedSeqlens", "build_backbone", "build_vit", "interpolate_pos_encoding", "set_attn_backend",
    "xformers_usable", "auto_backend", "describe_attention", "build_models",
]
