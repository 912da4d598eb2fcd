"""ResNet backbones (``--arch resnet50``) and the one arch-name dispatch of the trainer.

Official ``main_dino.py`` builds a convnet as ``torchvision_models.__dict__[arch]()`` (random
init, never downloaded weights) and its ``MultiCropWrapper`` sets ``backbone.fc =
nn.Identity()``: the backbone outputs the (B, 2048) globally average-pooled features of a
ResNet-50. :func:`build_resnet` returns that model with ``fc`` already an Identity and an
``embed_dim`` attribute, so ``MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, ...))``
works as with a ViT. State-dict keys are torchvision's (``conv1.weight``, ``bn1.*``,
``layer1.0.conv1.weight``, ...), i.e. the released ``dino_resnet50_pretrain.pth`` layout.

:func:`build_any_backbone` takes any ``--arch`` the official script takes among ours:
``vit_tiny | vit_small | vit_base`` (and the official aliases ``deit_tiny``/``deit_small``)
or a torchvision ResNet.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .vit import ARCHS, build_backbone

__all__ = ["RESNET_ARCHS", "ARCH_ALIASES", "canonical_arch", "is_resnet_arch", "build_resnet", "build_any_backbone",
           "infer_resnet_arch", "is_resnet_state_dict"]

# torchvision ResNets: (block has conv3 i.e. Bottleneck, blocks per stage), for inference from keys.
RESNET_ARCHS: dict[str, tuple[bool, tuple[int, int, int, int]]] = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
}
# Official main_dino.py: ``args.arch = args.arch.replace("deit", "vit")`` for its --arch choices.
ARCH_ALIASES: dict[str, str] = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}

_LAYER_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def canonical_arch(arch: str) -> str:
    """``arch`` with the official aliases resolved (``deit_small`` -> ``vit_small``);
    ValueError naming the choices when it is none of ours."""
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHS and arch not in RESNET_ARCHS:
        choices = sorted(ARCHS) + sorted(ARCH_ALIASES) + list(RESNET_ARCHS)
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(choices)}")
    return arch


def is_resnet_arch(arch: str) -> bool:
    """True for the torchvision ResNet names (convnets: BatchNorm, no patches, no ``blocks``)."""
    return ARCH_ALIASES.get(arch, arch) in RESNET_ARCHS


def build_resnet(arch: str = "resnet50", **kw: Any) -> nn.Module:
    """torchvision ``arch`` with random init (never downloads), ``fc = nn.Identity()`` and
    ``embed_dim`` (2048 for resnet50): forward (B, 3, H, W) -> (B, embed_dim), any H, W >= 1
    (global average pool). ``kw`` goes to the torchvision builder (e.g. ``zero_init_residual``)."""
    import torchvision

    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet {arch!r}; choose one of {', '.join(RESNET_ARCHS)}")
    if kw.get("weights") is not None:
        raise ValueError("build_resnet never downloads weights: build it, then load a local file "
                         "(dino_fast.load_pretrained or hubconf weights=<path>)")
    kw.pop("weights", None)
    model = getattr(torchvision.models, arch)(weights=None, **kw)
    model.embed_dim = model.fc.in_features
    model.fc = nn.Identity()  # official MultiCropWrapper / eval scripts
    return model


def build_any_backbone(arch: str = "vit_small", patch_size: int = 16, drop_path_rate: float = 0.0,
                       attn_backend: str = "auto", img_size: int = 224, **kw: Any) -> nn.Module:
    """The backbone of official ``--arch``: a :class:`DinoViT` (``build_backbone``) for
    ``vit_*``/``deit_*``, a :func:`build_resnet` for ``resnet*``. As in official
    ``main_dino.py``, a convnet ignores ``patch_size`` and ``drop_path_rate`` (and
    ``attn_backend``/``img_size``); ``kw`` goes to the chosen builder."""
    arch = canonical_arch(arch)
    if arch in RESNET_ARCHS:
        return build_resnet(arch, **kw)
    return build_backbone(arch, patch_size, drop_path_rate=drop_path_rate, attn_backend=attn_backend,
                          img_size=img_size, **kw)


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

