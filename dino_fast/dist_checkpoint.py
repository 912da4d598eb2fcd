"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Which format a run writes: sharded (FSDP) runs write DCP directories, each rank its own shards
and nobody gathers the full model; single-process runs write one ``torch.save`` file
(:mod:`dino_fast.checkpoint`). Either is resumed by any run, whatever its world size:

=========================  ==========================  =====================================
checkpoint                 resuming run                how
=========================  ==========================  =====================================
DCP ``step-<step>/``       any (sharded or not)        :func:`load_sharded` (DCP reshards)
single file ``.pth``       sharded                     :func:`load_full_into_sharded`
single file ``.pth``       single process              ``Trainer.load_state_dict``
=========================  ==========================  =====================================

Layout of ``<output_dir>/checkpoints/step-XXXXXXXX/``: DCP's ``.metadata`` plus one
``__<rank>_0.distcp`` per rank. Keys (flattened by DCP): ``student.*``, ``teacher.*`` (model
state dicts with wrapper-free names, so they also match unsharded models), ``optimizer.*``
(parameters keyed by name), ``dino_loss.center``, ``step``, ``world_size``, ``format``,
``config`` (JSON), and ``rng_rank<r>`` (rank r's RNG states, pickled).

Crash safety: every rank writes into ``step-XXXXXXXX.tmp/``; ``dcp.save`` returns on rank 0
only after all ranks' writes are gathered and ``.metadata`` is written; rank 0 then renames the
directory to ``step-XXXXXXXX/`` and fsyncs the parent; a barrier holds the other ranks until
then. A directory with the final name is therefore always complete, and ``.tmp`` leftovers of
a crash are ignored by ``latest_checkpoint`` and deleted by the next save.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dino_fast.checkpoint import fsync_dir, prune_checkpoints, rng_state, set_rng_state
from dino_fast.distributed import barrier, get_rank, get_world_size, is_distributed

if TYPE_CHECKING:
    from dino_fast.train import Trainer

__all__ = ["DCP_FORMAT", "dcp_checkpoint_dir", "is_dcp_checkpoint", "save_sharded", "load_sharded",
           "load_full_into_sharded", "consolidate"]

log = logging.getLogger(__name__)

DCP_FORMAT = "dino_fast-dcp-1"
# A parameter with no saved optimizer state (never had a gradient) is loaded with none.
_NOT_STRICT = StateDictOptions(strict=False)


def dcp_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A complete DCP directory (its ``.metadata`` is written last)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _model_states(trainer: "Trainer") -> dict[str, Any]:
    """Model + optimizer state dicts whose tensors are this rank's shards (plain tensors when unsharded)."""
    return {
        "student": get_model_state_dict(trainer.student),
        "teacher": get_model_state_dict(trainer.teacher),
        "optimizer": get_optimizer_state_dict(trainer.student, trainer.optimizer),
        "dino_loss": trainer.loss_fn.state_dict(),
    }


def save_sharded(trainer: "Trainer", keep: int = 2) -> Path:
    """Collective: every rank writes its shards of the trainer state into a new
    ``step-<step>/`` checkpoint (via ``.tmp``, see module doc). Returns the final path."""
    rank, world = get_rank(), get_world_size()
    final = dcp_checkpoint_dir(trainer.out, trainer.step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of this step
        tmp.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    state = _model_states(trainer)
    state.update({
        "format": DCP_FORMAT,
        "step": trainer.step,
        "world_size": world,
        "config": json.dumps(trainer.cfg.to_dict(), sort_keys=True),
        f"rng_rank{rank}": pickle.dumps(rng_state()),  # bytes: stored whole, per rank
    })
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        if final.exists():  # re-saving a step (resumed from an older checkpoint): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(final.parent)
        prune_checkpoints(trainer.out, keep=keep)
    barrier()  # nobody moves on (or reads the checkpoint) before the rename
    return final


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """dcp.load in place; on a single process without a process group, without DCP's warning
    that it assumes exactly that."""
    if is_distributed():
        dcp.load(state, checkpoint_id=str(path))
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def _read_keys(path: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_sharded(trainer: "Trainer", path: str | Path) -> None:
    """Collective when distributed: load a DCP checkpoint into ``trainer``, resharding to this
    run's world size (or into unsharded models on a single process)."""
    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"not a complete DCP checkpoint directory (no .metadata): {path}")
    keys = _read_keys(path)
    if "format" not in keys or "config" not in keys:
        raise ValueError(f"{path} is a DCP checkpoint but not a dino_fast training checkpoint")
    rank, world = get_rank(), get_world_size()
    meta: dict[str, Any] = {"format": "", "config": "", "step": 0, "world_size": 0}
    rng_key = f"rng_rank{rank}"
    if rng_key in keys:
        meta[rng_key] = b""
    _dcp_load(meta, path)
    if meta["format"] != DCP_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta['format']!r}, this version reads {DCP_FORMAT!r}")
    trainer.restore_config(json.loads(meta["config"]))  # before the loss: it rebuilds the center buffer
    state = _model_states(trainer)
    # Parameters that never had a gradient (the head's last layer during freeze_last_layer) have
    # no optimizer state in the checkpoint; they must get none here either, or AdamW's bias
    # correction would start from the placeholder state DCP's state-dict API creates.
    saved = {k[len("optimizer.state."):].rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.state.")}
    state["optimizer"]["state"] = {k: v for k, v in state["optimizer"]["state"].items() if k in saved}
    _dcp_load(state, path)
    set_model_state_dict(trainer.student, state["student"])
    set_model_state_dict(trainer.teacher, state["teacher"])
    set_optimizer_state_dict(trainer.student, trainer.optimizer, state["optimizer"], options=_NOT_STRICT)
    trainer.loss_fn.load_state_dict(state["dino_loss"])
    trainer.step = int(meta["step"])
    saved_world = int(meta["world_size"])
    if saved_world == world and rng_key in meta:
        set_rng_state(pickle.load(io.BytesIO(meta[rng_key])))
    else:
        _reseed(trainer, f"saved on {saved_world} rank(s), resumed on {world}")


def load_full_into_sharded(trainer: "Trainer", state: dict[str, Any]) -> None:
    """Load a single-file (full, unsharded) training checkpoint into a sharded trainer: every
    rank holds the full dict and keeps its own shards."""
    trainer.restore_config(state["config"])
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(trainer.student, state["student"], options=full)
    set_model_state_dict(trainer.teacher, state["teacher"], options=full)
    optim = _optimizer_state_by_name(trainer, state["optimizer"])
    set_optimizer_state_dict(trainer.student, trainer.optimizer, optim, options=_NOT_STRICT)
    trainer.loss_fn.load_state_dict(state["dino_loss"])
    trainer.step = int(state["step"])
    if get_world_size() == 1:
        set_rng_state(state["rng"])
    else:
        _reseed(trainer, f"single-process checkpoint resumed on {get_world_size()} ranks")


def consolidate(path: str | Path) -> dict[str, Any]:
    """The full (unsharded) models of a DCP checkpoint, read on one process into CPU memory:
    ``{"student", "teacher", "dino_loss", "step", "config"}``, the layout of an official DINO
    training checkpoint, so ``dino_fast.load_pretrained(consolidate(path))`` gives the teacher
    backbone. Optimizer state and RNG streams are not read (use :func:`load_sharded` to resume)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"not a complete DCP checkpoint directory (no .metadata): {path}")
    with warnings.catch_warnings():  # DCP warns that it reads on one process: exactly the intent
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
        state = _load_state_dict_from_keys({"student", "teacher", "dino_loss", "step", "config", "format"},
                                           checkpoint_id=str(path), process_group=None)
    if state.get("format") != DCP_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {DCP_FORMAT!r}")
    del state["format"]
    state["config"] = json.loads(state["config"])
    return state


def _optimizer_state_by_name(trainer: "Trainer", osd: dict[str, Any]) -> dict[str, Any]:
    """Full ``torch.optim`` state dict (parameters numbered in param-group order) -> keyed by
    parameter name, each state tensor cut to this rank's shard of its parameter (no
    communication: every rank holds the full tensors). The numbering follows
    ``optimizer.param_groups``, which ``build_optimizer`` builds in the same order every time."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from dino_fast.ema import _canonical_name

    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    names = {p: _canonical_name(n) for n, p in trainer.student.named_parameters()}
    n_saved = sum(len(g["params"]) for g in osd["param_groups"])
    if n_saved != len(params):
        raise ValueError(f"checkpoint optimizer has {n_saved} parameters, this model {len(params)}: "
                         "a different architecture or config")

    def shard(value: Any, p: torch.Tensor) -> Any:
        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return value  # AdamW's scalar step, or an unsharded parameter's state

    state = {names[params[int(i)]]: {k: shard(v, params[int(i)]) for k, v in s.items()}
             for i, s in osd["state"].items()}
    groups = [{**g, "params": [names[params[int(i)]] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _reseed(trainer: "Trainer", why: str) -> None:
    """Fresh, deterministic per-rank RNG streams when the saved ones do not map onto the ranks.
    Only drop path draws from them (the data order and augmentations are seeded per sample)."""
    seed = (trainer.cfg.seed * 1_000_003 + trainer.step) * 1009 + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    log.info("RNG streams reseeded (%s): drop-path draws differ from an uninterrupted run", why)
