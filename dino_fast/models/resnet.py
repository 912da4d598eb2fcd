"""ResNet backbones (``--arch resnet50``).

Official ``main_dino.py`` builds a convnet as ``torchvision_models.__dict__[arch]()`` (random
init, never downloaded weights) and its ``MultiCropWrapper`` sets ``backbone.fc =
nn.Identity()``: the backbone outputs the (B, 2048) globally average-pooled features of a
ResNet-50. :func:`build_resnet` returns that model with ``fc`` already an Identity and an
``embed_dim`` attribute, so ``MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, ...))``
works as with a ViT. State-dict keys are torchvision's (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ...), i.e. the released ``dino_resnet50_pretrain.pth`` layout.
``models.build.build_backbone`` builds any ``--arch``; ``torchvision_archs`` every torchvision
classification model (this module adds what reading ResNet weights needs: the depth from the keys).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .torchvision_archs import build_torchvision

__all__ = ["RESNET_ARCHS", "is_resnet_arch", "build_resnet", "infer_resnet_arch", "is_resnet_state_dict"]

# torchvision ResNets: (block has conv3 i.e. Bottleneck, blocks per stage), for inference from keys.
RESNET_ARCHS: dict[str, tuple[bool, tuple[int, int, int, int]]] = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
}

_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def is_resnet_arch(arch: str) -> bool:
    """True for the torchvision ResNet names (convnets: BatchNorm, no patches, no ``blocks``)."""
    return arch in RESNET_ARCHS


def build_resnet(arch: str = "resnet50", small_image_stem: bool = False, **kw: Any) -> nn.Module:
    """torchvision ``arch`` with random init (never downloads), ``fc = nn.Identity()`` and
    ``embed_dim`` (2048 for resnet50): forward (B, 3, H, W) -> (B, embed_dim), any H, W >= 1
    (global average pool). ``small_image_stem``: 3x3 stride-1 conv1, no max-pool
    (``torchvision_archs``). ``kw`` goes to the torchvision builder (e.g. ``zero_init_residual``)."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet {arch!r}; choose one of {', '.join(RESNET_ARCHS)}")
    return build_torchvision(arch, small_image_stem=small_image_stem, **kw)


def is_resnet_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` has torchvision ResNet backbone keys (``conv1.weight``, ``layer1.0.*``)."""
    return "conv1.weight" in sd and any(k.startswith("layer1.0.") for k in sd)


def infer_resnet_arch(sd: Mapping[str, torch.Tensor]) -> str:
    """The torchvision ResNet name whose block type and stage depths match ``sd``'s keys;
    ValueError when none does."""
    if not is_resnet_state_dict(sd):
        raise ValueError(f"not a ResNet state dict (no conv1.weight / layer1.0.*; keys start with {sorted(sd)[:5]})")
    bottleneck = "layer1.0.conv3.weight" in sd
    depths = [0, 0, 0, 0]
    for k in sd:
        if m := _LAYER_KEY.match(k):
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            depths[stage] = max(depths[stage], block + 1)
    for name, (is_bottleneck, blocks) in RESNET_ARCHS.items():
        if is_bottleneck == bottleneck and tuple(depths) == blocks:
            return name
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    raise ValueError(f"ResNet with {kind} stages of {depths} blocks matches none of {', '.join(RESNET_ARCHS)}")

