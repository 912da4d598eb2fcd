"""Load DINO backbone weights (ViT or ResNet) from any of the layouts in use (writing ours in
those layouts is :mod:`dino_fast.export`).

Accepted by :func:`load_pretrained` (told apart by content, not file name):

- the official ``main_dino.py`` training checkpoint: ``{"student", "teacher",
  "optimizer", "epoch", "args": argparse.Namespace, "dino_loss", ...}``; the
  student's keys carry DDP's ``module.`` prefix, both carry ``backbone.``/``head.``;
- the official released backbone weights (``dino_deitsmall16_pretrain.pth`` ...):
  a plain ViT state dict; ``dino_resnet50_pretrain.pth``: a torchvision ResNet-50
  state dict without ``fc`` (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ...);
  a ResNet run's official training checkpoint holds ``module.backbone.*`` for both
  models (the teacher is DDP-wrapped too when the model has BatchNorm);
- a timm ViT state dict (``.pth`` or ``.safetensors``), whose classifier
  ``head.*`` is dropped with a note;
- XCiT: the official facebookresearch/xcit layout (``dino_xcit_*_pretrain.pth``, an official XCiT
  run's checkpoint) or timm's, loaded into timm's XCiT (``pos_embeder.*`` and the class-attention
  ``qkv`` renamed to timm's names: ``models.xcit.xcit_timm_keys``);
- dino_fast's own training checkpoints (``"format": "dino_fast"``).

Files are read with ``torch.load(weights_only=True)`` and the one allowlist of
:mod:`dino_fast.safe_load` (``argparse.Namespace``, the official ``args`` entry, and the
numpy array pieces of a saved numpy RNG state). Nothing else is unpickled. Every failure
is one :class:`PretrainedError` line.

The official, timm and dino_fast backbone key names coincide (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``). The arch (ViT size, patch, depth, image size
of the position-embedding grid, or ResNet depth) is read off the tensors.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_fast.errors import PretrainedError
from dino_fast.models import (ARCHS, XCIT_ARCHS, build_backbone, build_resnet, build_xcit, canonical_arch,
                              infer_resnet_arch, infer_xcit_arch, is_resnet_arch, is_resnet_state_dict,
                              is_xcit_state_dict, xcit_timm_keys)
from dino_fast.safe_load import torch_load_safe

__all__ = ["PretrainedError", "load_pretrained", "load_backbone_weights_", "load_checkpoint_file", "infer_vit_config",
           "detect_layout"]

log = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
# Prefixes that wrappers add in front of the backbone keys: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Classifier weights of timm / DeiT models and of a torchvision ResNet: not part of a DINO backbone.
_CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc.")


# --------------------------------------------------------------------------- reading files
def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint / state-dict file safely (weights_only); PretrainedError on
    a missing, truncated or corrupt file or one that pickles arbitrary objects."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PretrainedError(f"{path}: file not found")
    if not path.is_file():
        raise PretrainedError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise PretrainedError(f"{path}: empty file (truncated download or interrupted save?)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PretrainedError(f"{path}: reading .safetensors needs the safetensors package") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise PretrainedError(f"{path}: corrupt or truncated safetensors file ({_one_line(e)})") from None
    try:
        return torch_load_safe(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        if found:
            raise PretrainedError(
                f"{path}: refuses to unpickle {found.group(1)}: only tensors, plain containers, argparse.Namespace "
                f"and numpy arrays are loaded (if this is a whole pickled model from a trusted source, load it "
                f"yourself and pass its state_dict())") from None
        raise PretrainedError(f"{path}: not a PyTorch checkpoint (a plain pickle or another format; "
                              f"{_one_line(str(e).split('WeightsUnpickler error:')[-1], 80)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise PretrainedError(f"{path}: truncated or corrupt checkpoint file ({type(e).__name__}: "
                              f"{_one_line(e, 120)})") from None


# --------------------------------------------------------------------------- layouts
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def detect_layout(obj: Any) -> str:
    """'dino_fast', 'official_training', 'state_dict' or 'unknown'."""
    if not isinstance(obj, Mapping):
        return "unknown"
    if obj.get("format") == "dino_fast":
        return "dino_fast"
    if any(k in obj for k in ("student", "teacher")) and all(
            isinstance(obj[k], Mapping) for k in ("student", "teacher") if k in obj):
        return "official_training"
    if _is_state_dict(obj):
        return "state_dict"
    return "unknown"


def _select_state_dict(obj: Any, key: str, src: str) -> tuple[dict[str, torch.Tensor], str]:
    """The backbone-bearing state dict inside ``obj`` and a description of where it came from."""
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"{src}: holds a {type(obj).__name__}, not a checkpoint or a state dict")
    layout = detect_layout(obj)
    if layout == "state_dict":
        return dict(obj), "state dict"
    if key in obj and isinstance(obj[key], Mapping):
        what = {"dino_fast": "dino_fast checkpoint", "official_training": "official DINO training checkpoint"}.get(
            layout, "checkpoint")
        sd = obj[key]
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise PretrainedError(f"{src}: entry {key!r} is not a state dict (non-tensor values at {bad[:3]})")
        return dict(sd), f"{what} [{key!r}]"
    candidates = sorted(k for k, v in obj.items() if isinstance(k, str) and _is_state_dict(v)
                        and any(name.endswith(("patch_embed.proj.weight", "conv1.weight")) for name in v))
    if layout in ("dino_fast", "official_training") or candidates:
        raise PretrainedError(f"{src}: unknown key={key!r}; state dicts in this checkpoint: {candidates}")
    sample = sorted(map(str, obj))[:6]
    raise PretrainedError(f"{src}: not a checkpoint: no model state dict found (a dict with entries {sample})")


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _backbone_keys(sd: dict[str, torch.Tensor], src: str) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, keep the ``backbone.`` part of a MultiCropWrapper state
    dict (dropping the DINO head), drop a timm classifier, with a note each time."""
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = _strip_prefix(sd, prefix)
    if any(k.startswith("backbone.") for k in sd):
        dropped = sorted({k.split(".")[0] for k in sd if not k.startswith("backbone.")})
        if dropped:
            log.info("%s: using backbone.* weights, ignoring %s (projection head)", src, dropped)
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    classifier = sorted(k for k in sd if k.startswith(_CLASSIFIER_PREFIXES))
    if classifier:
        log.info("%s: dropping classifier weights %s (the backbone outputs CLS features)", src, classifier)
        sd = {k: v for k, v in sd.items() if k not in classifier}
    return xcit_timm_keys(sd) if is_xcit_state_dict(sd) else sd  # official XCiT names -> timm's


# --------------------------------------------------------------------------- architecture
def infer_vit_config(sd: Mapping[str, torch.Tensor], src: str = "state dict") -> dict[str, Any]:
    """``{"arch", "patch_size", "depth", "img_size", "mlp_ratio", "embed_dim"}`` read off
    the tensors: embed dim -> arch, block count -> depth, patch-embed kernel -> patch,
    pos-embed length -> the image size its grid was trained at."""
    needed = ("patch_embed.proj.weight", "pos_embed", "cls_token")
    missing = [k for k in needed if k not in sd]
    if missing:
        sample = sorted(sd)[:5]
        raise PretrainedError(f"{src}: not a ViT backbone state dict (missing {missing}; keys start with {sample})")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise PretrainedError(f"{src}: patch_embed.proj.weight has shape {tuple(w.shape)}, expected (D, 3, p, p)")
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    by_dim = {cfg["embed_dim"]: name for name, cfg in ARCHS.items()}
    if dim not in by_dim:
        known = ", ".join(f"{n} {c['embed_dim']}" for n, c in ARCHS.items())
        raise PretrainedError(f"{src}: embed dim {dim} matches no known arch ({known})")
    n_pos = int(sd["pos_embed"].shape[1]) - 1
    grid = math.isqrt(max(n_pos, 0))
    if sd["pos_embed"].ndim != 3 or grid * grid != n_pos or n_pos == 0:
        raise PretrainedError(f"{src}: pos_embed has shape {tuple(sd['pos_embed'].shape)}, expected (1, 1 + g*g, D)")
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise PretrainedError(f"{src}: no transformer blocks (blocks.*) in the state dict")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    return {"arch": by_dim[dim], "patch_size": patch, "depth": max(blocks) + 1, "img_size": grid * patch,
            "mlp_ratio": mlp_ratio, "embed_dim": dim}


def _list(names: list[str], limit: int = 5) -> str:
    return f"{names[:limit]}" + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], src: str, desc: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_list(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (checkpoint vs model) {_list(shapes, 3)}")
    if problems:
        raise PretrainedError(f"{src}: weights do not fit {desc}: " + "; ".join(problems))


def _read(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[str, Any]:
    """(description, loaded object) of a file, a sharded checkpoint folder or an in-memory dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        src = str(path_or_state_dict)
        if Path(path_or_state_dict).is_dir():  # a sharded (FSDP2 / DCP) training checkpoint
            from dino_fast.checkpoint import consolidate, is_dcp_checkpoint

            if not is_dcp_checkpoint(path_or_state_dict):
                raise PretrainedError(f"{src} is a folder but not a dino_fast checkpoint directory (no .metadata)")
            obj = consolidate(path_or_state_dict)
        else:
            obj = load_checkpoint_file(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        src, obj = "<state dict>", path_or_state_dict
    else:
        raise TypeError(f"load_pretrained: expected a path or a state dict, got {type(path_or_state_dict).__name__}")
    return src, obj


def _fill_bn_counters(sd: dict[str, torch.Tensor], model: nn.Module, src: str) -> dict[str, torch.Tensor]:
    """BatchNorm ``num_batches_tracked`` counters absent from ``sd`` (older torchvision files)
    set to 0, which is what the model starts with; they never enter the forward."""
    absent = [k for k in model.state_dict() if k.endswith("num_batches_tracked") and k not in sd]
    if absent:
        log.info("%s: no BatchNorm num_batches_tracked counters in the file, setting %d to 0", src, len(absent))
        sd = dict(sd, **{k: torch.zeros((), dtype=torch.long) for k in absent})
    return sd


def _materialize(build: Any, sd: dict[str, torch.Tensor], src: str, what: str) -> nn.Module:
    """``build()`` holding ``sd`` (keys checked first, fp32 copies), in eval mode."""
    try:
        # On the meta device first: checking keys costs no allocation and no random
        # init (seconds for a ViT-B on CPU); the checkpoint tensors then become the weights.
        with torch.device("meta"):
            model = build()
    except ValueError as e:
        raise PretrainedError(f"{src}: cannot build {what}: {_one_line(e)}") from None
    sd = _fill_bn_counters(sd, model, src)
    _check_keys(model, sd, src, what)
    saved = set(model.state_dict())
    if all(n in saved for n, _ in (*model.named_parameters(), *model.named_buffers())):
        # fp32 weights whatever the file holds; copies, so the caller's dict is never aliased
        sd = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
    else:  # non-persistent buffers would stay on meta: build for real
        model = build()
        model.load_state_dict(sd, strict=True)
    return model.eval()


def load_pretrained(path_or_state_dict: str | os.PathLike | Mapping[str, Any], key: str = "teacher",
                    arch: str | None = None, patch_size: int | None = None, attn_backend: str = "auto",
                    depth: int | None = None) -> nn.Module:
    """A backbone in eval mode holding the given weights: a :class:`DinoViT` whose forward
    gives the (B, D) CLS features of the official ViT, or a torchvision ResNet with
    ``fc = Identity`` giving the (B, 2048) pooled features (official convnet backbone).

    ``path_or_state_dict``: a file (``.pth``/``.pt``/``.safetensors``) or an already
    loaded object, in any layout of the module docstring. ``key`` picks the model
    of a training checkpoint ("teacher" or "student"; ignored for a plain state
    dict). ``arch`` (official aliases ``deit_*`` accepted) and ``patch_size`` are
    inferred from the tensors unless given; when a ViT ``arch`` is given the model has
    that arch's depth unless ``depth`` is given, otherwise the depth is the checkpoint's
    block count. ``patch_size``/``attn_backend``/``depth`` do not apply to a ResNet.
    Raises :class:`PretrainedError` with one line naming the problem."""
    src, obj = _read(path_or_state_dict)
    sd, desc = _select_state_dict(obj, key, src)
    sd = _backbone_keys(sd, src)
    if arch is not None:
        try:
            arch = canonical_arch(arch)
        except ValueError as e:
            raise PretrainedError(f"{src}: {e}") from None
    if is_xcit_state_dict(sd) or arch in XCIT_ARCHS:
        try:
            found_xcit, found_depth = infer_xcit_arch(sd)
        except ValueError as e:
            raise PretrainedError(f"{src}: {e}") from None
        if arch is not None and arch != found_xcit:
            raise PretrainedError(f"{src}: arch {arch!r} given but the weights are a {found_xcit}")
        depth = depth or (found_depth if arch is None else None)  # a named arch: its own depth, as for a ViT
        what = f"{found_xcit} (timm XCiT{f', depth {depth}' if depth else ''})"
        model = _materialize(partial(build_xcit, found_xcit, **({"depth": depth} if depth else {})), sd, src, what)
        log.info("loaded %s from %s as %s", desc, src, what)
        return model
    if is_resnet_state_dict(sd) or (arch is not None and is_resnet_arch(arch)):
        try:
            found_resnet = infer_resnet_arch(sd)
        except ValueError as e:
            raise PretrainedError(f"{src}: {e}") from None
        if arch is not None and not is_resnet_arch(arch):
            raise PretrainedError(f"{src}: arch {arch!r} given but the weights are a {found_resnet}")
        arch = arch or found_resnet
        stem = "conv1.weight" in sd and sd["conv1.weight"].shape[-1] == 3  # small_image_stem: 3x3 conv1, no max-pool
        model = _materialize(partial(build_resnet, arch, small_image_stem=stem), sd, src,
                             f"{arch}{' (small-image stem)' if stem else ''} (torchvision, fc = Identity)")
        log.info("loaded %s from %s as %s", desc, src, arch)
        return model
    if "mask_token" in sd:  # iBOT / DINOv2 masked-image-modelling input: never used by the forward
        log.info("%s: dropping mask_token (masked-image-modelling training input)", src)
        sd = {k: v for k, v in sd.items() if k != "mask_token"}
    found = infer_vit_config(sd, src)
    if depth is None:
        # A named arch means its standard model (missing blocks are reported);
        # without one, the checkpoint's own block count (small test/distilled models).
        depth = ARCHS[arch]["depth"] if arch is not None else found["depth"]
    arch = arch or found["arch"]
    patch_size = patch_size or found["patch_size"]
    kw: dict[str, Any] = {"depth": depth}
    if not math.isclose(found["mlp_ratio"], 4.0):
        kw["mlp_ratio"] = found["mlp_ratio"]
    what = f"{arch}/{patch_size} (depth {depth}, {found['img_size']} px pos-embed)"
    build = partial(build_backbone, arch, patch_size, attn_backend=attn_backend, img_size=found["img_size"], **kw)
    model = _materialize(build, sd, src, what)
    log.info("loaded %s from %s as %s", desc, src, what)
    return model


def load_backbone_weights_(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                           key: str = "teacher") -> nn.Module:
    """Load weights in any layout :func:`load_pretrained` reads into an already built
    backbone (keys and shapes checked strictly; a ResNet's ``fc.*`` dropped); returns it.
    For models built with options of their own (``hubconf``, ``drop_path_rate``)."""
    src, obj = _read(path_or_state_dict)
    sd, desc = _select_state_dict(obj, key, src)
    sd = _fill_bn_counters(_backbone_keys(sd, src), model, src)
    _check_keys(model, sd, src, type(model).__name__)
    model.load_state_dict(sd, strict=True)
    log.info("loaded %s from %s into %s", desc, src, type(model).__name__)
    return model
