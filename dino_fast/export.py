"""Write a run's weights in the layouts others read: official DINO, released weights, timm.

The official ``main_dino.py`` training checkpoint (for the official ``eval_knn.py`` /
``eval_linear.py``), the officially released backbone weights (``dino_deitsmall16_pretrain.pth``
...), or a timm state dict. Reading those layouts back is
:mod:`dino_fast.pretrained`; the official training-checkpoint layout itself is
:mod:`dino_fast.official`.

    dino-fast export --checkpoint out/checkpoints/step-00001000 --format official --output checkpoint.pth
    dino-fast export --checkpoint out/checkpoints/step-00001000 --format timm --output vit_small_dino.pth

Every layout holds ``pos_embed`` on the official 224-px grid (:func:`dino_fast.official.to_official_grid`),
so ``vits.vit_small(patch_size=16)`` / ``timm.create_model("vit_small_patch16_224", num_classes=0)``
load it strictly whatever crop size the run trained at; each export prints one line saying
what it did. ``--save_official_checkpoint true`` writes the official file during training
(:func:`write_official_checkpoint`, called by the trainer with the parts it needs).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dino_fast.checkpoint import atomic_torch_save, consolidate
from dino_fast.checkpoint_read import read_checkpoint_values
from dino_fast.errors import ConfigError
from dino_fast.models import infer_resnet_arch, is_resnet_state_dict
from dino_fast.official import describe_official_grid, to_official_checkpoint, to_official_grid

__all__ = ["main", "export_checkpoint", "write_official_checkpoint", "backbone_state_dict", "export_timm_state_dict",
           "export_official_backbone", "timm_model_name", "save_timm_state_dict", "save_official_backbone", "FORMATS"]

log = logging.getLogger(__name__)

FORMATS = ("official", "timm", "released")
# Prefixes that wrappers add in front of the backbone keys: DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EMPTY_OPTIMIZER: dict[str, Any] = {"state": {}, "param_groups": []}


# --------------------------------------------------------------------------- backbones
def _is_vit_key(k: str) -> bool:
    return k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                 "norm.bias") or bool(re.match(
                     r"^blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$", k))


def _is_resnet_key(k: str) -> bool:
    return bool(re.match(r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(conv\d|bn\d|downsample\.[01])\.\w+)$", k))


def _list(names: list[str], limit: int = 5) -> str:
    return f"{names[:limit]}" + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights as trained (its own grid) under the shared official/timm key names
    (ViT) or torchvision's without ``fc`` (ResNet), detached CPU copies. Accepts the backbone or a
    module holding it as ``.backbone`` (MultiCropWrapper); ``module.``/``_orig_mod.`` prefixes
    (DDP, compile) are stripped."""
    inner = getattr(backbone, "module", backbone)
    inner = getattr(inner, "_orig_mod", inner)
    inner = getattr(inner, "backbone", inner)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"expected a ViT backbone nn.Module, got {type(backbone).__name__}")
    sd = inner.state_dict()
    for prefix in _WRAPPER_PREFIXES:
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    if is_resnet_state_dict(sd):
        extra = sorted(k for k in sd if not _is_resnet_key(k))
        if extra:
            raise ValueError(f"{type(inner).__name__} is not a ResNet backbone with fc = Identity: keys "
                             f"{_list(extra)}")
        infer_resnet_arch(sd)
    else:
        extra = sorted(k for k in sd if not _is_vit_key(k))
        if extra or "pos_embed" not in sd:
            raise ValueError(f"{type(inner).__name__} is not a plain DINO ViT backbone: keys outside the official "
                             f"layout {_list(extra)}" + ("" if "pos_embed" in sd else " and no pos_embed"))
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def export_official_backbone(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict in the layout of the official released DINO backbone weights
    (``dino_deitsmall16_pretrain.pth``, ``dino_resnet50_pretrain.pth``) that the official
    ``vits.vit_small(patch_size=16)`` etc. (built at 224 px) or ``torchvision.models.resnet50()``
    with ``fc = Identity`` load strictly: ``pos_embed`` on the official 224-px grid."""
    return to_official_grid(backbone_state_dict(backbone))


def export_timm_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that ``timm.create_model(timm_model_name(backbone), num_classes=0)`` (timm's
    default 224-px model) loads strictly; pass ``depth=`` too for non-standard depths."""
    return to_official_grid(backbone_state_dict(backbone))


def timm_model_name(backbone: nn.Module) -> str:
    """timm's model name for this backbone's export, e.g. ``vit_small_patch16_224`` or ``resnet50``."""
    from dino_fast.pretrained import infer_vit_config

    sd = export_timm_state_dict(backbone)
    if is_resnet_state_dict(sd):
        return infer_resnet_arch(sd)
    cfg = infer_vit_config(sd, type(backbone).__name__)
    return f"{cfg['arch']}_patch{cfg['patch_size']}_{cfg['img_size']}"


def _atomic_save(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """``.safetensors`` via safetensors, anything else via torch.save; written to a temp file
    beside ``path`` then renamed over it, so a crash leaves no torn file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return atomic_torch_save(sd, path)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file(sd, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_timm_state_dict(backbone: nn.Module, path: str | os.PathLike) -> Path:
    """Write :func:`export_timm_state_dict` to ``path`` atomically (.safetensors or torch.save)."""
    return _atomic_save(export_timm_state_dict(backbone), path)


def save_official_backbone(backbone: nn.Module, path: str | os.PathLike) -> Path:
    """Write :func:`export_official_backbone` to ``path`` atomically (.safetensors or torch.save)."""
    return _atomic_save(export_official_backbone(backbone), path)


# --------------------------------------------------------------------------- training checkpoints
def _epochs_done(path: Path, step: int) -> int:
    import json

    plan = json.loads(read_checkpoint_values(path, {"train.plan": ""})["train.plan"])
    return step // plan["niter_per_epoch"]


def export_checkpoint(checkpoint: str | Path, fmt: str, output: str | Path,
                      key: str = "teacher") -> tuple[Path, str]:
    """Write ``checkpoint`` (a checkpoint directory) as one ``.pth`` file in ``fmt``; returns the
    path and one line saying what was written (the ``pos_embed`` grid it holds)."""
    from dino_fast.pretrained import load_pretrained

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = Path(checkpoint)
    full = consolidate(path)  # a missing, deleted or unfinished checkpoint: one line saying which
    if fmt == "official":
        note = describe_official_grid(full["teacher"], "backbone.")
        # Optimizer state is not exported: the official evaluations read the models only.
        save = to_official_checkpoint(full["student"], full["teacher"], _EMPTY_OPTIMIZER,
                                      _epochs_done(path, full["step"]), full["config"], full["dino_loss"])
        return atomic_torch_save(save, output), f"official main_dino.py checkpoint layout; {note}"
    backbone = load_pretrained(full, key=key)
    note = describe_official_grid(backbone.state_dict())
    if fmt == "timm":
        return save_timm_state_dict(backbone, output), f"timm {timm_model_name(backbone)} state dict ({key}); {note}"
    return save_official_backbone(backbone, output), f"official released backbone layout ({key}); {note}"


def _full_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A module's full (gathered, CPU) state dict; collective for a sharded module. A mapping as is."""
    if not isinstance(model, nn.Module):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_official_checkpoint(output_dir: str | Path, *, student: nn.Module | Mapping[str, torch.Tensor],
                              teacher: nn.Module | Mapping[str, torch.Tensor], optimizer_sd: Mapping[str, Any] | None,
                              epoch: int, config: Mapping[str, Any], dino_loss_sd: Mapping[str, torch.Tensor],
                              scaler_sd: Mapping[str, Any] | None = None, write: bool = True,
                              snapshot_epoch: int | None = None) -> Path | None:
    """``output_dir/checkpoint.pth`` in the official layout (and ``checkpoint{epoch:04}.pth`` at a
    snapshot epoch, as main_dino.py's ``saveckp_freq``); returns the path on the writing rank.

    ``student``/``teacher``: ``MultiCropWrapper`` modules (their full state dicts are gathered:
    collective when sharded, so every rank calls this) or full state dicts. ``optimizer_sd``: the
    student optimizer's state dict, None for an empty one (a sharded optimizer's full state would
    need gathering; the official evaluations never read it). ``epoch``: finished epochs.
    ``config``: the run's arguments (official names). ``dino_loss_sd``: holds ``center``.
    ``scaler_sd``: the fp16 GradScaler's, when there is one. ``write``: whether this rank writes
    (rank 0). Logs one line saying what was written."""
    student_sd, teacher_sd = _full_state_dict(student), _full_state_dict(teacher)
    if not write:
        return None
    note = describe_official_grid(teacher_sd, "backbone.")
    save = to_official_checkpoint(student_sd, teacher_sd, optimizer_sd if optimizer_sd is not None
                                  else _EMPTY_OPTIMIZER, epoch, config, dino_loss_sd, scaler_sd)
    path = atomic_torch_save(save, Path(output_dir) / "checkpoint.pth")
    if snapshot_epoch is not None:
        atomic_torch_save(save, Path(output_dir) / f"checkpoint{snapshot_epoch:04d}.pth")
    log.info("wrote %s (official layout, epoch %d): %s", path, epoch, note)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dino-fast export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (<output_dir>/checkpoints/step-*)")
    p.add_argument("--format", default="official", choices=FORMATS,
                   help="official: main_dino.py checkpoint layout; timm: timm ViT state dict; released: the "
                        "officially released backbone weights layout (all with pos_embed on the official "
                        "224-px grid)")
    p.add_argument("--output", required=True, help="the .pth file to write (atomically)")
    p.add_argument("--key", default="teacher", help="which model to export for timm / released")
    args = p.parse_args(argv)
    out, note = export_checkpoint(args.checkpoint, args.format, args.output, args.key)
    print(f"wrote {out}: {note}")
    return 0
