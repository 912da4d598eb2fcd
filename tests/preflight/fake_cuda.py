"""A fake CUDA device on a machine without a GPU: FakeTensorMode tensors on ``cuda:0`` and the few
``torch.cuda`` answers the training step asks for, so that the real step runs its shapes, devices
and dtypes without a kernel (DESIGN.md, "The GPU, engineered from a machine without one", layer 3).

What had to be patched, and why (torch 2.14, a CUDA build with no GPU):
- ``torch.cuda.is_available`` / ``is_bf16_supported`` / ``current_device`` / ``device_count`` /
  ``get_device_capability`` / ``get_device_properties``: an H100 (sm_90, 132 SMs). Without them
  ``torch.autocast("cuda")`` disables itself and the launchers cannot size their grids.
- ``FakeTensorMode.avoid_device_init`` held True: with ``is_available`` patched, FakeTensorMode
  would try to materialise constants on the (absent) device.
- ``Tensor.backward``: the C++ autograd engine needs a real CUDA context for CUDA tensors
  (pytorch/pytorch#92627: "hasPrimaryContext expects a valid device index"), so the backward runs
  through :func:`backward` below, a Python walk of the same autograd graph (the engine's
  accumulation, shape reduction and dtype cast per edge; no hooks: the step registers none).
- ``aten._pin_memory`` is not implemented by FakeTensorMode; pinning a host buffer is a no-op here.
- ``aten._fused_adamw_.tensor_lr`` (fused AdamW reading its lr from a tensor: the ``cuda_graphs``
  step) has no Meta kernel in torch 2.14 (the float-lr overload has one); an in-place op with no
  output, so a Meta kernel that does nothing is its fake (:func:`_meta_kernels`).
- Modules cannot be moved to a fake device (``Module._apply`` swaps fake parameters and the swap
  refuses FakeTensorMode's weak references), so :func:`to_fake_cuda_` replaces each parameter and
  buffer by a fake CUDA tensor of the same shape, dtype and ``requires_grad``.
"""
from __future__ import annotations

import contextlib
import types
from collections import Counter, defaultdict
from typing import Any, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

H100 = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3 (fake)", major=9, minor=0, multi_processor_count=132,
                             total_memory=80 << 30)
# Ops that read values on the host (a sync when their input is on the GPU). FakeTensorMode raises on
# most of them; the recorder lists every call on a CUDA tensor anyway.
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select", "unique", "_unique2", "equal"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_varlen_attn", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention"}


def backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` as a Python walk of the autograd graph (see the module docstring)."""
    order, seen, stack = [], set(), [(loss.grad_fn, False)]
    while stack:  # post-order DFS: a node comes after everything it feeds
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node is not None and node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    grads: dict[Any, dict[int, torch.Tensor]] = defaultdict(dict)
    grads[loss.grad_fn][0] = torch.ones_like(loss)
    for node in reversed(order):  # every consumer before its producers
        given = grads.pop(node, {})
        args = [given.get(i) for i in range(len(node._input_metadata))]
        out = node(*args) if callable(node) else node.apply(*args)  # C++ node, or a Python Function's
        out = out if isinstance(out, tuple) else (out,)
        edges = node.next_functions
        if len(out) != len(edges):  # a Python Function: a grad per forward input, tensor or not
            edges = [e for e in edges if e[0] is not None]  # the inputs that need a grad, in order
            out = tuple(g for g, need in zip(out, node.needs_input_grad) if need)
        for (nxt, nr), g in zip(edges, out):
            if nxt is None or g is None:
                continue
            meta = nxt._input_metadata[nr]
            g = g.sum_to_size(meta.shape) if tuple(g.shape) != tuple(meta.shape) else g
            g = g.to(meta.dtype) if g.dtype != meta.dtype else g
            grads[nxt][nr] = grads[nxt][nr] + g if nr in grads[nxt] else g


def _tensor_backward(self: torch.Tensor, gradient: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> None:
    if gradient is not None or args or kwargs:
        raise NotImplementedError("fake CUDA backward: only loss.backward() of a scalar")
    backward(self)


class StepRecorder(TorchDispatchMode):
    """Every aten / custom op of the step: counts, output dtypes, host (CPU) ops, device-to-host
    copies, data-dependent ops and matmul FLOPs by output dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.host_ops: Counter = Counter()  # every output on the CPU
        self.to_host: list[str] = []  # a CUDA input, a CPU output: a device-to-host copy (a sync)
        self.syncs: list[str] = []
        self.dtypes: dict[str, Counter] = defaultdict(Counter)
        self.matmul_flops: Counter = Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        self.ops[name] += 1
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name in SYNC_OPS and any(t.device.type == "cuda" for t in ins):
            self.syncs.append(name)
        if func is torch.ops.aten._pin_memory.default:
            return args[0].clone()
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outs and all(t.device.type == "cpu" for t in outs):
            self.host_ops[name] += 1
            if any(t.device.type == "cuda" for t in ins):
                self.to_host.append(name)
        for t in outs:
            self.dtypes[name][t.dtype] += 1
        if name in MATMULS and outs:
            self.matmul_flops[outs[0].dtype] += _flops(name, args, ins, outs[0])
        return out


def _flops(name: str, args: tuple, ins: list[torch.Tensor], out: torch.Tensor) -> int:
    """2 x multiply-adds of a matmul-like op; attention: QK^T and PV, each query against max_k keys
    (varlen: the longest sequence, an upper bound) or the whole sequence (sdpa)."""
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        return 2 * out.numel() * ins[-1].shape[-2]
    if name == "convolution":
        return 2 * out.numel() * ins[1][0].numel()
    q = ins[0]  # varlen (T, H, Dh), args (q, k, v, cu_q, cu_k, max_q, max_k, ...); sdpa (B, H, N, Dh)
    return 4 * q.numel() * (args[6] if name == "_varlen_attn" else q.shape[-2])


def to_fake_cuda_(module: nn.Module, memo: dict[int, nn.Parameter] | None = None) -> nn.Module:
    """Every parameter and buffer of ``module`` replaced by a fake CUDA tensor (same shape, dtype,
    requires_grad; shared parameters stay shared). Call inside :func:`fake_cuda`."""
    memo = {} if memo is None else memo
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cuda"),
                                               requires_grad=p.requires_grad)
                m._parameters[name] = memo[id(p)]
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cuda")
    return module


_META_LIBS: list[torch.library.Library] = []  # kept alive: a Library unregisters its kernels when collected


def _meta_kernels() -> None:
    """No-op Meta kernels for in-place ops torch leaves without one (see the module docstring)."""
    for op in ("_fused_adamw_.tensor_lr", "_fused_adam_.tensor_lr"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "Meta"):
            if not _META_LIBS:
                _META_LIBS.append(torch.library.Library("aten", "IMPL"))
            _META_LIBS[0].impl(op, lambda *args, **kwargs: None, "Meta")


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """FakeTensorMode with a fake H100 as ``cuda:0`` (see the module docstring for each patch)."""
    _meta_kernels()
    answers = {"is_available": lambda: True, "is_bf16_supported": lambda *a, **k: True, "current_device": lambda: 0,
               "device_count": lambda: 1, "get_device_capability": lambda *a, **k: (H100.major, H100.minor),
               "get_device_properties": lambda *a, **k: H100}
    saved = {k: getattr(torch.cuda, k) for k in answers}
    saved_backward, saved_avoid = torch.Tensor.backward, FakeTensorMode.__dict__["avoid_device_init"]
    try:
        for k, v in answers.items():
            setattr(torch.cuda, k, v)
        FakeTensorMode.avoid_device_init = property(lambda self: True)
        torch.Tensor.backward = _tensor_backward
        with FakeTensorMode() as mode:
            yield mode
    finally:
        for k, v in saved.items():
            setattr(torch.cuda, k, v)
        FakeTensorMode.avoid_device_init = saved_avoid
        torch.Tensor.backward = saved_backward
