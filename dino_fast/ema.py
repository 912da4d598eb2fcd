"""Teacher EMA: theta_t <- m * theta_t + (1 - m) * theta_s over every parameter, after each
optimizer step (DINO step 6).

Two implementations of the same update:

- ``"triton"``: one launch over the whole list (:func:`dino_fast.ops.multi_tensor_ema_`);
  the momentum may be a device tensor, read on the device.
- ``"foreach"``: ``_foreach_mul_`` + ``_foreach_add_`` (``_foreach_lerp_`` would turn a tensor
  weight into a host scalar), with the same fp32 ``m`` and ``1 - m`` for a number as for a tensor
  momentum, so that a graphed step (momentum in a device tensor) and an eager one agree bit for bit.

FSDP2 (DTensor) parameters are updated through their local shards: the update is elementwise
and student and teacher are sharded alike, so no gather is needed.

With a bf16 / fp16 compute dtype, :class:`TeacherEMA` also keeps a copy of the teacher in that
dtype (``TeacherEMA.forward_teacher``) that the teacher's forward runs on: the same pass writes
the new fp32 master value and its rounded copy, so the forward reads 2-byte weights instead of
casting the 4-byte ones under autocast every step (same values: autocast casts to nearest even).
"""
from __future__ import annotations

import copy
import logging
import weakref
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from dino_fast import ops

__all__ = ["update_teacher_", "TeacherEMA", "IMPLS", "compute_copy"]

log = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "foreach")
_HALF = (torch.bfloat16, torch.float16)

# Segments that wrappers insert into parameter names (DDP, torch.compile, FSDP1, activation
# checkpointing); dropped before pairing student and teacher parameters by name.
_WRAPPER_SEGMENTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(t: torch.Tensor, dtensor: type | None) -> torch.Tensor:
    """The tensor whose storage the update writes: the local shard of a DTensor, else itself."""
    if dtensor is not None and isinstance(t, dtensor):
        with torch.no_grad():  # under no_grad, to_local() returns the shard itself (same storage)
            return t.to_local()
    return t


def _local_list(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    dtensor = _dtensor_type()
    return [_local(p, dtensor) for p in params]


def _foreach_ema_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float | torch.Tensor,
                  copies: Sequence[torch.Tensor] = ()) -> None:
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"update_teacher_: shape mismatch at index {i}: teacher {tuple(t.shape)} "
                             f"vs student {tuple(s.shape)}")
    # foreach ops need one dtype per pair: bring a half-precision student up to the teacher's dtype
    student = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(teacher, student)]
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"update_teacher_: momentum tensor must be a 1-element floating tensor, "
                             f"got shape {tuple(momentum.shape)} {momentum.dtype}")
        if momentum.device != teacher[0].device:
            raise ValueError(f"update_teacher_: momentum tensor is on {momentum.device}, "
                             f"parameters on {teacher[0].device}")
        m, w = momentum.reshape(()), 1.0 - momentum.reshape(())
    else:  # the same fp32 numbers as a tensor momentum (and the kernel): m, then 1 - m in fp32
        m = float(np.float32(momentum))
        w = float(np.float32(1.0) - np.float32(m))
    torch._foreach_mul_(teacher, m)
    torch._foreach_add_(teacher, torch._foreach_mul(student, w))
    if copies:
        torch._foreach_copy_(list(copies), teacher[:len(copies)])  # rounded to nearest even


def update_teacher_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
                    momentum: float | torch.Tensor, impl: str = "auto", *, copies: Sequence[torch.Tensor] = (),
                    cache: dict | None = None) -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, pair by pair.

    Args:
        teacher_params, student_params: tensors, parameters or DTensors (their local shards are
            updated), paired by position.
        momentum: a float, or a 1-element tensor on the parameters' device (no host sync).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"foreach"``, or
            ``"auto"``: triton on CUDA, foreach elsewhere.
        copies: bf16 / fp16 tensors that receive the new values of the first ``len(copies)``
            teacher tensors (rounded to nearest even).
        cache: launch-plan cache handed to the Triton kernel (see
            :func:`dino_fast.kernels.ema.multi_tensor_ema_`).
    """
    if impl not in IMPLS:
        raise ValueError(f"update_teacher_: impl must be one of {IMPLS}, got {impl!r}")
    _update_local_(_local_list(teacher_params), _local_list(student_params), momentum, impl, cache, copies)


def _update_local_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float | torch.Tensor,
                   impl: str, cache: dict | None, copies: Sequence[torch.Tensor] = ()) -> None:
    """update_teacher_ on plain (local) tensors."""
    if len(teacher) != len(student):
        raise ValueError(f"update_teacher_: {len(teacher)} teacher tensors but {len(student)} student tensors")
    if not teacher:
        return
    device = teacher[0].device
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and ops.has_triton() else "foreach"
    with torch.no_grad():
        if impl == "triton":
            if not ops.triton_usable(device):
                raise RuntimeError(f"update_teacher_: impl='triton' cannot run on {device} here (no triton, or CPU "
                                   f"without TRITON_INTERPRET=1); use impl='foreach'")
            ops.multi_tensor_ema_(teacher, student, momentum, copies=copies, cache=cache)
        else:
            _foreach_ema_(teacher, student, momentum, copies)


def canonical_name(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":  # DistributedDataParallel
        parts = parts[1:]
    return ".".join(parts)


def _triton_supports(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> str | None:
    """Why the Triton kernel cannot take these lists, or None when it can."""
    devices = {t.device for t in teacher} | {s.device for s in student}
    if len(devices) != 1:
        return f"parameters on several devices {sorted(map(str, devices))}"
    for t, s in zip(teacher, student):
        if t.dtype != torch.float32:
            return f"a teacher tensor is {t.dtype} (kernel needs float32)"
        if s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"a student tensor is {s.dtype}"
        if not (t.is_contiguous() and s.is_contiguous()):
            return "a non-contiguous tensor"
    return None


class TeacherEMA:
    """The teacher EMA of one (student, teacher) module pair.

    Pairs parameters by name once (wrapper prefixes such as DDP's ``module.`` or
    ``torch.compile``'s ``_orig_mod.`` ignored), caches the local tensors and the Triton launch
    plan, then ``step(momentum)`` updates every teacher parameter. Buffers are not averaged: a
    ViT + DINO head has no running statistics (no batch norm), and the official code averages
    parameters only.

    ``compute_dtype`` bf16 / fp16 (the run's autocast dtype; not with sharded parameters, whose
    FSDP all-gather already casts): :attr:`forward_teacher` is a copy of the teacher module whose
    directly-cast parameters (linears, convolutions, dtype-keeping LayerNorms: see
    :func:`compute_copy`) are tensors of that dtype, written by every ``step`` with the new
    teacher values rounded to nearest even, the rest the teacher's own fp32 parameters. Under
    autocast it gives the teacher's outputs bit for bit. Loading a state dict into the teacher
    refreshes the copy (a load hook); :meth:`sync_copy` does it by hand.

    Call :meth:`refresh` if parameters are replaced (re-sharding, ``module.to_empty``...):
    the cached local tensors would otherwise point at the old storage.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, impl: str = "auto",
                 compute_dtype: torch.dtype | None = None) -> None:
        if impl not in IMPLS:
            raise ValueError(f"TeacherEMA: impl must be one of {IMPLS}, got {impl!r}")
        if student is teacher:
            raise ValueError("TeacherEMA: student and teacher are the same module")
        self.student, self.teacher = student, teacher
        self._requested_impl = impl
        self._copy_dtype = compute_dtype if compute_dtype in _HALF else None
        self._plans: dict = {}
        self.refresh()
        ref = weakref.ref(self)  # the hook must not keep this object alive
        self._load_hook = teacher.register_load_state_dict_post_hook(
            lambda module, keys: None if ref() is None else ref().sync_copy())

    @property
    def forward_teacher(self) -> nn.Module:
        """The module the teacher's forward runs on: the compute-dtype copy, or the teacher."""
        return self._forward_teacher

    def refresh(self) -> None:
        """(Re)pair the parameters, re-read their local shards, rebuild the compute-dtype copy and
        re-pick the implementation."""
        s_named = {canonical_name(n): p for n, p in self.student.named_parameters()}
        t_named = {canonical_name(n): p for n, p in self.teacher.named_parameters()}
        only_s = sorted(s_named.keys() - t_named.keys())
        only_t = sorted(t_named.keys() - s_named.keys())
        names = [n for n in s_named if n in t_named]
        shape = [f"{n}: student {tuple(s_named[n].shape)} vs teacher {tuple(t_named[n].shape)}"
                 for n in names if s_named[n].shape != t_named[n].shape]
        if only_s or only_t or shape:
            raise ValueError("TeacherEMA: student and teacher parameters do not match: "
                             f"only in student {only_s}; only in teacher {only_t}; shapes differ {shape}")
        self._forward_teacher, copies = self.teacher, {}
        sharded = _dtensor_type() is not None and any(isinstance(p, _dtensor_type()) for p in t_named.values())
        if self._copy_dtype is not None and not sharded:
            self._forward_teacher, copies = compute_copy(self.teacher, self._copy_dtype)
        names = [n for n in names if n in copies] + [n for n in names if n not in copies]  # copied ones first
        self.names = names
        self._student_local = _local_list(s_named[n] for n in names)
        self._teacher_local = _local_list(t_named[n] for n in names)
        self._copies = [copies[n] for n in names if n in copies]
        local_shape = [f"{n}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
                       for n, s, t in zip(names, self._student_local, self._teacher_local) if s.shape != t.shape]
        if local_shape:
            raise ValueError(f"TeacherEMA: local shards differ (student and teacher sharded differently?): {local_shape}")
        self._plans.clear()
        self.impl = self._pick_impl()

    def sync_copy(self) -> None:
        """Write the compute-dtype copy from the fp32 teacher (after a load; ``step`` keeps it in step)."""
        if self._copies:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, self._teacher_local[:len(self._copies)])

    def _pick_impl(self) -> str:
        impl = self._requested_impl
        if impl != "auto" or not self._teacher_local:
            return "foreach" if impl == "auto" else impl
        device = self._teacher_local[0].device
        if device.type != "cuda" or not ops.has_triton():
            return "foreach"
        why_not = _triton_supports(self._teacher_local, self._student_local)
        if why_not:
            log.info("TeacherEMA: using the foreach path: %s", why_not)
            return "foreach"
        return "triton"

    def step(self, momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, every parameter (and the copy)."""
        _update_local_(self._teacher_local, self._student_local, momentum, self.impl, self._plans, self._copies)


def _casts_directly(module: nn.Module) -> bool:
    """Whether autocast casts this module's parameters to the compute dtype as they are, so that a
    rounded copy gives the same values: linears, convolutions, and a LayerNorm that keeps a half
    stream's dtype (``models.layers.LayerNorm(keep_dtype=True)``). Not: a weight-normed layer
    (its weight is computed in fp32 first), tokens and position embeddings (interpolated or added
    before a cast), batch norm (autocast runs it in fp32)."""
    return (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            or (isinstance(module, nn.LayerNorm) and getattr(module, "keep_dtype", False)))


def compute_copy(teacher: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``teacher`` for its forward under ``dtype`` autocast, and its ``dtype`` tensors by
    canonical parameter name. The copy shares every other parameter and every buffer with
    ``teacher`` (no memory, always current); a compiled teacher gets a compiled copy (its own
    graph; the teacher's is then never run)."""
    keep = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}
    compiled = teacher.__dict__.get("_compiled_call_impl")
    for attr in (compiled, teacher.__dict__.get("forward_train")):  # bound to the teacher: not copied
        if attr is not None:
            keep[id(attr)] = None
    clone = copy.deepcopy(teacher, keep)
    clone.__dict__.pop("forward_train", None)
    copies: dict[str, torch.Tensor] = {}
    for prefix, module in clone.named_modules():
        if not _casts_directly(module):
            continue
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = copies[canonical_name(f"{prefix}.{name}" if prefix else name)] = \
                    nn.Parameter(p.detach().to(dtype), requires_grad=False)
    if compiled is not None:
        clone.compile()
    return clone, copies
