"""Write checkpoints in the official ``main_dino.py`` layout, for the official evaluation
scripts (``eval_knn.py``, ``eval_linear.py``, ``utils.restart_from_checkpoint``).

Official ``main_dino.py`` saves, once per epoch::

    save_dict = {'student': student.state_dict(), 'teacher': teacher.state_dict(),
                 'optimizer': optimizer.state_dict(), 'epoch': epoch + 1, 'args': args,
                 'dino_loss': dino_loss.state_dict()}
    if fp16_scaler is not None: save_dict['fp16_scaler'] = fp16_scaler.state_dict()

The student is always DDP-wrapped, so its keys read ``module.backbone.*`` / ``module.head.*``;
the teacher is DDP-wrapped only when the model has BatchNorm (``utils.has_batchnorms``:
a ResNet, or a head built with ``use_bn``), so its keys read ``backbone.*`` / ``head.*``
for a ViT and ``module.backbone.*`` for a ResNet. :func:`to_official_checkpoint` adds
exactly those prefixes to plain ``MultiCropWrapper`` state dicts.

Position embeddings are written on the official 224-px grid (:func:`to_official_grid`): the
official models are built with ``img_size=224`` whatever the crop size (``main_dino.py``, the
eval scripts, ``hubconf.py``) and load ``pos_embed`` strictly by shape, so a run trained on
32-px crops (a 2x2 or 4x4 grid) is resized with the official bicubic +0.1 rule
(:func:`dino_fast.models.interpolate_pos_encoding`, what our model does itself at 224 px).
The official model then gives our features exactly at 224 px, the size its eval scripts use,
and approximately at the training size, where it interpolates the grid back (bicubic up then
down is not the identity).

``args`` is stored as a plain dict, not the official ``argparse.Namespace``: since torch 2.6
``torch.load`` defaults to ``weights_only=True``, which refuses a Namespace, and the official
``utils.load_pretrained_weights`` calls ``torch.load(path, map_location="cpu")`` on the whole
file, so a Namespace would make official ``eval_knn.py`` fail on current torch. Nothing in the
official code reads ``args`` back.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["to_official_checkpoint", "save_official_checkpoint", "official_args", "to_official_grid",
           "describe_official_grid", "OFFICIAL_IMG_SIZE"]

# official vision_transformer.py: ``img_size=[224]``, the size every official builder uses
OFFICIAL_IMG_SIZE = 224

# Wrapper names that are not part of the official keys: DDP at the front, torch.compile anywhere.
_DDP, _COMPILE = "module.", "_orig_mod."
_PLAIN = (str, int, float, bool, type(None))


def _plain_model_keys(sd: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    """``sd`` with DDP/compile prefixes removed, checked to be a ``MultiCropWrapper`` state dict
    (``backbone.*`` + ``head.*``) of plain tensors, as detached CPU copies."""
    if not isinstance(sd, Mapping) or not sd:
        raise TypeError(f"to_official_checkpoint: {name} must be a non-empty state dict, got {type(sd).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        key = k[len(_DDP):] if k.startswith(_DDP) else k
        key = key.replace(_COMPILE, "")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"to_official_checkpoint: {name}[{k!r}] is a {type(v).__name__}, not a tensor")
        if _is_dtensor(v):  # FSDP2 shard
            raise TypeError(f"to_official_checkpoint: {name}[{k!r}] is a {type(v).__name__}: gather the full state "
                            f"dict first (torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                            f"StateDictOptions(full_state_dict=True, cpu_offload=True))")
        out[key] = v.detach().to("cpu", copy=True)
    stray = sorted(k for k in out if not k.startswith(("backbone.", "head.")))
    if stray or not any(k.startswith("backbone.") for k in out):
        raise ValueError(f"to_official_checkpoint: {name} is not a MultiCropWrapper state dict (backbone.* + head.*);"
                         f" other keys: {stray[:5]}")
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _grids(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, int] | None:
    """(trained grid side, official grid side) of the ViT state dict ``sd`` (keys under ``prefix``,
    DDP / compile prefixes allowed), None for a convnet (no ``pos_embed``)."""
    wanted = (prefix + "pos_embed", prefix + "patch_embed.proj.weight")
    plain = {key: v for k, v in sd.items()
             if (key := (k[len(_DDP):] if k.startswith(_DDP) else k).replace(_COMPILE, "")) in wanted}
    pos, proj = plain.get(wanted[0]), plain.get(wanted[1])
    if pos is None or proj is None:
        return None
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if pos.ndim != 3 or side * side != n:
        raise ValueError(f"{prefix}pos_embed has shape {tuple(pos.shape)}, expected (1, 1 + g*g, D)")
    return side, OFFICIAL_IMG_SIZE // int(proj.shape[-1])


def to_official_grid(sd: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``sd`` with ``{prefix}pos_embed`` on the official 224-px grid (224 // patch per side),
    bicubically resized with the official +0.1 rule when it was trained on another grid
    (computed in fp32, stored in its own dtype); other entries and convnets unchanged."""
    from dino_fast.models import interpolate_pos_encoding

    out = dict(sd)
    grids = _grids(sd, prefix)
    if grids is not None and grids[0] != grids[1]:
        pos = sd[prefix + "pos_embed"]
        with torch.no_grad():
            resized = interpolate_pos_encoding(pos.detach().float(), grids[1], grids[1])
        out[prefix + "pos_embed"] = resized.to(pos.dtype).contiguous()
    return out


def describe_official_grid(sd: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """What :func:`to_official_grid` does to ``sd``, in words (the line an export prints)."""
    grids = _grids(sd, prefix)
    if grids is None:
        return "no pos_embed (a convnet): nothing resized"
    src, dst = grids
    if src == dst:
        return f"pos_embed kept on its {dst}x{dst} grid (the official {OFFICIAL_IMG_SIZE}-px models' own)"
    return (f"pos_embed resized {src}x{src} -> {dst}x{dst} (official bicubic) for the official "
            f"{OFFICIAL_IMG_SIZE}-px models")


def _has_batchnorm(sd: Mapping[str, torch.Tensor]) -> bool:
    """Official ``utils.has_batchnorms`` read off a state dict: BatchNorm layers (the only
    ones DINO models have that track running statistics) own ``running_mean``."""
    return any(k.endswith(".running_mean") for k in sd)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        if _is_dtensor(obj):
            raise TypeError(f"to_official_checkpoint: a {type(obj).__name__} in the optimizer state: gather the full "
                            f"optimizer state dict first (get_optimizer_state_dict with full_state_dict=True)")
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def official_args(args: Mapping[str, Any] | Any) -> dict[str, Any]:
    """``args`` (a mapping, a dataclass or an ``argparse.Namespace``) as a dict of values that
    ``torch.load(weights_only=True)`` reads back: str/int/float/bool/None and lists, tuples and
    dicts of them; paths become strings. TypeError names any other value."""
    if not isinstance(args, Mapping):
        if hasattr(args, "__dataclass_fields__"):
            import dataclasses

            args = dataclasses.asdict(args)
        elif hasattr(args, "__dict__"):
            args = vars(args)
        else:
            raise TypeError(f"official_args: expected a mapping, dataclass or Namespace, got {type(args).__name__}")

    def plain(name: str, v: Any) -> Any:
        if isinstance(v, _PLAIN):
            return v
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, (list, tuple)):
            return type(v)(plain(name, x) for x in v)
        if isinstance(v, Mapping):
            return {str(k): plain(f"{name}.{k}", x) for k, x in v.items()}
        raise TypeError(f"official_args: {name} is a {type(v).__name__}, which torch.load(weights_only=True) "
                        f"cannot read back; pass str/int/float/bool/None or lists/dicts of them")

    return {str(k): plain(str(k), v) for k, v in args.items()}


def to_official_checkpoint(student_sd: Mapping[str, torch.Tensor], teacher_sd: Mapping[str, torch.Tensor],
                           optimizer_sd: Mapping[str, Any], epoch: int, args_dict: Mapping[str, Any] | Any,
                           dino_loss_sd: Mapping[str, torch.Tensor],
                           fp16_scaler_sd: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The official ``main_dino.py`` ``save_dict`` (see the module docstring) from our parts.

    ``student_sd``/``teacher_sd``: ``MultiCropWrapper`` state dicts (``backbone.*``,
    ``head.*``; DDP ``module.`` and compile ``_orig_mod.`` are removed first; full, not
    sharded tensors). ``optimizer_sd``: the student optimizer's state dict (its parameter
    order is the official ``get_params_groups`` order). ``epoch``: stored as given; the
    official value is the number of finished epochs (``epoch + 1`` after epoch index
    ``epoch``), where a restart resumes. ``args_dict``: the run's arguments (official
    names), stored as a dict (:func:`official_args`). ``dino_loss_sd``: holds ``center``.
    ``fp16_scaler_sd``: a ``GradScaler`` state dict, stored only when given.
    Every tensor is a detached CPU copy. ``pos_embed`` is written on the official 224-px grid
    (:func:`to_official_grid`); when that resizes it, the optimizer state is left out
    (``{"state": {}, "param_groups": []}``): its ``pos_embed`` moments are on the trained grid,
    and no official reader of the file uses them (the eval scripts read the models only)."""
    student = _plain_model_keys(student_sd, "student_sd")
    teacher = _plain_model_keys(teacher_sd, "teacher_sd")
    resized = (grids := _grids(student, "backbone.")) is not None and grids[0] != grids[1]
    student, teacher = to_official_grid(student, "backbone."), to_official_grid(teacher, "backbone.")
    if not isinstance(optimizer_sd, Mapping) or not {"state", "param_groups"} <= set(optimizer_sd):
        raise ValueError("to_official_checkpoint: optimizer_sd must be an optimizer state dict "
                         "(with 'state' and 'param_groups')")
    if not isinstance(dino_loss_sd, Mapping) or not isinstance(dino_loss_sd.get("center"), torch.Tensor):
        raise ValueError("to_official_checkpoint: dino_loss_sd must be DINOLoss.state_dict() (with a 'center' tensor)")
    teacher_prefix = _DDP if _has_batchnorm(teacher) else ""  # teacher DDP-wrapped only for BatchNorm models
    save_dict: dict[str, Any] = {
        "student": {_DDP + k: v for k, v in student.items()},  # DDP-wrapped in every official run
        "teacher": {teacher_prefix + k: v for k, v in teacher.items()},
        "optimizer": {"state": {}, "param_groups": []} if resized else _to_cpu(dict(optimizer_sd)),
        "epoch": int(epoch),
        "args": official_args(args_dict),
        "dino_loss": _to_cpu(dict(dino_loss_sd)),
    }
    if fp16_scaler_sd is not None:
        save_dict["fp16_scaler"] = _to_cpu(dict(fp16_scaler_sd))
    return save_dict


def save_official_checkpoint(path: str | os.PathLike, **parts: Any) -> Path:
    """:func:`to_official_checkpoint` (``parts`` are its arguments) written atomically to
    ``path`` (``checkpoint.pth`` in the official runs); returns the path."""
    from dino_fast.checkpoint import atomic_torch_save

    return atomic_torch_save(to_official_checkpoint(**parts), path)
