"""DINO models: timm ViT backbone with swappable attention, XCiT and torchvision backbones, DINO head,
multi-crop wrapper."""
from .attention import BACKENDS, Attention, PackedSeqlens, auto_backend, describe_attention, set_attn_backend, \
    xformers_usable
from .build import ARCH_ALIASES, ARCH_CHOICES, arch_family, build_backbone, build_models, canonical_arch
from .head import DINOHead
from .layers import DropPath, LayerNorm
from .multicrop import MultiCropWrapper
from .pos_embed import interpolate_pos_encoding
from .resnet import RESNET_ARCHS, build_resnet, infer_resnet_arch, is_resnet_arch, is_resnet_state_dict
from .torchvision_archs import TORCHVISION_ARCHS, build_torchvision, has_resnet_stem
from .vit import ARCHS, DinoViT, build_vit
from .xcit import XCIT_ARCHS, build_xcit, infer_xcit_arch, is_xcit_state_dict, xcit_official_keys, xcit_timm_keys

__all__ = [
    "ARCH_ALIASES", "ARCH_CHOICES", "arch_family", "canonical_arch",
    "TORCHVISION_ARCHS", "build_torchvision", "has_resnet_stem",
    "XCIT_ARCHS", "build_xcit", "infer_xcit_arch", "is_xcit_state_dict", "xcit_official_keys",
    "xcit_timm_keys",
    "RESNET_ARCHS", "build_resnet", "infer_resnet_arch", "is_resnet_arch", "is_resnet_state_dict",
    "ARCHS", "BACKENDS", "Attention", "DINOHead", "DinoViT", "DropPath", "LayerNorm", "MultiCropWrapper",
    "PackedSeqlens", "build_backbone", "build_vit", "interpolate_pos_encoding", "set_attn_backend",
    "xformers_usable", "auto_backend", "describe_attention", "build_models",
]
