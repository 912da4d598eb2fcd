"""DINO models: timm ViT backbone with swappable attention, DINO head, multi-crop wrapper."""
from .attention import BACKENDS, Attention, PackedSeqlens, set_attn_backend, xformers_usable
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .pos_embed import interpolate_pos_encoding
from .vit import ARCHS, DinoViT, build_backbone

__all__ = [
    "ARCHS", "BACKENDS", "Attention", "DINOHead", "DinoViT", "MultiCropWrapper", "PackedSeqlens",
    "build_backbone", "interpolate_pos_encoding", "set_attn_backend", "xformers_usable",
]
