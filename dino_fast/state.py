"""The Stateful parts of a training run, as the :class:`~dino_fast.checkpoint.Checkpointer` saves
them: models and optimizer through DCP's state-dict API (sharded or not, wrapper-free names),
and :class:`TrainState`, the run's own counters (step, training seconds, run plan, RNG streams).

To add a piece of training state: give it ``state_dict()`` / ``load_state_dict()`` (an
``nn.Module`` already has them) and add it to ``Trainer.parts()``; the checkpointer, resume and
the key/shape checks pick it up.
"""
from __future__ import annotations

import json
import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dino_fast.checkpoint import FORMAT
from dino_fast.distributed import get_rank, get_world_size
from dino_fast.plan import RunPlan

__all__ = ["ModelState", "OptimizerState", "TrainState", "rng_state", "set_rng_state", "reseed"]

log = logging.getLogger(__name__)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class ModelState:
    """A model's parameters and buffers (this rank's shards when sharded)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any], full: bool = False) -> None:
        """``full``: ``state`` holds whole (unsharded) tensors, e.g. from an old single-file checkpoint."""
        if full and _is_sharded(self.model):
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        elif full:
            self.model.load_state_dict(state)
        else:
            set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizer's state, keyed by parameter name (so it reshards and survives wrappers)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_targets(self, saved_keys: set[str]) -> dict[str, Any]:
        # A parameter that never had a gradient (the head's last layer during freeze_last_layer)
        # has no state in the checkpoint; it must get none here either, or AdamW's bias
        # correction would start from the placeholder state the state-dict API creates.
        state = self.state_dict()
        saved = {k[len("state."):].rsplit(".", 1)[0] for k in saved_keys if k.startswith("state.")}
        state["state"] = {k: v for k, v in state["state"].items() if k in saved}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(strict=False))

    def load_legacy(self, osd: dict[str, Any]) -> None:
        """A plain ``optimizer.state_dict()`` (parameters numbered in param-group order, full
        tensors) -> keyed by name, each state tensor cut to this rank's shard of its parameter."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        from dino_fast.ema import canonical_name

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        names = {p: canonical_name(n) for n, p in self.model.named_parameters()}
        n_saved = sum(len(g["params"]) for g in osd["param_groups"])
        if n_saved != len(params):
            from dino_fast.errors import CheckpointError

            raise CheckpointError(f"checkpoint optimizer has {n_saved} parameters, this model {len(params)}: "
                                  "a different architecture or config")

        def shard(value: Any, p: torch.Tensor) -> Any:
            if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            return value  # AdamW's scalar step, or an unsharded parameter's state

        state = {names[params[int(i)]]: {k: shard(v, params[int(i)]) for k, v in s.items()}
                 for i, s in osd["state"].items()}
        groups = [{**g, "params": [names[params[int(i)]] for i in g["params"]]} for g in osd["param_groups"]]
        self.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states, as tensors, containers and numbers
    (so ``torch.load(weights_only=True)`` reads them back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(cached)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def reseed(seed: int, step: int, why: str) -> None:
    """Fresh, deterministic per-rank RNG streams when the saved ones do not map onto the ranks.
    Only drop path draws from them (data order and augmentations are seeded per sample)."""
    s = (seed * 1_000_003 + step) * 1009 + get_rank()
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
    log.info("RNG streams reseeded (%s): drop-path draws differ from an uninterrupted run", why)


# ----------------------------------------------------------------------------- the run's counters
class TrainState:
    """Step, training seconds, run plan, the config it was trained with, and the RNG streams of
    every rank. The data position is the step (the sample order is a function of (seed, epoch),
    resumable at any batch)."""

    def __init__(self, config: dict[str, Any], plan: RunPlan, seed: int, data: dict[str, Any] | None = None) -> None:
        self.config, self.plan, self.seed, self.data = config, plan, seed, data or {}
        self.step = 0
        self.train_seconds = 0.0
        self.last_loss = float("nan")  # the loss of the last log row, kept for a resumed finished run
        self.saved_config: dict[str, Any] | None = None  # of the checkpoint last loaded
        self.saved_plan: RunPlan | None = None
        self.saved_data: dict[str, Any] | None = None  # None: a checkpoint written before data was recorded
        self.saved_world = get_world_size()

    @property
    def rng_key(self) -> str:
        return f"rng_rank{get_rank()}"

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "step": self.step, "train_seconds": self.train_seconds,
                "world_size": get_world_size(), "config": json.dumps(self.config, sort_keys=True),
                "plan": json.dumps(self.plan.to_dict(), sort_keys=True), "data": json.dumps(self.data, sort_keys=True),
                "last_loss": self.last_loss,
                self.rng_key: (rng_state(),)}  # a tuple: one value per rank, not traversed by DCP

    def load_targets(self, saved_keys: set[str]) -> dict[str, Any]:
        keys = ["format", "step", "train_seconds", "world_size", "config", "plan"]
        optional = ["data", "last_loss", self.rng_key]  # absent from older checkpoints
        return {k: None for k in keys + [k for k in optional if k in saved_keys]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.train_seconds = float(state["train_seconds"])
        self.saved_config = json.loads(state["config"])
        self.saved_plan = RunPlan.from_dict(json.loads(state["plan"]))
        self.saved_data = json.loads(state["data"]) if state.get("data") is not None else None
        self.last_loss = float(state["last_loss"]) if state.get("last_loss") is not None else float("nan")
        saved_world = self.saved_world = int(state["world_size"])
        if saved_world == get_world_size() and state.get(self.rng_key) is not None:
            set_rng_state(state[self.rng_key][0])
        else:
            reseed(self.seed, self.step, f"saved on {saved_world} rank(s), resumed on {get_world_size()}")

    def load_legacy(self, step: int, config: dict[str, Any], rng: dict[str, Any]) -> None:
        """From an old single-file checkpoint (no plan, no training seconds saved)."""
        self.step, self.saved_config, self.saved_plan = int(step), config, None
        if get_world_size() == 1:
            set_rng_state(rng)
        else:
            reseed(self.seed, self.step, f"single-process checkpoint resumed on {get_world_size()} ranks")
