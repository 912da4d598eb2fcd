"""Teacher EMA: theta_t <- m * theta_t + (1 - m) * theta_s over every parameter, after each
optimizer step (DINO step 6).

Two implementations of the same update:

- ``"triton"``: one launch over the whole list (:func:`dino_fast.ops.multi_tensor_ema_`);
  the momentum may be a device tensor, read on the device.
- ``"foreach"``: ``torch._foreach_lerp_`` (or ``_foreach_mul_`` + ``_foreach_add_`` when the
  momentum is a tensor, since ``_foreach_lerp_`` would turn a tensor weight into a host scalar).

FSDP2 (DTensor) parameters are updated through their local shards: the update is elementwise
and student and teacher are sharded alike, so no gather is needed.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn

from dino_fast import ops

__all__ = ["update_teacher_", "TeacherEMA", "IMPLS"]

log = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "foreach")

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


def _foreach_ema_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float | torch.Tensor) -> None:
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
        m = momentum.reshape(())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - m))
    else:
        torch._foreach_lerp_(teacher, student, 1.0 - float(momentum))


def update_teacher_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
                    momentum: float | torch.Tensor, impl: str = "auto", *, cache: dict | None = None) -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, pair by pair.

    Args:
        teacher_params, student_params: tensors, parameters or DTensors (their local shards are
            updated), paired by position.
        momentum: a float, or a 1-element tensor on the parameters' device (no host sync).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"foreach"``, or
            ``"auto"``: triton on CUDA, foreach elsewhere.
        cache: launch-plan cache handed to the Triton kernel (see
            :func:`dino_fast.kernels.ema.multi_tensor_ema_`).
    """
    if impl not in IMPLS:
        raise ValueError(f"update_teacher_: impl must be one of {IMPLS}, got {impl!r}")
    _update_local_(_local_list(teacher_params), _local_list(student_params), momentum, impl, cache)


def _update_local_(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float | torch.Tensor,
                   impl: str, cache: dict | None) -> None:
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
            ops.multi_tensor_ema_(teacher, student, momentum, cache=cache)
        else:
            _foreach_ema_(teacher, student, momentum)


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

    Call :meth:`refresh` if parameters are replaced (re-sharding, ``module.to_empty``...):
    the cached local tensors would otherwise point at the old storage.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, impl: str = "auto") -> None:
        if impl not in IMPLS:
            raise ValueError(f"TeacherEMA: impl must be one of {IMPLS}, got {impl!r}")
        if student is teacher:
            raise ValueError("TeacherEMA: student and teacher are the same module")
        self.student, self.teacher = student, teacher
        self._requested_impl = impl
        self._plans: dict = {}
        self.refresh()

    def refresh(self) -> None:
        """(Re)pair the parameters, re-read their local shards and re-pick the implementation."""
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
        self.names = names
        self._student_local = _local_list(s_named[n] for n in names)
        self._teacher_local = _local_list(t_named[n] for n in names)
        local_shape = [f"{n}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
                       for n, s, t in zip(names, self._student_local, self._teacher_local) if s.shape != t.shape]
        if local_shape:
            raise ValueError(f"TeacherEMA: local shards differ (student and teacher sharded differently?): {local_shape}")
        self._plans.clear()
        self.impl = self._pick_impl()

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
        """teacher <- momentum * teacher + (1 - momentum) * student, every parameter."""
        _update_local_(self._teacher_local, self._student_local, momentum, self.impl, self._plans)
