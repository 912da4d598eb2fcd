"""The CUDA-only APIs the engine calls, called with signatures that exist in every torch / DALI of
the supported range (torch 2.6-2.14, pyproject; DALI 2.4): the installed versions are read here;
for torch versions not installed, our call is bound against the signatures in ``VARLEN_SIGNATURES``.

Known signatures of ``torch.nn.attention.varlen.varlen_attn`` (first released in torch 2.10):
  2.10   (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
         a stored copy of torch/nn/attention/varlen.py (commit unknown; no ``scale``, as
         dino_fast/models/varlen.py says of 2.10)
  2.11   ``*, return_aux, scale, window_size`` keywords: pytorch PRs #172238 / #172245 (Jan 2026,
         before the 2.11 release) added ``window_size`` next to ``scale`` and deprecated ``is_causal``
         (../shared/preflight/2026-12-06.md; inferred, not read)
  2.12, 2.13  not read; assumed as 2.11 or 2.14 (both are bound below)
  2.14.1 (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux, scale, window_size,
         enable_gqa, seqused_k, block_table, num_splits): read from the installed torch
Our call (models/varlen.py ``varlen_attention``): 7 positionals, plus ``scale=`` only when the
signature has it (else the scale is folded into q), so it binds to each of them.
``BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, *,
BLOCK_SIZE, mask_mod, seq_lengths)``: read from 2.14.1 here; stored copies of flex_attention.py from
older trees (commits unknown, ``Optional[...]`` typing era) have the same parameters. A failure in
either would not stop a run: attention "auto" probes each backend and falls back to sdpa.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from dino_fast.models import varlen as vl

_VARLEN_PARAMS = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")
VARLEN_SIGNATURES = {
    "2.10": "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)",
    "2.11": "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
            "window_size=(-1, -1), enable_gqa=False)",
    "2.14.1": "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
              "window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None)",
}


def test_installed_varlen_signature():
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="varlen_attn needs torch >= 2.10")
    params = inspect.signature(varlen.varlen_attn).parameters
    first = list(params.values())[:7]
    assert tuple(p.name for p in first) == _VARLEN_PARAMS
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in first)
    assert vl._load_varlen()["scale"] == ("scale" in params)


@pytest.mark.parametrize("version", list(VARLEN_SIGNATURES))
def test_our_varlen_call_binds_to(version, monkeypatch):
    calls = []
    namespace: dict = {}
    exec(f"def varlen_attn{VARLEN_SIGNATURES[version]}:\n    calls.append(locals().copy())\n    return query",
         {"calls": calls}, namespace)
    stub = namespace["varlen_attn"]
    has_scale = "scale" in inspect.signature(stub).parameters
    monkeypatch.setattr(vl, "_VARLEN", {"fn": stub, "scale": has_scale, "error": None})
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = vl.varlen_attention(stub, q, k, v, cu, 5, 0.5)
    (bound,) = calls
    if has_scale:
        assert bound["scale"] == 0.5 and torch.equal(out, q)
    else:  # scale folded into q: q * 0.5 / 16 ** -0.5
        assert torch.allclose(out, q * (0.5 / 16 ** -0.5))
    assert bound["max_q"] == bound["max_k"] == 5 and bound["cu_seq_k"] is cu


def test_flex_block_mask_from_kv_blocks_runs():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    params = inspect.signature(flex.BlockMask.from_kv_blocks).parameters
    assert {"kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "BLOCK_SIZE", "mask_mod",
            "seq_lengths"} <= set(params)
    mask = vl.PackedSeqlens([197, 197, 37, 37, 37]).flex_block_mask("cpu")  # our call, on the CPU
    assert tuple(mask.seq_lengths) == (505, 505)


class _Recorder:
    """Stands in for ``nvidia.dali.fn``: records each op call (dotted name, keyword arguments)."""

    def __init__(self, calls: list, path: str = "") -> None:
        self.calls, self.path = calls, path

    def __getattr__(self, name: str) -> "_Recorder":
        return _Recorder(self.calls, f"{self.path}.{name}".lstrip("."))

    def __call__(self, *inputs, **kwargs):
        self.calls.append((self.path, kwargs))
        n = kwargs.get("num_outputs")
        return [object() for _ in range(n)] if n else object()


def test_dali_gpu_graph_uses_existing_ops_and_arguments(monkeypatch):
    """The multi-crop graph as the loader builds it for the GPU (decoder "mixed", then GPU ops):
    every op is registered for that backend in the installed DALI and every argument is in its
    schema (DALI schemas are readable without a GPU)."""
    pytest.importorskip("nvidia.dali")
    import nvidia.dali as dali_pkg
    import nvidia.dali.backend as backend
    import nvidia.dali.fn as real_fn

    from dino_fast.data import dali as dali_loader

    calls: list = []
    monkeypatch.setattr(dali_loader, "fn", _Recorder(calls))
    dali_loader._multicrop_graph(source=None, sizes=(224, 224) + (96,) * 10, on_gpu=True, hw_decoder_load=0.65)
    assert calls, "the graph called no DALI op"
    device = "cpu"  # where data lives as the graph runs: the mixed decoder moves it to the GPU
    for path, kwargs in calls:
        real = real_fn
        for part in path.split("."):
            real = getattr(real, part)
        schema_name = real._schema_name
        schema = backend.GetSchema(schema_name)
        python_side = {p.name for p in inspect.signature(real).parameters.values() if p.kind is not p.VAR_KEYWORD}
        unknown = set(kwargs) - {"device", "name", "seed"} - set(schema.GetArgumentNames()) - python_side
        assert not unknown, f"DALI {dali_pkg.__version__} fn.{path} has no argument(s) {sorted(unknown)}"
        device = kwargs.get("device", "gpu" if device in ("gpu", "mixed") else "cpu")
        registered = {"cpu": backend.RegisteredCPUOps, "gpu": backend.RegisteredGPUOps,
                      "mixed": backend.RegisteredMixedOps}[device]()
        assert schema_name in registered, f"DALI {dali_pkg.__version__}: fn.{path} has no {device} operator"
    assert device == "gpu", "the GPU graph ends on the CPU"
