"""Data parallelism applied from outside the model (torchtitan style): FSDP2 and activation
checkpointing for a ``MultiCropWrapper`` (``backbone.blocks`` + ``head``).

The models stay plain ``nn.Module`` s; :func:`apply_fsdp` calls ``fully_shard`` bottom-up:

- every transformer block (one all-gather / reduce-scatter per block, overlapped with compute),
- the backbone (patch embed, cls token, pos embed, final norm) as its own unit, so the teacher
  backbone can also be run alone (k-NN during training) and ``forward_packed`` is hooked,
- the head (its K x 256 last layer is the largest single weight of a small ViT),
- the wrapper as the root (no parameters of its own; it coordinates the others).

Parameters become ``DTensor`` s sharded on dim 0; the optimizer, :class:`~dino_fast.ema.TeacherEMA`
and the per-parameter gradient clip (:func:`dino_fast.optim.clip_gradients_`) work on the local
shards. Every rank builds the same initial weights from ``cfg.seed``, so sharding needs no broadcast.
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino_fast.config import ConfigError, TrainConfig
from dino_fast.distributed import get_world_size, is_distributed, is_main_process

__all__ = ["apply_fsdp", "apply_activation_checkpointing", "parallelize",
           "init_single_process_group", "check_config_agrees", "all_reduce_max"]

log = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of storing them.

    Blocks are wrapped in place with ``checkpoint_wrapper`` (non-reentrant); state-dict keys
    and the pairing of student/teacher parameters ignore the wrapper's name segment."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    lists = _block_lists(model)
    if not lists:
        log.warning("activation_checkpointing: %s has no block lists to checkpoint (blocks, layer1..4): nothing is "
                    "recomputed", type(getattr(model, "backbone", model)).__name__)
    for blocks in lists:
        for i, block in enumerate(blocks):
            if not isinstance(block, CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(block)


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True, activation_checkpointing: bool = False, *,
               mesh: Any = None) -> nn.Module:
    """Shard ``model`` (a ``MultiCropWrapper``) in place with FSDP2 and return it.

    Args:
        model: has ``backbone.blocks`` (an ``nn.ModuleList``) and ``head``.
        param_dtype: dtype parameters are all-gathered and computed in (bf16 on GPU); None keeps
            their own dtype (fp32 on CPU). The sharded master copy stays fp32 either way.
        reduce_dtype: dtype of the gradient reduce-scatter (fp32: averaging bf16 gradients loses bits).
        reshard_after_forward: free gathered block weights after forward (re-gathered in backward).
            A model without trainable parameters (the teacher) always reshards everything: with no
            backward, nothing else would, and the EMA writes the shards the next forward must re-gather.
        activation_checkpointing: wrap the blocks with :func:`apply_activation_checkpointing` first.
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default process group.
    """
    if not is_distributed():
        raise RuntimeError("apply_fsdp needs an initialised process group: launch with torchrun, or call "
                           "dino_fast.parallel.init_single_process_group() for a one-process run")
    if not hasattr(model, "backbone") or not hasattr(model, "head"):
        raise TypeError(f"apply_fsdp expects a MultiCropWrapper (backbone + head), got {type(model).__name__}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is None:
        mesh = _default_mesh(next(model.parameters()).device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    trainable = any(p.requires_grad for p in model.parameters())
    for blocks in _block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model.backbone, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # DinoViT.forward returns the CLS rows as a view; FSDP warns in case the caller edits it in
    # place (that would skip its backward hook). MultiCropWrapper only concatenates it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(DinoViT|Xcit|MultiCropWrapper)\) returned a view")
    if hasattr(model.backbone, "forward_packed"):
        register_fsdp_forward_method(model.backbone, "forward_packed")  # called directly, not via __call__
    # The head runs last in forward and first in backward: a trainable one stays gathered in between.
    fully_shard(model.head, mesh=mesh, mp_policy=policy, reshard_after_forward=not trainable)
    if isinstance(getattr(model, "patch_head", None), nn.Module):  # iBOT's own patch head
        fully_shard(model.patch_head, mesh=mesh, mp_policy=policy, reshard_after_forward=not trainable)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for owner, method in ((model, "forward_train"), (model.backbone, "forward_tokens")):
        if hasattr(owner, method):  # called directly, not via __call__
            register_fsdp_forward_method(owner, method)
    # FSDP makes the first module to run forward the root. Fix it to the wrapper now: running
    # teacher.backbone alone first (k-NN before training) would otherwise make the backbone the
    # root and the next full forward fail. (No public API; skipped if torch renames it.)
    lazy_init = getattr(getattr(model, "_get_fsdp_state", lambda: None)(), "_lazy_init", None)
    if lazy_init is not None:
        lazy_init()
    return model


def parallelize(student: nn.Module, teacher: nn.Module, cfg: TrainConfig, device: torch.device,
                dtype: torch.dtype = torch.float32) -> bool:
    """Activation checkpointing (student, if configured) and FSDP2 on both models when the run is
    distributed or ``cfg.fsdp`` forces it; parameters are all-gathered and computed in ``dtype``
    (the run's compute dtype, :func:`dino_fast.precision.resolve_compute_dtype`). Returns True when the
    models were sharded."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(student)  # the teacher runs under no_grad: nothing to recompute
    if not (cfg.fsdp or get_world_size() > 1):
        return False
    mesh = _default_mesh(device)
    param_dtype = None if dtype == torch.float32 else dtype
    apply_fsdp(student, param_dtype=param_dtype, mesh=mesh)
    apply_fsdp(teacher, param_dtype=param_dtype, mesh=mesh)
    if is_main_process():
        log.info("FSDP2: student and teacher sharded over %d rank(s), compute dtype %s%s", mesh.size(),
                 dtype, ", activation checkpointing" if cfg.activation_checkpointing else "")
    return True


def init_single_process_group(device: torch.device) -> None:
    """A one-rank process group (no torchrun), so ``fsdp: true`` runs the sharded code path alone."""
    if is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def check_config_agrees(cfg: TrainConfig) -> None:
    """Raise ConfigError on every rank when the ranks were given different configs.

    Ranks that train different models or schedules would hang or silently diverge; the message
    names each differing key with rank 0's value and the other rank's."""
    if not is_distributed() or get_world_size() == 1:
        return
    mine = json.loads(json.dumps(cfg.to_dict(), sort_keys=True))
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, mine)
    ref = gathered[0]
    diffs = [f"{k}: rank 0 has {ref.get(k)!r}, rank {r} has {other.get(k)!r}"
             for r, other in enumerate(gathered[1:], start=1) for k in sorted(set(ref) | set(other))
             if ref.get(k) != other.get(k)]
    if diffs:
        raise ConfigError(f"ranks were given different configs ({len(diffs)} difference(s)): " + "; ".join(diffs[:8]))


def all_reduce_max(value: float, device: torch.device) -> float:
    """Max of a host float over ranks (a host sync: call at log time only)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _block_lists(model: nn.Module) -> list[nn.Module]:
    """The containers of the backbone's repeated blocks: a ViT's or XCiT's ``blocks``, a ResNet's four
    stages; none for another torchvision model, whose backbone is then sharded (and checkpointed) as
    one unit."""
    backbone = getattr(model, "backbone", None)
    lists = [getattr(backbone, "blocks", None)]
    if lists[0] is None:
        lists = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    return lists if all(isinstance(b, (nn.ModuleList, nn.Sequential)) for b in lists) else []


def _default_mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (get_world_size(),))
