"""CLS self-attention maps of the last block, as the official
``visualize_attention.py`` draws them: one heat map per head, their mean, an
overlay on the image, and the "keep ``threshold`` of the attention mass" masks.

PNG files are written with PIL; no matplotlib needed (a built-in viridis-like
color map stands in for matplotlib's default).

``dino-fast visualize`` (:func:`main`) takes ``visualize_attention.py`` command lines unchanged:
every official flag with its official type and default (``--threshold`` None: no masks). What
differs: the architecture is read off the weights (``--arch`` / ``--patch_size`` are checked);
``--pretrained_weights`` and ``--image_path`` are needed (nothing is downloaded); the mean map,
an overlay and fixed mask colours are written too.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dino_fast.errors import ConfigError, DataError
from dino_fast.eval.features import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["cls_attention", "attention_mass_mask", "colorize", "read_image", "visualize_attention", "build_parser",
           "main"]

# Samples of the viridis color map at 0, 1/8, ..., 1 (linearly interpolated in between).
_VIRIDIS = np.array([
    [0.267004, 0.004874, 0.329415], [0.282623, 0.140926, 0.457517], [0.229739, 0.322361, 0.545706],
    [0.163625, 0.471133, 0.558148], [0.127568, 0.566949, 0.550556], [0.134692, 0.658636, 0.517649],
    [0.266941, 0.748751, 0.440573], [0.477504, 0.821444, 0.318195], [0.993248, 0.906157, 0.143936],
], dtype=np.float64)

# One fixed, distinct color per head for the threshold masks (the official script draws random ones).
_HEAD_COLORS = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
], dtype=np.float64)


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS query over all tokens in the last block: (B, heads, N),
    each row summing to 1 (token 0 is the CLS token itself, 1.. the patches)."""
    if not hasattr(model, "get_last_selfattention"):
        raise TypeError(f"{type(model).__name__} has no get_last_selfattention(); a ViT backbone is needed")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"cls_attention: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    attn = model.get_last_selfattention(images)  # (B, heads, N, N)
    return attn[:, :, 0, :].float()


def attention_mass_mask(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """Official thresholding: per row, keep the largest entries that together hold
    ``threshold`` of the row's mass. ``attn`` (heads, n), non-negative. Returns a bool
    mask (heads, n): sort ascending, normalize, cumulative sum, keep where the
    cumulative sum exceeds ``1 - threshold``, scatter back to the original order."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if attn.ndim != 2:
        raise ValueError(f"attention_mass_mask: attn must be (heads, n), got shape {tuple(attn.shape)}")
    val, idx = torch.sort(attn.float(), dim=1)
    val = val / val.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - threshold)
    mask = torch.empty_like(keep_sorted)
    mask.scatter_(1, idx, keep_sorted)  # back to patch order
    return mask


def colorize(values: np.ndarray) -> np.ndarray:
    """(h, w) array -> (h, w, 3) uint8 RGB with the viridis-like map, min-max scaled
    (as matplotlib's imsave does by default)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    pos = t * (len(_VIRIDIS) - 1)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, len(_VIRIDIS) - 2)
    frac = (pos - i0)[..., None]
    rgb = _VIRIDIS[i0] * (1 - frac) + _VIRIDIS[i0 + 1] * frac
    return np.round(rgb * 255).astype(np.uint8)


def _upsample(a: torch.Tensor, factor: int) -> np.ndarray:
    """Nearest upsampling of (..., h, w) by ``factor`` (official: interpolate 'nearest')."""
    return a.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1).cpu().numpy()


def read_image(image_path: str | os.PathLike):
    """Decode ``image_path`` fully as an RGB PIL image; :class:`DataError` naming the file when
    it is missing, not a file, or not a decodable image."""
    from PIL import Image

    path = Path(image_path)
    if not path.exists():
        raise DataError(f"visualize: image not found: {path}")
    if not path.is_file():
        raise DataError(f"visualize: image path is not a file: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).replace(str(path), "").strip(" '\"") or type(e).__name__
        raise DataError(f"visualize: cannot decode image {path} (not an image, or corrupt: {reason})") from None


def _load_image(image_path: str | os.PathLike, image_size: int | Sequence[int], patch_size: int):
    """PIL image resized as the official script does, then cropped (top-left) to a
    multiple of the patch size; and its normalized tensor (1, 3, H, W)."""
    from torchvision import transforms

    img = read_image(image_path)
    size = image_size if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    img = transforms.Resize(size)(img)
    w, h = img.size
    w, h = w - w % patch_size, h - h % patch_size
    if w == 0 or h == 0:
        raise ConfigError(f"visualize_attention: image_size {image_size} is smaller than one patch ({patch_size} px)")
    img = img.crop((0, 0, w, h))
    x = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(img))[None]
    return img, x


def _blend(base: np.ndarray, top: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    out = base.astype(np.float64) * (1 - alpha) + top.astype(np.float64) * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@torch.no_grad()
def visualize_attention(model: nn.Module, image_path: str | os.PathLike, out_dir: str | os.PathLike,
                        image_size: int | Sequence[int] = (480, 480), patch_size: int | None = None,
                        threshold: float | None = 0.6, device: torch.device | str | None = None,
                        compute_dtype: torch.dtype | None = None) -> list[Path]:
    """Write the last block's CLS attention maps of one image as PNGs in ``out_dir``.

    Files: ``img.png`` (the resized, patch-aligned input), ``attn-head{j}.png`` per
    head, ``attn-mean.png``, ``attn-overlay.png`` (mean map over the image) and,
    unless ``threshold`` is None, ``mask_th{threshold}_head{j}.png`` (the patches
    holding ``threshold`` of head j's attention mass, tinted over the image). All
    have the size of ``img.png``. Returns the written paths in that order. A missing or
    undecodable image raises :class:`DataError`, bad sizes / threshold / ``out_dir``
    :class:`ConfigError`, all before anything is written. ``compute_dtype``: the compute dtype of the
    forward (None: ``precision auto``: bf16 on CUDA and AMX CPUs, fp32 elsewhere)."""
    if patch_size is None:
        ps = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if ps is None:
            raise ValueError("visualize_attention: pass patch_size (the model has no patch_embed.patch_size)")
        patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ConfigError(f"visualize_attention: threshold must be in (0, 1] or None, got {threshold}")
    sizes = [image_size] if isinstance(image_size, int) else list(image_size)
    if not 1 <= len(sizes) <= 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ConfigError(f"visualize_attention: image_size must be one int or (H, W) of positive ints, got "
                          f"{image_size!r}")
    from dino_fast.runlock import check_output_dir, ensure_output_dir

    check_output_dir(out_dir)  # before any work: a file in the way is reported first
    device = torch.device(device) if device is not None else next(model.parameters()).device
    img, x = _load_image(image_path, image_size, patch_size)
    from PIL import Image

    w_img, h_img = img.size
    hf, wf = h_img // patch_size, w_img // patch_size  # feature-map rows, columns
    was_training = model.training
    model.eval()
    from dino_fast.precision import autocast, resolve_compute_dtype

    try:
        with autocast(resolve_compute_dtype("auto", device) if compute_dtype is None else compute_dtype, device):
            attn = cls_attention(model, x.to(device))[0]  # (heads, N)
    finally:
        model.train(was_training)
    if attn.shape[1] != 1 + hf * wf:
        raise ValueError(f"visualize_attention: the model returned {attn.shape[1]} tokens, expected 1 + {hf}x{wf} "
                         f"patches (patch_size {patch_size} does not match the model?)")
    patches = attn[:, 1:]  # (heads, hf*wf): CLS attention to the patches only
    heads = patches.shape[0]
    maps = _upsample(patches.reshape(heads, hf, wf), patch_size)  # (heads, H, W)
    out = ensure_output_dir(out_dir)
    base = np.asarray(img)
    written: list[Path] = []

    def save(arr: np.ndarray, name: str) -> None:
        p = out / name
        Image.fromarray(arr).save(p)
        written.append(p)

    save(base, "img.png")
    for j in range(heads):
        save(colorize(maps[j]), f"attn-head{j}.png")
    mean = maps.mean(axis=0)
    save(colorize(mean), "attn-mean.png")
    save(_blend(base, colorize(mean), 0.5), "attn-overlay.png")
    if threshold is not None:
        keep = attention_mass_mask(patches, threshold).reshape(heads, hf, wf).float()
        keep = _upsample(keep, patch_size)[..., None]  # (heads, H, W, 1)
        for j in range(heads):
            color = np.broadcast_to(_HEAD_COLORS[j % len(_HEAD_COLORS)], base.shape)
            save(_blend(base, color, 0.5 * keep[j]), f"mask_th{threshold}_head{j}.png")  # official alpha 0.5
    return written


_SCRIPT = "visualize_attention.py"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``dino-fast visualize``: every official visualize_attention.py flag (marked in -h), then ours."""
    from dino_fast.eval.flags import add_model_flags, add_precision_flag, official

    p = parser or argparse.ArgumentParser("dino-fast visualize", description=__doc__.splitlines()[0],
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o = p.add_argument_group("official visualize_attention.py flags")
    add_model_flags(o, _SCRIPT, patch_size=8, arch_choices=["vit_tiny", "vit_small", "vit_base"])
    o.add_argument("--pretrained_weights", default="", type=str,
                   help=official("checkpoint or backbone weights (see load_pretrained); needed: nothing is "
                                 "downloaded", _SCRIPT))
    o.add_argument("--image_path", default=None, type=str, help=official("the image to draw the attention of",
                                                                           _SCRIPT))
    o.add_argument("--image_size", default=(480, 480), type=int, nargs="+",
                   help=official("H W, or one int: the shorter side", _SCRIPT))
    o.add_argument("--output_dir", default=".", help=official("where the PNG files are written", _SCRIPT))
    o.add_argument("--threshold", type=float, default=None,
                   help=official("attention mass kept in the masks (none: no masks)", _SCRIPT))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the backbone runs")
    add_precision_flag(p)
    return p


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``dino-fast visualize``; returns the exit status (0). The image, sizes,
    threshold, output folder and device are checked before the weights are read; user
    mistakes raise :class:`~dino_fast.errors.DinoFastError` subclasses (one line from the CLI)."""
    from dino_fast.eval.features import resolve_device
    from dino_fast.eval.flags import check_arch
    from dino_fast.precision import resolve_compute_dtype
    from dino_fast.pretrained import load_pretrained
    from dino_fast.runlock import check_output_dir

    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    size = list(args.image_size)
    if len(size) > 2 or min(size) < 1:
        raise ConfigError(f"visualize: --image_size takes one or two positive ints (H W), got {size}")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise ConfigError(f"visualize: --threshold must be in (0, 1], got {args.threshold}")
    for flag in ("pretrained_weights", "image_path"):
        if not getattr(args, flag):
            raise ConfigError(f"visualize: --{flag} is needed (the official script would download one; dino_fast "
                              f"never downloads)")
    check_output_dir(args.output_dir)
    read_image(args.image_path)  # a wrong file is reported before a large checkpoint is read
    device = resolve_device(args.device)
    model = load_pretrained(args.pretrained_weights, key=args.checkpoint_key).to(device)
    check_arch(model, args.arch, args.patch_size, "visualize")
    paths = visualize_attention(model, args.image_path, args.output_dir, image_size=size[0] if len(size) == 1
                                else tuple(size), threshold=args.threshold,
                                compute_dtype=resolve_compute_dtype(args.precision, device))
    print(f"wrote {len(paths)} images to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
