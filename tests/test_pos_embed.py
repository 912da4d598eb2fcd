"""The official position-embedding resize (models/pos_embed.py) as two fixed matmuls: values and
gradients equal the official F.interpolate's at odd and non-square grids, and a ``--deterministic``
training step dispatches no op that torch lists as nondeterministic on CUDA (the bicubic
backward was one: every deterministic run with local crops raised at its first backward)."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from dino_fast.models import interpolate_pos_encoding
from dino_fast.models import pos_embed as pos_embed_mod
from tests.helpers import assert_close


# --- the reference, written from the official DINO vision_transformer.py ---------------------
def official_interpolate_pos_encoding(pos_embed: torch.Tensor, x: torch.Tensor, w: int, h: int,
                                      patch_size: int) -> torch.Tensor:
    """Official ``VisionTransformer.interpolate_pos_encoding(x, w, h)``; x: tokens incl. CLS,
    ``w, h = img.shape[2:]`` (the official code names dim 2 ``w``)."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _official(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    return official_interpolate_pos_encoding(pos, torch.empty(1, 1 + gh * gw, pos.shape[-1]), gh, gw, 1)


# (stored grid side, target grid h x w): odd, non-square, up and down, 1 x 1
GRIDS = [(14, (6, 6)), (28, (12, 12)), (14, (6, 10)), (14, (14, 3)), (5, (3, 5)), (14, (28, 28)), (7, (20, 31)),
         (2, (27, 1)), (14, (1, 1)), (13, (13, 14))]


@pytest.mark.parametrize("side,hw", GRIDS)
def test_matches_official_forward_and_backward(side, hw):
    """fp32: ATen's taps and weights, summed in another order (two matmuls instead of the
    kernel's 4 x 4 window), so equal within a few fp32 ulps of the sum of |terms|: atol 1e-5
    for unit-scale embeddings."""
    torch.manual_seed(side * 100 + hw[0] * 7 + hw[1])
    pos = torch.randn(1, 1 + side * side, 24, requires_grad=True)
    out, expected = interpolate_pos_encoding(pos, *hw), _official(pos, *hw)
    assert_close(out, expected, name=f"pos_embed {side}->{hw}", rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 0], pos[:, 0])
    g = torch.randn_like(out)
    grad, grad_ref = (torch.autograd.grad(o, pos, g)[0] for o in (out, expected))
    assert_close(grad, grad_ref, name=f"pos_embed grad {side}->{hw}", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side,hw", GRIDS[:5])
def test_fp64_is_the_kernel_to_rounding(side, hw):
    """In fp64 the summation order no longer shows: the same taps and weights as ATen's kernel."""
    torch.manual_seed(side + hw[0])
    pos = torch.randn(1, 1 + side * side, 5, dtype=torch.float64)
    assert_close(interpolate_pos_encoding(pos, *hw), _official(pos, *hw), rtol=1e-12, atol=1e-12, name="fp64")


def test_identity_and_errors():
    pos = torch.randn(1, 1 + 49, 8)
    assert interpolate_pos_encoding(pos, 7, 7) is pos
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_encoding(torch.randn(1, 1 + 48, 8), 6, 8)
    with pytest.raises(ValueError, match=r"\(1, 1 \+ N, D\)"):
        interpolate_pos_encoding(torch.randn(50, 8), 7, 7)
    with pytest.raises(ValueError, match="at least"):
        interpolate_pos_encoding(pos, 0, 3)


def test_matrix_built_once_and_never_a_fake_or_inference_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (11, 10, torch.device("cpu"), torch.float32)
    pos_embed_mod._MATRICES.pop(key, None)
    with FakeTensorMode():  # a fake trace of the step builds fakes: never kept for real calls
        interpolate_pos_encoding(torch.empty(1, 1 + 121, 4), 10, 10)
    assert key not in pos_embed_mod._MATRICES
    pos = torch.randn(1, 1 + 121, 4, requires_grad=True)
    with torch.inference_mode():  # an evaluation builds it first...
        first = pos_embed_mod.resize_matrix(11, 10, "cpu", torch.float32)
    assert not first.is_inference() and pos_embed_mod.resize_matrix(11, 10, "cpu", torch.float32) is first
    interpolate_pos_encoding(pos, 10, 10).sum().backward()  # ...and training saves it for backward
    assert pos.grad is not None


# --- a --deterministic step dispatches no CUDA-nondeterministic op ----------------------------
def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def cuda_nondeterministic_ops(doc: str | None = None) -> list[tuple[str, bool, bool]]:
    """(aten name prefix, backward only, quantized input only) of every op that
    ``torch.use_deterministic_algorithms``'s docstring says throws a RuntimeError under
    ``mode=True``, parsed from the installed torch (so the list follows torch's own).

    ``:class:`torch.nn.AvgPool3d` when attempting to differentiate`` -> ("avg_pool3d", True,
    False); ``:func:`torch.nn.functional.interpolate`` ... ``bicubic`` -> ("upsample_bicubic",
    True, False); ``:func:`torch.Tensor.put_``` -> ("put", False, False)."""
    doc = torch.use_deterministic_algorithms.__doc__ if doc is None else doc
    marker = re.search(r"will throw a\s+:class:`RuntimeError`\s+when\s+``mode=True``:", doc)
    assert marker, "torch.use_deterministic_algorithms.__doc__ no longer lists the ops that throw"
    entries: list[list[str]] = []
    bullet_indent = None
    for line in doc[marker.end():].splitlines()[1:]:
        text = line.strip()
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        if text.startswith("* "):
            bullet_indent = indent
            entries.append([text[2:]])
        elif bullet_indent is not None and indent > bullet_indent:
            entries[-1].append(text)  # continuation line or a "- ``mode``" sub-bullet
        elif bullet_indent is not None:
            break  # the paragraph after the list
    ops = []
    for entry in entries:
        text = " ".join(entry)
        found = re.match(r":(class|func):`~?([\w.]+)`", text)
        assert found, f"unparsed entry: {text!r}"
        kind, name = found.group(1), found.group(2).rsplit(".", 1)[-1]
        backward, quantized = "differentiate" in text, "quantized" in text
        if name == "interpolate":  # one aten op per mode: upsample_{linear1d, bilinear2d, bicubic2d, ...}
            stems = [f"upsample_{mode}" for mode in re.findall(r"- ``(\w+)``", text)]
        else:
            stems = [_snake(name) if kind == "class" else name.rstrip("_")]
        ops += [(stem, backward, quantized) for stem in stems]
    return ops


class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched inside the context (forward and backward): (name, quantized input)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[tuple[str, bool]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        quantized = any(isinstance(a, torch.Tensor) and a.is_quantized for a in [*args, *kwargs.values()])
        self.ops.add((func._schema.name.split("::")[-1], quantized))
        return func(*args, **kwargs)

    def flagged(self) -> list[str]:
        """The recorded ops torch lists as nondeterministic on CUDA."""
        listed = cuda_nondeterministic_ops()
        return sorted({name for name, quantized in self.ops for stem, backward, only_quantized in listed
                       if name.lstrip("_").startswith(stem) and (not backward or "backward" in name)
                       and (quantized or not only_quantized)})


def test_the_list_is_parsed_and_catches_the_bicubic_backward():
    ops = cuda_nondeterministic_ops()
    assert ("upsample_bicubic", True, False) in ops and ("avg_pool3d", True, False) in ops
    assert ("nll_loss", False, False) in ops and ("put", False, False) in ops and len(ops) >= 20
    rec = OpRecorder()
    grid = torch.randn(1, 4, 5, 5, requires_grad=True)
    with rec:  # the resize this project used before: F.interpolate, bicubic, differentiated
        nn.functional.interpolate(grid, scale_factor=(1.42, 0.62), mode="bicubic").sum().backward()
    assert rec.flagged() == ["upsample_bicubic2d_backward"]


def test_deterministic_step_dispatches_no_cuda_nondeterministic_op(demo_root, tmp_path):
    """One ``--deterministic`` training step of a tiny ViT with local crops (16 px on a 32-px
    grid: the pos-embed is resized and differentiated), every aten op recorded on CPU: none is
    on torch's list of ops that raise under ``use_deterministic_algorithms(True)`` on CUDA."""
    from dino_fast.train import Trainer
    from tests.test_train import tiny_cfg

    before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(tiny_cfg(demo_root, tmp_path, deterministic=True, max_steps=1))
        views = next(iter(trainer.data.epoch(0)))
        assert {v.shape[-1] for v in views} == {32, 16}  # global and local crops
        rec = OpRecorder()
        with rec:
            trainer.train_step(views)
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False
    assert any("backward" in name for name, _ in rec.ops) and len(rec.ops) > 50  # it saw the whole step
    assert rec.flagged() == [], f"ops torch refuses under --deterministic on CUDA: {rec.flagged()}"
