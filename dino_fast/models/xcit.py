"""XCiT backbones (``--arch xcit_small_12_p16`` ...) through timm's implementation.

Official ``main_dino.py`` builds ``torch.hub.load('facebookresearch/xcit:main', arch,
pretrained=False, drop_path_rate=...)`` and its ``MultiCropWrapper`` sets ``backbone.head =
nn.Identity()``. :func:`build_xcit` builds timm's ``<arch>_224`` with ``num_classes=0`` (the
same network: timm's ``xcit.py`` is a port of the official one) with the same drop-path rate; its
forward gives the (B, D) class token after the final norm, any input side (the patch embedding
is a stack of stride-2 convolutions, the position encoding is computed per grid). Official
XCiT returns ``(x, x)`` in training mode and DINO takes ``[0]``: the same features.

Weights: the official state dicts (``dino_xcit_*_pretrain.pth``, the ``teacher`` of an official
XCiT run) name two things differently from timm: ``pos_embeder.*`` (timm ``pos_embed.*``) and the
class-attention ``cls_attn_blocks.{i}.attn.qkv.*`` (timm: separate ``q``, ``k``, ``v``, the rows of
qkv in that order). :func:`xcit_timm_keys` renames them (timm's ``checkpoint_filter_fn`` does the
same), :func:`infer_xcit_arch` reads the model off the tensors. Checked once against
facebookresearch/xcit's ``xcit.py`` (commit 82f5291): with the renamed keys timm's model gives the
official features within 1e-6, train and eval mode.

DINO options that need ViT tokens (packed multi-crop, iBOT masks) do not apply to XCiT.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn as nn

__all__ = ["XCIT_ARCHS", "build_xcit", "infer_xcit_arch", "is_xcit_state_dict", "xcit_official_keys", "xcit_timm_keys"]

# official facebookresearch/xcit name -> timm model name (the 224-px variants: the same networks)
XCIT_ARCHS: dict[str, str] = {n.removesuffix("_224"): n for n in sorted(timm.list_models("xcit_*_224"))}
# official size names by embedding width (facebookresearch/xcit xcit.py)
_SIZES = {128: "nano", 192: "tiny", 384: "small", 512: "medium", 768: "large"}
_QKV = re.compile(r"^(cls_attn_blocks\.\d+\.attn)\.qkv\.(weight|bias)$")
_Q = re.compile(r"^(cls_attn_blocks\.\d+\.attn)\.q\.(weight|bias)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PATCH_CONV = re.compile(r"^patch_embed\.proj\.(\d+)\.0\.weight$")


def build_xcit(arch: str = "xcit_small_12_p16", drop_path_rate: float = 0.0, **kw: Any) -> nn.Module:
    """timm's XCiT ``arch`` (an official facebookresearch/xcit name) with ``num_classes=0``, random
    init (never downloads): forward (B, 3, H, W) -> (B, embed_dim). ``kw`` goes to timm (e.g.
    ``depth=1`` for small test models)."""
    if arch not in XCIT_ARCHS:
        raise ValueError(f"unknown XCiT {arch!r}; choose one of {', '.join(XCIT_ARCHS)}")
    if kw.pop("pretrained", False) or kw.pop("weights", None) is not None:
        raise ValueError("dino_fast never downloads weights: build the model, then load a local file "
                         "(dino_fast.load_pretrained or hubconf weights=<path>)")
    if kw.pop("num_classes", 0):
        raise ValueError("a DINO XCiT backbone has no classifier: num_classes must be 0")
    return timm.create_model(XCIT_ARCHS[arch], pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kw)


def is_xcit_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` has XCiT backbone keys (class-attention blocks, convolutional patch embedding)."""
    return "patch_embed.proj.0.0.weight" in sd and any(k.startswith("cls_attn_blocks.") for k in sd)


def xcit_timm_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An XCiT state dict in timm's names: official ``pos_embeder.*`` -> ``pos_embed.*``, official
    class-attention ``qkv`` split into ``q``, ``k``, ``v`` (its three row blocks). timm keys pass as they are."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("pos_embeder."):
            out["pos_embed." + k[len("pos_embeder."):]] = v
        elif m := _QKV.match(k):
            for name, part in zip("qkv", v.chunk(3, dim=0)):  # (3C, ...) -> 3 x (C, ...)
                out[f"{m.group(1)}.{name}.{m.group(2)}"] = part
        else:
            out[k] = v
    return out


def xcit_official_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`xcit_timm_keys`: timm's XCiT state dict under the facebookresearch/xcit
    names (what official ``torch.hub.load('facebookresearch/xcit:main', ...)`` loads strictly)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("pos_embed."):
            out["pos_embeder." + k[len("pos_embed."):]] = v
        elif m := _Q.match(k):
            out[f"{m.group(1)}.qkv.{m.group(2)}"] = torch.cat([sd[f"{m.group(1)}.{n}.{m.group(2)}"] for n in "qkv"])
        elif not re.match(r"^cls_attn_blocks\.\d+\.attn\.[kv]\.(weight|bias)$", k):
            out[k] = v
    return out


def infer_xcit_arch(sd: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(official XCiT name, depth) read off the tensors: width -> size, patch-embedding convs ->
    patch (4 stride-2 convs: 16, 3: 8), block count -> depth. The name is the one of that depth, else
    the size's first (then build it with ``depth``); ValueError when no XCiT matches."""
    if not is_xcit_state_dict(sd):
        raise ValueError(f"not an XCiT state dict (no patch_embed.proj.0.0.weight / cls_attn_blocks.*; keys start "
                         f"with {sorted(sd)[:5]})")
    dim = int(sd["cls_token"].shape[-1]) if "cls_token" in sd else -1
    convs = {int(m.group(1)) for k in sd if (m := _PATCH_CONV.match(k))}
    patch = {4: 16, 3: 8}.get(len(convs))
    depth = len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if dim not in _SIZES or patch is None or depth == 0:
        raise ValueError(f"XCiT state dict with width {dim}, {len(convs)} patch-embedding convolutions and {depth} "
                         f"blocks matches none of {', '.join(XCIT_ARCHS)}")
    names = [n for n in XCIT_ARCHS if n.startswith(f"xcit_{_SIZES[dim]}_") and n.endswith(f"_p{patch}")]
    exact = [n for n in names if n.split("_")[2] == str(depth)]
    return (exact or names)[0], depth
