"""The custom kernels as torch custom ops (namespace ``dino_fast::``): ``torch.library.opcheck`` of
each op on CPU (Triton interpreter), and ``torch.compile(fullgraph=True)`` of functions calling the
public wrappers (``dino_fast.ops``): no graph break, values and gradients equal to eager.

opcheck's ``test_aot_dispatch_dynamic`` is left out for the loss ops that write a gradient: the
op returns that gradient (an intermediate its backward scales in place), and that test returns
every op output to the caller, so the in-place scale would change a value the caller holds
("Node ... was invalid, but is output"). The public wrappers never hand that output out; the
compile tests below run the same AOT dispatch through them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dino_fast import ops
from dino_fast.ema import TeacherEMA
from tests.helpers import assert_close

pytestmark = pytest.mark.skipif(not ops.triton_usable("cpu"), reason="needs Triton's interpreter on CPU")
CASES = ("dino_loss", "dino_loss probabilities", "dino_loss no grad", "dino_head_loss", "dino_head_loss no grad",
         "scale_", "ema_", "ema_ tensor momentum", "ema_ copies")

B, V, K, D = 2, 4, 300, 16
ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NO_AOT = ALL[:3]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(V * B, K, generator=g).requires_grad_()
    t = torch.randn(2 * B, K, generator=g)
    c = 0.1 * torch.randn(1, K, generator=g)
    f = F.normalize(torch.randn(V * B, D, generator=g), dim=-1).requires_grad_()
    w = torch.randn(K, D, generator=g).requires_grad_()
    return s, t, c, f, w


def _ema_lists(s_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(7, generator=g), torch.randn(3, 33, generator=g)]
    return teacher, [(x + 1).to(s_dtype) for x in teacher]


def _cases():
    ops.load_ops()
    s, t, c, f, w = _inputs()
    teacher, student = _ema_lists(torch.bfloat16)
    loss, head = torch.ops.dino_fast.dino_loss.default, torch.ops.dino_fast.dino_head_loss.default
    return {
        "dino_loss": (loss, (s, t, c, 0.1, 0.04, V, 2, True, False, None, None), NO_AOT),
        "dino_loss probabilities": (loss, (s, t.softmax(-1), None, 0.1, 1.0, V, 2, True, False, 64, 128), NO_AOT),
        "dino_loss no grad": (loss, (s.detach(), t, c, 0.1, 0.07, V, 2, False, False, None, None), ALL),
        "dino_head_loss": (head, (f, w, t, c, 0.1, 0.04, V, 2, 1, torch.float32, True, True, None, None), NO_AOT),
        "dino_head_loss no grad": (head, (f.detach(), w.detach(), t, c, 0.1, 0.04, V, 2, 2, torch.float32, False,
                                          False, None, None), ALL),
        "scale_": (torch.ops.dino_fast.scale_.default, (torch.randn(1000), torch.tensor(2.0)), ALL),
        "ema_": (torch.ops.dino_fast.ema_.default, (teacher, student, [], None, 0.9, 16384, 1024), ALL),
        "ema_ tensor momentum": (torch.ops.dino_fast.ema_.default, (*_ema_lists(torch.float32), [],
                                                                    torch.tensor([0.7]), 0.0, 128, 32), ALL),
        "ema_ copies": (torch.ops.dino_fast.ema_.default, (teacher, student, [torch.empty(7, dtype=torch.bfloat16)],
                                                           None, 0.9, 128, 32), ALL),
    }


def test_every_op_is_checked():
    assert {name.split("::")[1] for name in ops.load_ops()} == {case.split()[0] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    op, args, tests = _cases()[case]
    torch.library.opcheck(op, args, test_utils=tests)


def _losses(s, t, c, f, w):
    """Every fused loss through the one door (dino_fast.ops); 2x and 3x so that backward scales."""
    loss, col_sum = ops.fused_dino_loss(s, t, c, 0.1, 0.04, V)
    from_probs = ops.fused_dino_loss_from_probs(s, t.softmax(-1), 0.1, V)
    head, head_col_sum = ops.fused_dino_head_loss(f, w, t, c, 0.1, 0.04, V, chunk_images=1)
    return 2.0 * loss + from_probs + 3.0 * head, col_sum, head_col_sum


def test_compiled_losses_no_graph_break():
    counters.clear()
    torch._dynamo.reset()
    s, t, c, f, w = _inputs(1)
    compiled = torch.compile(_losses, fullgraph=True, backend="aot_eager")  # Dynamo + AOT autograd, no Inductor
    out = compiled(s, t, c, f, w)
    out[0].backward()
    grads = [x.grad for x in (s, f, w)]
    for x in (s, f, w):
        x.grad = None
    ref = _losses(s, t, c, f, w)
    ref[0].backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for name, a, b in zip(("loss", "teacher col sum", "head col sum"), out, ref):
        assert_close(a, b, torch.float32, name=name)
    for name, a, x in zip(("student grad", "feature grad", "weight grad"), grads, (s, f, w)):
        assert_close(a, x.grad, torch.float32, name=name)


@pytest.mark.parametrize("momentum", [0.9, "tensor"])
def test_compiled_ema_no_graph_break(momentum):
    """TeacherEMA.step (Triton EMA through dino_fast.ops) compiled: no break, the eager update."""
    counters.clear()
    torch._dynamo.reset()
    student, teacher = torch.nn.Linear(33, 7), torch.nn.Linear(33, 7)
    ema = TeacherEMA(student, teacher, impl="triton")
    m = torch.tensor([0.9]) if momentum == "tensor" else momentum
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    torch.compile(ema.step, fullgraph=True, backend="aot_eager")(m)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for got, want in zip(teacher.parameters(), expected):
        assert_close(got, want, torch.float32, name="teacher")


def test_varlen_attention_wrapper_no_graph_break():
    """models/varlen.py's ``varlen_attention`` around torch's varlen_attn (torch >= 2.10, itself the
    custom op ``torch_attn::_varlen_attn``): one graph, no break. The kernel is CUDA-only, so the
    backend only records the graph and returns empty outputs of its shapes."""
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="varlen_attn needs torch >= 2.10")
    from dino_fast.models import varlen as vl

    vl._load_varlen()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        outs = [o.meta["example_value"] for o in next(n for n in gm.graph.nodes if n.op == "output").args[0]]
        return lambda *args: [torch.empty(o.shape, dtype=o.dtype) for o in outs]

    counters.clear()
    torch._dynamo.reset()
    q, k, v = (torch.randn(234, 6, 64, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 197, 234], dtype=torch.int32)
    out = torch.compile(lambda *a: vl.varlen_attention(varlen.varlen_attn, *a, cu, 197, 0.125), fullgraph=True,
                        backend=record)(q, k, v)
    assert not counters["graph_break"] and len(graphs) == 1 and out.shape == q.shape
    assert any("_varlen_attn" in str(n.target) for n in graphs[0].graph.nodes)
