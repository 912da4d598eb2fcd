"""Teacher EMA over a whole parameter list in one Triton launch.

For every pair (teacher tensor T_i, student tensor S_i), in place::

    T_i <- m * T_i + (1 - m) * S_i          (official DINO: mul_(m).add_((1 - m) * S))
    C_i <- T_i.to(C dtype)                  (optional: the first len(copies) tensors)

Teacher fp32, student fp32 / bf16 / fp16, math in fp32. The optional copies C_i are the new
teacher values in the compute dtype (bf16 / fp16, round to nearest even, as ``Tensor.to``):
the teacher's forward reads them instead of casting its fp32 weights every step. Bytes floor
per element: read T (4 B) + read S (4 B fp32, 2 B bf16/fp16), write T (4 B) = 12 B (fp32
student) or 10 B (half student), + 2 B written per element with a copy; nothing else touches
memory except a per-chunk row of the launch table.

Design: the lists are cut into chunks of at most ``chunk`` elements; one row per chunk
(teacher address, student address, length[, copy address or 0]) goes into an int64 device table built once per
parameter list and cached (keyed on data_ptr, numel, dtype and contiguity of every tensor,
so a cached plan is valid whenever its key matches). One program per chunk casts the
addresses back to pointers. Tensors are grouped by student dtype and by 16-byte alignment
(the alignment hint lets the compiler emit 128-bit accesses): one launch per group, i.e.
one launch for a usual parameter list (all fp32 or all bf16 students, allocator-aligned).

The momentum is either a Python number (a kernel scalar argument: no recompilation when
it changes) or a 1-element device tensor read inside the kernel (no host sync, CUDA-graph
friendly).
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["multi_tensor_ema_", "multi_tensor_ema_reference_", "build_ema_plan", "EMAPlan",
           "DEFAULT_CHUNK", "DEFAULT_BLOCK"]

# Elements per program (chunk) and per loop step (block). Untuned defaults: the benchmark
# (bench/bench_ema.py --chunk/--block) is where they get measured.
DEFAULT_CHUNK = 16384
DEFAULT_BLOCK = 1024
_NUM_WARPS = 4
_ALIGN_BYTES = 16
# Plans cached by multi_tensor_ema_ when the caller passes no cache of its own. Bounded, and
# holding only small int64 tables (no parameter memory); a plan is used only when its full
# key matches, so a stale entry can never be applied to the wrong tensors.
_MAX_PLANS = 8
_DEFAULT_PLANS: dict = {}

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_COPY_DTYPES = (torch.bfloat16, torch.float16)


def multi_tensor_ema_reference_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                                momentum: float | torch.Tensor, copies: Sequence[torch.Tensor] = ()) -> None:
    """Plain-torch per-tensor loop, the official DINO form: T.mul_(m).add_((1 - m) * S); then
    ``copies[i].copy_(T[i])`` for the first ``len(copies)`` tensors.

    Traffic per element: read T, read S, write T (plus a temporary for (1 - m) * S)."""
    with torch.no_grad():
        for t, s in zip(teacher, student, strict=True):
            t.mul_(momentum).add_((1 - momentum) * s.to(t.dtype))
        for c, t in zip(copies, teacher):
            c.copy_(t)  # round to nearest even


@triton.jit
def _to_copy_dtype(x, C_DTYPE: tl.constexpr):
    """fp32 -> the copies' dtype, rounded to nearest even as ``Tensor.to`` does. bf16 by integer
    rounding of the fp32 bits (the same instructions compiled and interpreted: Triton's
    interpreter truncates a plain fp32 -> bf16 cast); fp16 by the cast (RNE in both)."""
    if C_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))  # + half an ulp of bf16, ties to the even one
        hi = tl.where(x != x, 0x7FC0, bits >> 16)  # NaN stays a (quiet) NaN
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(C_DTYPE)


@triton.jit
def _ema_kernel(
    Table_ptr,        # (n_chunks, 3 + HAS_COPY) int64: teacher address, student address, chunk length[, copy address]
    M_ptr,            # momentum tensor (read when M_FROM_PTR), else unused
    m_value,          # momentum scalar (used when not M_FROM_PTR)
    S_DTYPE: tl.constexpr,
    M_FROM_PTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    # last and defaulted, so a launch without the copy reads as it did before the copy existed
    # (the shared ahead-of-time compile tool launches it that way)
    C_DTYPE: tl.constexpr = tl.bfloat16,  # dtype of the copies (unused without HAS_COPY)
    HAS_COPY: tl.constexpr = False,
):
    # 1. this program's chunk: addresses are int64 in the table, cast back to typed pointers
    pid = tl.program_id(0).to(tl.int64)
    row = Table_ptr + pid * (3 + HAS_COPY)
    t_addr = tl.load(row)
    s_addr = tl.load(row + 1)
    n = tl.load(row + 2)
    t_ptr = t_addr.to(tl.pointer_type(tl.float32))
    s_ptr = s_addr.to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        # the host checked every address of this launch is 16-byte aligned; the hint goes on
        # the pointers (a hint on the int64 address does not survive the cast)
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if HAS_COPY:
        c_addr = tl.load(row + 3)  # 0: this tensor has no copy
        c_ptr = c_addr.to(tl.pointer_type(C_DTYPE))
        if ALIGNED:
            c_ptr = tl.multiple_of(c_ptr, 16)
    # 2. momentum, in fp32
    if M_FROM_PTR:
        m = tl.load(M_ptr).to(tl.float32)
    else:
        m = m_value  # an fp32 kernel argument
    w = 1.0 - m
    # 3. stream the chunk: read T and S, write T (and its copy, rounded to nearest even); fp32
    #    math. Whole blocks go unmasked so the compiler can vectorize them (a mask against a
    #    length loaded from memory cannot be proven constant over a vector); only the last
    #    partial block is masked.
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        t = tl.load(t_ptr + offs)
        s = tl.load(s_ptr + offs).to(tl.float32)
        new = t * m + s * w
        tl.store(t_ptr + offs, new)
        if HAS_COPY:
            if c_addr != 0:
                tl.store(c_ptr + offs, _to_copy_dtype(new, C_DTYPE))
    if n_full < n:
        offs = n_full + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        new = t * m + s * w
        tl.store(t_ptr + offs, new, mask=mask)
        if HAS_COPY:
            if c_addr != 0:
                tl.store(c_ptr + offs, _to_copy_dtype(new, C_DTYPE), mask=mask)


class EMAPlan:
    """Launch plan for one (teacher, student[, copies]) list triple: per-group chunk tables on the device.

    ``groups``: list of (student torch dtype, aligned, table) with table (n_chunks, 3) int64, or
    (n_chunks, 4) with a copy address (0: none) per row when ``copy_dtype`` is set.
    ``num_launches`` = len(groups)."""

    def __init__(self, key: tuple, device: torch.device, groups: list[tuple[torch.dtype, bool, torch.Tensor]],
                 copy_dtype: torch.dtype | None = None):
        self.key = key
        self.device = device
        self.groups = groups
        self.copy_dtype = copy_dtype

    @property
    def num_launches(self) -> int:
        return len(self.groups)

    @property
    def num_chunks(self) -> int:
        return sum(int(g[2].shape[0]) for g in self.groups)


def _plan_key(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], chunk: int, block: int,
              copies: Sequence[torch.Tensor] = ()) -> tuple:
    # map() over unbound methods: this runs every step, so keep it cheap (no per-tensor Python loop).
    T = torch.Tensor
    return (chunk, block, teacher[0].device,
            tuple(map(T.data_ptr, teacher)), tuple(map(T.data_ptr, student)),
            tuple(map(T.numel, teacher)), tuple(map(T.numel, student)),
            tuple(t.dtype for t in teacher), tuple(s.dtype for s in student),
            tuple(map(T.is_contiguous, teacher)), tuple(map(T.is_contiguous, student)),
            tuple(map(T.data_ptr, copies)), tuple(map(T.numel, copies)), tuple(c.dtype for c in copies),
            tuple(map(T.is_contiguous, copies)))


def _is_dtensor(t: torch.Tensor) -> bool:
    # by name, so that this module need not import torch.distributed
    return any(c.__name__ == "DTensor" for c in type(t).__mro__)


def _check_lists(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.device:
    """Validate the pair of lists; return their device. Errors name the offending index."""
    for name, lst in (("teacher", teacher), ("student", student)):
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"multi_tensor_ema_: {name} must be a list or tuple of tensors, got {type(lst).__name__}")
    if len(teacher) != len(student):
        raise ValueError(f"multi_tensor_ema_: teacher has {len(teacher)} tensors but student has {len(student)}")
    device = teacher[0].device if teacher and isinstance(teacher[0], torch.Tensor) else None
    for i, (t, s) in enumerate(zip(teacher, student)):
        for name, x in (("teacher", t), ("student", s)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"multi_tensor_ema_: {name}[{i}] is a {type(x).__name__}, not a tensor")
            if _is_dtensor(x):
                raise TypeError(f"multi_tensor_ema_: {name}[{i}] is a DTensor; pass its local shard (.to_local())")
            if x.device != device:
                raise ValueError(f"multi_tensor_ema_: {name}[{i}] is on {x.device}, teacher[0] on {device}")
            if not x.is_contiguous():
                raise ValueError(f"multi_tensor_ema_: {name}[{i}] (shape {tuple(x.shape)}) is not contiguous")
        if t.dtype != torch.float32:
            raise TypeError(f"multi_tensor_ema_: teacher[{i}] is {t.dtype}; the teacher must be float32")
        if s.dtype not in _TL_DTYPE:
            raise TypeError(f"multi_tensor_ema_: student[{i}] is {s.dtype}; supported: float32, bfloat16, float16")
        if t.shape != s.shape:
            raise ValueError(f"multi_tensor_ema_: shape mismatch at index {i}: teacher {tuple(t.shape)} "
                             f"vs student {tuple(s.shape)}")
    return device


def _check_copies(teacher: Sequence[torch.Tensor], copies: Sequence[torch.Tensor]) -> None:
    """The copies of the first len(copies) teacher tensors: one half dtype, contiguous, same shapes and device."""
    if not isinstance(copies, (list, tuple)):
        raise TypeError(f"multi_tensor_ema_: copies must be a list or tuple of tensors, got {type(copies).__name__}")
    if len(copies) > len(teacher):
        raise ValueError(f"multi_tensor_ema_: {len(copies)} copies for {len(teacher)} teacher tensors")
    for i, (c, t) in enumerate(zip(copies, teacher)):
        if not isinstance(c, torch.Tensor) or _is_dtensor(c):
            raise TypeError(f"multi_tensor_ema_: copies[{i}] is a {type(c).__name__}, not a plain tensor")
        if c.dtype not in _COPY_DTYPES or c.dtype != copies[0].dtype:
            raise TypeError(f"multi_tensor_ema_: copies[{i}] is {c.dtype}; copies must all be bfloat16 or all float16")
        if c.shape != t.shape or c.device != t.device or not c.is_contiguous():
            raise ValueError(f"multi_tensor_ema_: copies[{i}] ({tuple(c.shape)} on {c.device}) must be a contiguous "
                             f"tensor of teacher[{i}]'s shape {tuple(t.shape)} on {t.device}")


def _check_device_runnable(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu":
        interpreted = type(_ema_kernel).__name__ == "InterpretedFunction"
        if not interpreted:
            raise RuntimeError("multi_tensor_ema_: CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                               "before dino_fast.kernels.ema is imported (or use the foreach path)")
        return
    raise ValueError(f"multi_tensor_ema_: unsupported device {device}; CUDA (or CPU with TRITON_INTERPRET=1)")


def build_ema_plan(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                   chunk: int = DEFAULT_CHUNK, block: int = DEFAULT_BLOCK,
                   copies: Sequence[torch.Tensor] = ()) -> EMAPlan:
    """Validate the lists and build their chunk tables (one host->device copy per group)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"multi_tensor_ema_: block must be a power of two >= 16, got {block}")
    if chunk < block or chunk % block:
        raise ValueError(f"multi_tensor_ema_: chunk must be a positive multiple of block={block}, got {chunk}")
    device = _check_lists(teacher, student)
    if device is None:
        raise ValueError("multi_tensor_ema_: empty tensor lists have no plan")
    _check_copies(teacher, copies)
    _check_device_runnable(device)
    rows: dict[tuple[torch.dtype, bool], list[list[int]]] = {}
    c_addrs = [c.data_ptr() for c in copies] + [0] * (len(teacher) - len(copies))  # 0: no copy
    for t, s, c_addr in zip(teacher, student, c_addrs):
        n = t.numel()
        if n == 0:
            continue
        t_addr, s_addr, s_size = t.data_ptr(), s.data_ptr(), s.element_size()
        # chunk is a multiple of 16 elements, so chunk starts keep the tensor's alignment
        aligned = t_addr % _ALIGN_BYTES == 0 and s_addr % _ALIGN_BYTES == 0 and c_addr % _ALIGN_BYTES == 0
        group = rows.setdefault((s.dtype, aligned), [])
        for start in range(0, n, chunk):
            row = [t_addr + 4 * start, s_addr + s_size * start, min(chunk, n - start)]
            group.append(row + [c_addr and c_addr + 2 * start] if copies else row)
    groups = [(dtype, aligned, torch.tensor(r, dtype=torch.int64).to(device))
              for (dtype, aligned), r in rows.items()]
    return EMAPlan(_plan_key(teacher, student, chunk, block, copies), device, groups,
                   copies[0].dtype if copies else None)


def _launch(plan: EMAPlan, m_ptr: torch.Tensor | None, m_value: float, block: int) -> None:
    """One launch per (student dtype, alignment) group of ``plan``; the momentum from ``m_ptr`` when given."""
    c_dtype = _TL_DTYPE[plan.copy_dtype or torch.bfloat16]
    for s_dtype, aligned, table in plan.groups:
        _ema_kernel[(table.shape[0],)](
            table, table if m_ptr is None else m_ptr, m_value,
            S_DTYPE=_TL_DTYPE[s_dtype], C_DTYPE=c_dtype, HAS_COPY=plan.copy_dtype is not None,
            M_FROM_PTR=m_ptr is not None, ALIGNED=aligned, BLOCK=block, num_warps=_NUM_WARPS,
        )


def _ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], m_ptr: torch.Tensor | None,
          m_value: float, chunk: int, block: int, plans: dict, copies: Sequence[torch.Tensor] = ()) -> None:
    """The update with the launch plan of these lists from ``plans`` (built and kept there on a miss)."""
    try:
        key = _plan_key(teacher, student, chunk, block, copies)
    except (TypeError, RuntimeError):
        _check_lists(teacher, student)  # a non-tensor or a DTensor: say which one
        _check_copies(teacher, copies)
        raise
    plan = plans.get(key)
    if plan is None:
        plan = build_ema_plan(teacher, student, chunk, block, copies)
        if len(plans) >= _MAX_PLANS:
            plans.pop(next(iter(plans)))  # oldest first (dicts keep insertion order)
        plans[key] = plan
    if m_ptr is not None and m_ptr.device != plan.device:
        raise ValueError(f"multi_tensor_ema_: momentum tensor is on {m_ptr.device}, parameters on {plan.device}")
    if plan.groups:  # else every tensor is empty
        with torch.cuda.device(plan.device) if plan.device.type == "cuda" else contextlib.nullcontext():
            _launch(plan, m_ptr, m_value, block)


# The torch custom op dino_fast::ema_ (mutates the teacher and copies lists; a fake implementation
# that only checks the lists), so that torch.compile and FakeTensorMode trace through the update.
# Its launch plans live in the module-wide cache.
@torch.library.custom_op("dino_fast::ema_", mutates_args=("teacher", "copies"), schema=(
    "(Tensor(a!)[] teacher, Tensor[] student, Tensor(b!)[] copies, Tensor? momentum_tensor, float momentum, "
    "int chunk, int block) -> ()"))
def _ema_op(teacher, student, copies, momentum_tensor, momentum, chunk, block) -> None:
    _ema_(teacher, student, momentum_tensor, momentum, chunk, block, _DEFAULT_PLANS, copies)


@_ema_op.register_fake
def _(teacher, student, copies, momentum_tensor, momentum, chunk, block) -> None:
    device = _check_lists(teacher, student)
    _check_copies(teacher, copies)
    if momentum_tensor is not None and momentum_tensor.device != device:
        raise ValueError(f"multi_tensor_ema_: momentum tensor is on {momentum_tensor.device}, parameters on {device}")


def _traced(t: torch.Tensor) -> bool:
    """Under torch.compile or FakeTensorMode: no addresses to build a plan from, the op's turn."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def multi_tensor_ema_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                      momentum: float | torch.Tensor, *, copies: Sequence[torch.Tensor] = (), cache: dict | None = None,
                      chunk: int = DEFAULT_CHUNK, block: int = DEFAULT_BLOCK) -> None:
    """In place, for every i: teacher[i] <- m * teacher[i] + (1 - m) * student[i]; and for
    i < len(copies): copies[i] <- teacher[i] (new value) in the copies' dtype.

    Args:
        teacher: contiguous float32 tensors (plain tensors or local shards, not DTensors).
        student: contiguous tensors of the same shapes and device; float32, bfloat16 or float16.
        momentum: a Python number, or a 1-element floating tensor on the same device (read on
            the device: a momentum schedule neither recompiles nor syncs).
        copies: bfloat16 (or float16) tensors of the first ``len(copies)`` teacher shapes, written
            with the new teacher values rounded to nearest even (what ``Tensor.to`` and autocast
            give): a compute-dtype copy of the teacher, refreshed in the same pass.
        cache: dict holding launch plans keyed on the lists' data_ptr/numel/dtype/contiguity
            (at most 8 kept); defaults to a module-wide one. A plan is rebuilt only when the
            lists change. Pass your own dict to keep plans scoped to one owner (eager calls;
            under torch.compile or FakeTensorMode the op ``dino_fast::ema_`` uses the module's).
        chunk, block: elements per program and per loop step.

    Math in fp32; bytes floor per element: 12 B (fp32 student) or 10 B (bf16/fp16 student), + 2 B
    per element with a copy.
    One launch per (student dtype, 16-byte alignment) group: one for a usual parameter list.
    The teacher is written through raw pointers, so autograd version counters are not bumped
    (teacher parameters take no part in autograd in DINO).
    """
    if not isinstance(teacher, (list, tuple)) or not isinstance(student, (list, tuple)):
        _check_lists(teacher, student)  # raises the TypeError naming the argument
    if len(teacher) != len(student):
        raise ValueError(f"multi_tensor_ema_: teacher has {len(teacher)} tensors but student has {len(student)}")
    if len(teacher) == 0:
        return
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"multi_tensor_ema_: momentum tensor must be a 1-element floating tensor, "
                             f"got shape {tuple(momentum.shape)} {momentum.dtype}")
        m_ptr, m_value = momentum, 0.0
    elif isinstance(momentum, numbers.Real) and not isinstance(momentum, bool):
        m_ptr, m_value = None, float(momentum)
    else:
        raise TypeError(f"multi_tensor_ema_: momentum must be a float or a 1-element tensor, "
                        f"got {type(momentum).__name__}")
    if cache is not None and isinstance(teacher[0], torch.Tensor) and not _traced(teacher[0]):
        _ema_(teacher, student, m_ptr, m_value, chunk, block, cache, copies)
        return
    try:
        torch.ops.dino_fast.ema_(list(teacher), list(student), list(copies), m_ptr, m_value, chunk, block)
    except (TypeError, RuntimeError, NotImplementedError):
        _check_lists(teacher, student)  # a non-tensor or a DTensor: say which one
        _check_copies(teacher, copies)
        raise
