"""torch.hub entries with the official DINO names, built by dino_fast.

``torch.hub.load(repo_dir, "dino_vits16", source="local")`` gives the backbone the official
``hubconf.py`` gives (ViT: forward -> (B, D) CLS features; ResNet-50: ``fc = Identity``,
forward -> (B, 2048)). Unlike the official entries nothing is ever downloaded: the default is
``pretrained=False`` (random init) and weights are loaded only from a local file given as
``weights=<path>`` (the released ``dino_deitsmall16_pretrain.pth`` ..., an official training
checkpoint, a timm or dino_fast file: any layout ``dino_fast.load_pretrained`` reads; keys are
checked strictly). ``kwargs`` go to the builder (e.g. ``drop_path_rate``, ``attn_backend``).

All 9 official names are here. The four XCiT entries (``dino_xcit_*``) build timm's XCiT
(``dino_fast.models.build_xcit``, ``num_classes=0``); ``weights`` may be the released
``dino_xcit_*_pretrain.pth`` (official facebookresearch/xcit key names, mapped to timm's).
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


def _xcit(name: str, released: str, pretrained: bool, weights: str | os.PathLike | None, key: str,
          kwargs: dict[str, _t.Any]) -> nn.Module:
    from dino_fast.models import build_xcit

    if kwargs.pop("num_classes", 0) != 0:  # the official entries pass num_classes=0: a backbone only
        raise ValueError("the DINO hub models are backbones: num_classes must be 0")
    return _finish(build_xcit(name, **kwargs), pretrained, weights, released, key)


def _xcit_entry(name: str, title: str) -> _t.Callable[..., nn.Module]:
    """The hub entry ``dino_<name>`` (one per official XCiT name; same signature as the others)."""
    released = f"dino_{name}_pretrain/dino_{name}_pretrain.pth"

    def entry(pretrained: bool = False, weights: str | os.PathLike | None = None, key: str = "teacher",
              **kwargs: _t.Any) -> nn.Module:
        return _xcit(name, released, pretrained, weights, key, kwargs)

    entry.__name__ = entry.__qualname__ = f"dino_{name}"
    entry.__doc__ = f"{title} (official ``dino_{name}``); local ``weights`` only (``dino_{name}_pretrain.pth``)."
    return entry


dino_xcit_small_12_p16 = _xcit_entry("xcit_small_12_p16", "XCiT-Small-12/16")
dino_xcit_small_12_p8 = _xcit_entry("xcit_small_12_p8", "XCiT-Small-12/8")
dino_xcit_medium_24_p16 = _xcit_entry("xcit_medium_24_p16", "XCiT-Medium-24/16")
dino_xcit_medium_24_p8 = _xcit_entry("xcit_medium_24_p8", "XCiT-Medium-24/8")
