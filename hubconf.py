"""torch.hub entries with the official DINO names, built by dino_fast.

``torch.hub.load(repo_dir, "dino_vits16", source="local")`` gives the backbone the official
``hubconf.py`` gives (ViT: forward -> (B, D) CLS features; ResNet-50: ``fc = Identity``,
forward -> (B, 2048)). Unlike the official entries nothing is ever downloaded: the default is
``pretrained=False`` (random init) and weights are loaded only from a local file given as
``weights=<path>`` (the released ``dino_deitsmall16_pretrain.pth`` ..., an official training
checkpoint, a timm or dino_fast file: any layout ``dino_fast.load_pretrained`` reads; keys are
checked strictly). ``kwargs`` go to the builder (e.g. ``drop_path_rate``, ``attn_backend``).
"""
from __future__ import annotations

import os
import typing as _t

from torch import nn

dependencies = ["torch", "torchvision", "timm"]

_RELEASED = "https://dl.fbaipublicfiles.com/dino/"


def _finish(model: nn.Module, pretrained: bool, weights: str | os.PathLike | None, released: str,
            key: str) -> nn.Module:
    from dino_fast.pretrained import load_backbone_weights_

    if weights is not None:
        return load_backbone_weights_(model, weights, key=key)
    if pretrained:
        raise ValueError(f"this hubconf never downloads: download {_RELEASED}{released} yourself and pass "
                         f"weights=<path to it>")
    return model


def _vit(arch: str, patch_size: int, released: str, pretrained: bool, weights: str | os.PathLike | None,
         key: str, kwargs: dict[str, _t.Any]) -> nn.Module:
    from dino_fast.models import build_backbone

    if kwargs.pop("num_classes", 0) != 0:  # the official entries pass num_classes=0: a backbone only
        raise ValueError("the DINO hub models are backbones: num_classes must be 0")
    return _finish(build_backbone(arch, patch_size, **kwargs), pretrained, weights, released, key)


def dino_vits16(pretrained: bool = False, weights: str | os.PathLike | None = None, key: str = "teacher",
                **kwargs: _t.Any) -> nn.Module:
    """ViT-Small/16 (official ``dino_vits16``); local ``weights`` only (``dino_deitsmall16_pretrain.pth``)."""
    return _vit("vit_small", 16, "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", pretrained, weights,
                key, kwargs)


def dino_vits8(pretrained: bool = False, weights: str | os.PathLike | None = None, key: str = "teacher",
               **kwargs: _t.Any) -> nn.Module:
    """ViT-Small/8 (official ``dino_vits8``); local ``weights`` only (``dino_deitsmall8_pretrain.pth``)."""
    return _vit("vit_small", 8, "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", pretrained, weights,
                key, kwargs)


def dino_vitb16(pretrained: bool = False, weights: str | os.PathLike | None = None, key: str = "teacher",
                **kwargs: _t.Any) -> nn.Module:
    """ViT-Base/16 (official ``dino_vitb16``); local ``weights`` only (``dino_vitbase16_pretrain.pth``)."""
    return _vit("vit_base", 16, "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", pretrained, weights,
                key, kwargs)


def dino_vitb8(pretrained: bool = False, weights: str | os.PathLike | None = None, key: str = "teacher",
               **kwargs: _t.Any) -> nn.Module:
    """ViT-Base/8 (official ``dino_vitb8``); local ``weights`` only (``dino_vitbase8_pretrain.pth``)."""
    return _vit("vit_base", 8, "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", pretrained, weights,
                key, kwargs)


def dino_resnet50(pretrained: bool = False, weights: str | os.PathLike | None = None, key: str = "teacher",
                  **kwargs: _t.Any) -> nn.Module:
    """ResNet-50 with ``fc = Identity`` (official ``dino_resnet50``); local ``weights`` only
    (``dino_resnet50_pretrain.pth``; an ``fc.*`` in the file is dropped)."""
    from dino_fast.models import build_resnet

    model = build_resnet("resnet50", **kwargs)
    return _finish(model, pretrained, weights, "dino_resnet50_pretrain/dino_resnet50_pretrain.pth", key)
