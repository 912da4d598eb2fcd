"""What ``dino-fast knn`` / ``linear`` / ``visualize`` share to take the official command lines
(``eval_knn.py``, ``eval_linear.py``, ``visualize_attention.py``) unchanged: the official
``bool_flag``, the ``[<script> flag]`` mark in ``-h``, ``--dist_url`` / ``--local_rank`` (accepted;
these evaluations run in one process), ``--precision``, and ``--arch`` / ``--patch_size`` checked
against the weights (the architecture is read off the tensors).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from torch import nn

from dino_fast.errors import ConfigError

__all__ = ["bool_flag", "official", "add_distributed_flags", "add_model_flags", "add_precision_flag",
           "check_single_process", "check_arch", "PRECISIONS"]

log = logging.getLogger("dino_fast")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def bool_flag(s: str) -> bool:
    """The official ``utils.bool_flag``: on/true/1 or off/false/0, any case."""
    if s.lower() in {"off", "false", "0"}:
        return False
    if s.lower() in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError("invalid value for a boolean flag")


def official(text: str, script: str) -> str:
    """``text`` marked as an official flag of ``script`` in ``-h``."""
    return f"{text} [{script} flag]"


def add_distributed_flags(p: argparse.ArgumentParser, script: str) -> None:
    """The official ``--dist_url`` / ``--local_rank``: accepted and checked, see :func:`check_single_process`."""
    p.add_argument("--dist_url", default="env://", type=str,
                   help=official("accepted for the official command line; ignored: the evaluation runs in one "
                                 "process on --device", script))
    p.add_argument("--local_rank", default=0, type=int,
                   help=official("accepted (torch.distributed.launch passes it); ignored", script))


def add_model_flags(p: argparse.ArgumentParser, script: str, patch_size: int = 16,
                    arch_choices: list[str] | None = None) -> None:
    """The official ``--arch`` / ``--patch_size`` (checked by :func:`check_arch`) and ``--checkpoint_key``."""
    p.add_argument("--arch", default="vit_small", type=str, choices=arch_choices,
                   help=official("checked against the weights, whose architecture is used", script))
    p.add_argument("--patch_size", default=patch_size, type=int,
                   help=official("checked against the weights, whose patch size is used", script))
    p.add_argument("--checkpoint_key", default="teacher", type=str,
                   help=official("which model of a training checkpoint", script))


def add_precision_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="compute dtype of the backbone: auto = bf16 on CUDA and AMX CPUs, fp32 elsewhere (the training run's "
                        "`precision`); fp32 for bit-faithful features")


def check_single_process(args: argparse.Namespace, what: str) -> None:
    """The official scripts run one process per GPU under ``torch.distributed.launch``; these run
    one process: a launch with several processes is refused (each would redo the whole
    evaluation and write the same files), a non-default ``--dist_url`` is noted and ignored."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise ConfigError(f"{what}: dino-fast {what} runs in one process (one device, --device); it was launched "
                          f"with WORLD_SIZE={world}: run it with plain `dino-fast {what} ...`, not torchrun / "
                          f"torch.distributed.launch")
    if args.dist_url != "env://":
        log.warning("%s: --dist_url %s ignored: the evaluation runs in one process", what, args.dist_url)


def _weights_arch(model: nn.Module) -> tuple[str, int | None] | None:
    """(arch, patch size or None) of a loaded backbone, read off its tensors; None when unknown."""
    from dino_fast.models import infer_resnet_arch, is_resnet_state_dict
    from dino_fast.pretrained import infer_vit_config

    sd = model.state_dict()
    try:
        if is_resnet_state_dict(sd):
            return infer_resnet_arch(sd), None
        cfg = infer_vit_config(sd)
        return cfg["arch"], cfg["patch_size"]
    except Exception:  # an architecture dino_fast does not name: nothing to compare
        return None


def check_arch(model: nn.Module, arch: str | None, patch_size: int | None, what: str) -> None:
    """The official scripts build ``--arch`` / ``--patch_size`` and load the weights into it (a
    mismatch is a shape error there); here the architecture is the weights', and a differing
    ``--arch`` / ``--patch_size`` (the official defaults included) is said in one warning line."""
    from dino_fast.models.build import ARCH_ALIASES

    found = _weights_arch(model)
    if found is None or arch is None:
        return
    w_arch, w_patch = found
    asked: Any = ARCH_ALIASES.get(arch, arch)
    if asked != w_arch or (w_patch is not None and patch_size is not None and patch_size != w_patch):
        weights = w_arch if w_patch is None else f"{w_arch}/{w_patch}"
        flags = f"--arch {arch}" + ("" if w_patch is None or patch_size is None else f" --patch_size {patch_size}")
        log.warning("%s: the weights hold a %s, not %s: evaluating the weights' architecture (read off the tensors)",
                    what, weights, flags)

