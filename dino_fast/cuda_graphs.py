"""CUDA graphs for the static-shape training step (config ``cuda_graphs``).

A DINO step has static shapes (the same crops every step), so its whole device work - forward,
backward, clipping, AdamW, the teacher EMA, the center update and the loss accumulators - can be
captured once as a CUDA graph and replayed: one launch from the host instead of ~1,700 (the
eager step's count in bench/preflight.py). What that takes, and where it is done:

- inputs: the views are copied into static buffers (one ``_foreach_copy_``) that the graph reads;
- per-step host values live in device tensors written before each replay by ``fill_`` (a
  kernel argument: no host buffer, no copy, no sync): the learning rate (AdamW, fused, takes a
  tensor ``lr``), the weight-decay factor ``1 - lr * wd`` (fused AdamW bakes its float
  ``weight_decay`` into the graph, so the decayed group gets ``weight_decay = 0`` and a step
  pre-hook multiplies its parameters by the factor: AdamW's decoupled decay, the same product as
  torch's foreach AdamW) and the EMA momentum (read on the device by the EMA kernel);
- values that change at most once per epoch are part of the graph's key: the teacher
  temperature (a float argument of the fused loss kernel) and whether the head's last layer is
  frozen (which gradients exist); a new key is warmed up and captured again (one log line);
- cu_seqlens and block masks are built once per sequence layout (``DinoViT`` keeps its
  ``PackedSeqlens``; ``pos_embed`` keeps its resize matrices), so no host-to-device copy is
  recorded in the graph (its host buffer would be freed and reused after the capture);
- before each capture, ``WARMUP_STEPS`` real steps run eagerly on a side stream (lazy
  initialisation, Triton autotuning, the EMA launch plan, the optimizer state), then
  ``torch.cuda.graph`` captures one step with gradients set to None (so the captured backward
  writes them, and every replay does the same) and the step is replayed. The capture is
  ``thread_local``: the loader's threads (DALI) may call CUDA meanwhile.

What cannot be captured is refused at config check (:func:`graph_refusal`: fp16's GradScaler
reads its scale on the host; iBOT draws masks whose count depends on the data; FSDP and
activation checkpointing run collectives / RNG-state reads the graph cannot hold; other
optimizers take a float lr) or, when only the run knows it (FSDP under torchrun), falls back
to eager steps with one log line (:func:`graphed_step`). A load brings new optimizer groups and
state tensors: the graph is dropped and captured again (noticed from the groups' identity).

On CPU (no CUDA graphs) the same static-buffer step runs eagerly, with the optimizer as built
(fused AdamW, its lr a number): the CPU twin that tests/test_cuda_graphs.py compares with the
plain step bit for bit. tests/preflight/test_graphed_step.py traces the CUDA flavour on a fake
CUDA device (fused AdamW with the lr tensor; no host sync, no CPU tensor per step).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from dino_fast.plan import StepValues

__all__ = ["CudaGraphStep", "graph_refusal", "graphed_step"]

log = logging.getLogger(__name__)

Body = Callable[[Sequence[Sequence[torch.Tensor]], StepValues, torch.Tensor], torch.Tensor]


def graph_refusal(cfg: Any) -> str:
    """'' when config ``cuda_graphs`` can be honoured with the rest of ``cfg``; else why not (one line)."""
    if cfg.precision == "fp16":
        return "with precision fp16: GradScaler reads its scale on the host every step; use precision bf16"
    if cfg.ibot_weight > 0:
        return ("with ibot_weight > 0: iBOT's masks are drawn on the host with a data-dependent count; "
                "set cuda_graphs false")
    if cfg.fsdp:
        return "with fsdp true: FSDP's collectives and hooks are not captured; set one of them false"
    if cfg.activation_checkpointing:
        return ("with activation_checkpointing true: the recompute reads the RNG state on the host; "
                "set one of them false")
    if cfg.optimizer != "adamw":
        return f"with optimizer {cfg.optimizer}: only AdamW (fused) takes its learning rate from a device tensor"
    return ""


class CudaGraphStep:
    """The step ``body(micro_batches, values, momentum)`` run from static buffers: on CUDA warmed up,
    captured once per key and replayed; on CPU (``capture=False``) run eagerly, step after step.

    ``body`` must do the step's device work and nothing on the host: it gets the static views,
    the step's :class:`~dino_fast.plan.StepValues` (it reads only ``teacher_temp`` and ``epoch``,
    both in the key) and the momentum as a device tensor; learning rate and weight decay are in
    ``optimizer`` already (an AdamW, switched here to fused with a tensor lr). Returns the loss."""

    WARMUP_STEPS = 2

    def __init__(self, body: Body, optimizer: torch.optim.Optimizer, device: torch.device, freeze_last_layer: int = 0,
                 capture: bool | None = None) -> None:
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"cuda_graphs needs torch.optim.AdamW, got {type(optimizer).__name__}")
        self.body, self.optimizer, self.device = body, optimizer, torch.device(device)
        self.freeze_last_layer = freeze_last_layer
        self.capture = self.device.type == "cuda" if capture is None else capture
        # CUDA: AdamW fused, reading lr from a device tensor. CPU (never captured): the optimizer as
        # built (fused), its lr a number written each step, so the twin matches the plain step bit for bit.
        self.tensor_lr = self.device.type == "cuda"
        # per-step host values, written by fill_ before each step (see the module docstring)
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)
        self.decay = torch.ones((), dtype=torch.float32, device=self.device)  # 1 - lr * wd
        self.momentum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._groups: list[dict] = []
        self._decayed: list[dict] = []
        self._install()
        optimizer.register_step_pre_hook(self._weight_decay)
        self._key: tuple | None = None
        self._inputs: list[list[torch.Tensor]] = []
        self._graph: Any = None
        self._loss: torch.Tensor | None = None
        self._warm = 0
        self.captures = 0

    # ------------------------------------------------------------------ optimizer
    def _install(self) -> bool:
        """Weight decay 0 in the decayed groups (the pre-hook applies it) and, on CUDA, the lr tensor
        and fused, capturable AdamW; True when the groups had been replaced (a ``load_state_dict``,
        which brings new groups and new state tensors)."""
        groups = self.optimizer.param_groups
        if len(groups) == len(self._groups) and all(a is b for a, b in zip(groups, self._groups)):
            return False
        self._groups = list(groups)
        self._decayed = [g for g in groups if not g.get("no_decay", False)]  # set_schedule_'s decayed groups
        for g in self._decayed:
            g["weight_decay"] = 0.0
        if self.tensor_lr:
            for g in groups:
                g.update(lr=self.lr, fused=True, foreach=False, capturable=True)
            # the warm-up steps run it uncaptured on purpose (torch warns once about capturable=True then)
            self.optimizer._warned_capturable_if_run_uncaptured = True
        return True

    def _weight_decay(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """AdamW's decoupled decay, p <- p * (1 - lr * wd), for the parameters it updates (with a gradient)."""
        params = [p for g in self._decayed for p in g["params"] if p.grad is not None]
        if params:
            with torch.no_grad():  # pre-hooks run outside step()'s no_grad
                torch._foreach_mul_(params, self.decay)

    # ------------------------------------------------------------------ the step
    def __call__(self, micro_batches: Sequence[Sequence[torch.Tensor]], v: StepValues) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` with the schedule values ``v``; returns the loss."""
        if self._install():
            self._drop("the optimizer's groups and state were replaced (a load)")
        self.lr.fill_(v.lr)
        if not self.tensor_lr:
            for g in self._groups:
                g["lr"] = v.lr
        self.decay.fill_(1.0 - v.lr * v.wd)  # in double on the host, rounded once, as foreach AdamW's scalar
        self.momentum.fill_(v.momentum)
        key = (tuple(tuple((tuple(x.shape), x.dtype, x.device) for x in views) for views in micro_batches),
               v.teacher_temp, v.epoch < self.freeze_last_layer)
        if key != self._key:
            if self._key is not None:
                log.info("cuda_graphs: the step changed (%s): warming up and capturing it again", _what_changed(
                    self._key, key))
            self._drop()
            self._key = key
            self._inputs = [[torch.empty_like(x) for x in views] for views in micro_batches]
        torch._foreach_copy_([x for views in self._inputs for x in views],  # the views into the static buffers
                             [x for views in micro_batches for x in views])
        if not self.capture:
            return self._eager(v)
        if self._graph is None and self._warm < self.WARMUP_STEPS:
            self._warm += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._eager(v)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        if self._graph is None:
            self._capture(v)
        self._graph.replay()
        return self._loss.clone()  # the graph's own output is overwritten by the next replay

    def _eager(self, v: StepValues) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.body(self._inputs, v, self.momentum)

    def _capture(self, v: StepValues) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward writes the gradients, every replay
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads may use CUDA meanwhile (DALI), which "global" forbids
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._loss = self.body(self._inputs, v, self.momentum)
        self._graph = graph
        self.captures += 1
        log.info("cuda_graphs: step captured (%d micro-batch(es), teacher temperature %g%s)", len(self._inputs),
                 v.teacher_temp, ", last layer frozen" if self._key[2] else "")

    def _drop(self, why: str = "") -> None:
        """Forget the captured graph (and its memory pool); the next steps warm up and capture again."""
        if why and self._graph is not None:
            log.info("cuda_graphs: %s: capturing the step again", why)
        self._graph, self._loss, self._warm = None, None, 0


def _what_changed(old: tuple, new: tuple) -> str:
    names = ("the views' shapes", "the teacher temperature", "the last layer's freeze")
    return ", ".join(n for n, a, b in zip(names, old, new) if a != b)


def graphed_step(cfg: Any, body: Body, optimizer: torch.optim.Optimizer, device: torch.device,
                 sharded: bool) -> CudaGraphStep | None:
    """The trainer's graphed step for ``cfg`` (None: plain eager steps). Config checks refused what
    the config says; here what only the run knows: sharded models (FSDP under torchrun) fall back
    to eager steps, and a CPU runs the static-buffer step without capture. One log line each."""
    if not cfg.cuda_graphs:
        return None
    if sharded:
        log.info("cuda_graphs: off, the models are sharded (FSDP's collectives are not captured): eager steps")
        return None
    if torch.device(device).type != "cuda":
        log.info("cuda_graphs: no CUDA graphs on %s: the static-buffer step runs eagerly", device)
    return CudaGraphStep(body, optimizer, device, freeze_last_layer=cfg.freeze_last_layer)
