"""Teacher EMA: the Triton multi-tensor kernel, the foreach path and TeacherEMA against the
per-tensor loop reference (kernels/ema.py: multi_tensor_ema_reference_)."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from dino_fast import ops
from dino_fast.ema import TeacherEMA, update_teacher_
from dino_fast.kernels.ema import build_ema_plan, multi_tensor_ema_, multi_tensor_ema_reference_
from tests.helpers import assert_close, requires_cuda

SHAPES = [(1,), (7,), (4097,), (2, 33), (3, 37, 41), (64, 24)]
# Around the block (32) and chunk (128) edges of the small-tile configuration, plus empty tensors.
EDGE_SHAPES = [(31,), (32,), (33,), (0,), (127,), (128,), (129,), (2, 0), (300,), (5, 7, 11)]
MOMENTA = [0.0, 0.5, 0.996, 1.0]
HALF = [torch.bfloat16, torch.float16]


def _pairs(shapes, s_dtype: torch.dtype, device: torch.device, seed: int):
    """Teacher (fp32) and student lists with |student - teacher| >= 1 everywhere, so that every
    element a kernel fails to write is caught (for m < 1 every element must change)."""
    g = torch.Generator().manual_seed(seed)
    teacher, student = [], []
    for shape in shapes:
        t = torch.randn(shape, generator=g)
        gap = (1 + torch.rand(shape, generator=g)) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        teacher.append(t.to(device))
        student.append((t + gap).to(s_dtype).to(device))
    return teacher, student


def _momentum(m: float, kind: str, device: torch.device) -> float | torch.Tensor:
    return m if kind == "float" else torch.tensor(m, dtype=torch.float32, device=device)


def _check_update(new, old, student, m: float, name: str) -> None:
    """new == reference(old, student, m); exact at m = 0 / 1; every element changed when m < 1."""
    expected = [t.clone() for t in old]
    multi_tensor_ema_reference_(expected, student, m)
    for i, (a, e, o, s) in enumerate(zip(new, expected, old, student)):
        if a.numel() == 0:
            continue
        if m == 0.0:
            assert torch.equal(a, s.float()), f"{name}[{i}]: m=0 must copy the student exactly"
        elif m == 1.0:
            assert torch.equal(a, o), f"{name}[{i}]: m=1 must leave the teacher unchanged"
        else:
            assert_close(a, e, dtype=torch.float32, name=f"{name}[{i}] m={m}")
        if m < 1.0:
            assert bool((a != o).all()), f"{name}[{i}]: {int((a == o).sum())} elements left unwritten"


@pytest.mark.parametrize("s_dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("m", MOMENTA)
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_kernel_matches_reference(device, s_dtype, m, kind):
    teacher, student = _pairs(SHAPES, s_dtype, device, seed=zlib.crc32(f"{s_dtype}-{m}-{kind}".encode()))
    old = [t.clone() for t in teacher]
    multi_tensor_ema_(teacher, student, _momentum(m, kind, device), cache={})
    _check_update(teacher, old, student, m, "teacher")


@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_kernel_chunk_and_block_edges(device, s_dtype):
    teacher, student = _pairs(EDGE_SHAPES, s_dtype, device, seed=7)
    old = [t.clone() for t in teacher]
    cache: dict = {}
    multi_tensor_ema_(teacher, student, 0.75, cache=cache, chunk=128, block=32)
    (plan,) = cache.values()
    # one row per chunk: ceil(numel / 128), empty tensors skipped
    assert plan.num_chunks == sum(-(-t.numel() // 128) for t in teacher)
    _check_update(teacher, old, student, 0.75, "teacher")


def test_kernel_large_tensor(device):
    """A (3, 384, 384) tensor spans many chunks of the default tiling."""
    teacher, student = _pairs([(3, 384, 384), (384,)], torch.float32, device, seed=11)
    old = [t.clone() for t in teacher]
    cache: dict = {}
    multi_tensor_ema_(teacher, student, 0.996, cache=cache)
    assert next(iter(cache.values())).num_launches == 1
    _check_update(teacher, old, student, 0.996, "teacher")


def test_kernel_mixed_dtypes_and_misaligned(device):
    """Student dtypes mixed and addresses off the 16-byte grid: one launch per group, all correct."""
    g = torch.Generator().manual_seed(3)
    t_buf = torch.randn(1000, generator=g).to(device)
    s_buf = (t_buf + 1.5).to(torch.bfloat16)
    teacher = [t_buf[1:8], t_buf[9:42], torch.randn(50, generator=g).to(device), torch.randn(65, generator=g).to(device)]
    student = [s_buf[1:8], (t_buf[9:42] - 1.25), (teacher[2] + 2).to(torch.float16), teacher[3] - 3]
    old = [t.clone() for t in teacher]
    cache: dict = {}
    multi_tensor_ema_(teacher, student, 0.5, cache=cache)
    plan = next(iter(cache.values()))
    groups = {(dtype, aligned) for dtype, aligned, _ in plan.groups}
    assert groups == {(torch.bfloat16, False), (torch.float32, False), (torch.float16, True), (torch.float32, True)}
    assert plan.num_launches == 4
    _check_update(teacher, old, student, 0.5, "teacher")


def test_plan_cache_reused_and_rebuilt(device):
    teacher, student = _pairs([(5,), (17, 3)], torch.float32, device, seed=5)
    cache: dict = {}
    expected = [t.clone() for t in teacher]
    multi_tensor_ema_(teacher, student, 0.9, cache=cache)
    (plan,) = cache.values()
    multi_tensor_ema_(teacher, student, 0.8, cache=cache)
    assert list(cache.values()) == [plan], "same lists must reuse the cached plan"
    multi_tensor_ema_reference_(expected, student, 0.9)
    multi_tensor_ema_reference_(expected, student, 0.8)
    for i, (a, e) in enumerate(zip(teacher, expected)):
        assert_close(a, e, name=f"twice[{i}]")
    # a new tensor in the list (new address) and a longer list: new plans, still correct
    for teacher2, student2 in (
        ([teacher[0], torch.randn(17, 3).to(device)], student),
        (teacher + [torch.randn(9).to(device)], student + [torch.randn(9).to(device)]),
    ):
        before = len(cache)
        old = [t.clone() for t in teacher2]
        multi_tensor_ema_(teacher2, student2, 0.3, cache=cache)
        assert len(cache) == before + 1, "a changed list must build a new plan"
        _check_update(teacher2, old, student2, 0.3, "rebuilt")
    # bounded: old plans are evicted
    for k in range(10):
        multi_tensor_ema_([torch.zeros(k + 1, device=device)], [torch.ones(k + 1, device=device)], 0.5, cache=cache)
    assert len(cache) <= 8


def test_momentum_tensor_changes_without_rebuild(device):
    teacher, student = _pairs([(33,), (4, 5)], torch.bfloat16, device, seed=9)
    m = torch.tensor(0.9, device=device)
    cache: dict = {}
    expected = [t.clone() for t in teacher]
    for value in (0.9, 0.25, 1.0):
        m.fill_(value)  # a schedule writes the device tensor; no host value reaches the kernel
        multi_tensor_ema_(teacher, student, m, cache=cache)
        multi_tensor_ema_reference_(expected, student, value)
    assert len(cache) == 1
    for i, (a, e) in enumerate(zip(teacher, expected)):
        assert_close(a, e, dtype=torch.float32, name=f"schedule[{i}]")
    # a 1-element (not 0-d) tensor and an int are accepted too
    multi_tensor_ema_(teacher, student, torch.ones(1, device=device), cache=cache)
    multi_tensor_ema_(teacher, student, 1, cache=cache)
    for i, (a, e) in enumerate(zip(teacher, expected)):
        assert_close(a, e, dtype=torch.float32, name=f"m=1[{i}]")


@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
def test_foreach_triton_loop_agree(device, kind, s_dtype):
    teacher, student = _pairs(SHAPES[:5], s_dtype, device, seed=13)
    momentum = _momentum(0.996, kind, device)
    results = {}
    impls = ["foreach", "auto"] + (["triton"] if ops.triton_usable(device) else [])
    for impl in impls:
        t = [x.clone() for x in teacher]
        update_teacher_(t, student, momentum, impl=impl)
        results[impl] = t
    for impl, t in results.items():
        _check_update(t, teacher, student, 0.996, impl)


def _poisoned_copies(teacher, n: int, c_dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of the first n teacher tensors, filled with NaN: an element the update leaves unwritten fails."""
    return [torch.full_like(t, float("nan"), dtype=c_dtype) for t in teacher[:n]]


def _check_copies(copies, teacher, n_teacher: int, name: str) -> None:
    """Every copy is its teacher's new value rounded to nearest even (Tensor.to), bit for bit."""
    assert len(copies) <= n_teacher
    for i, (c, t) in enumerate(zip(copies, teacher)):
        expected = t.to(c.dtype)
        assert not bool(torch.isnan(c).any()), f"{name}: copies[{i}] has unwritten (NaN) elements"
        assert torch.equal(c, expected), (f"{name}: copies[{i}] differs from teacher[{i}].to({c.dtype}) at "
                                          f"{int((c != expected).sum())} elements")


@pytest.mark.parametrize("c_dtype", HALF)
@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("impl", ["triton", "foreach"])
def test_copies_are_the_new_teacher_rounded(device, c_dtype, kind, impl):
    """The compute-dtype copies of the first k tensors (k < n: the rest have none, as a teacher whose
    weight-normed layer stays fp32) equal the new fp32 teacher rounded to nearest even, bit for bit:
    across the block and chunk edges, a bf16 student, kernel rows with and without a copy, and values
    exactly halfway between two bf16 numbers (where truncation and nearest-even differ)."""
    if impl == "triton" and not ops.triton_usable(device):
        pytest.skip("triton unusable here")
    shapes = [(1000,)] + EDGE_SHAPES
    teacher, student = _pairs(shapes, torch.bfloat16, device, seed=zlib.crc32(f"{c_dtype}-{kind}-{impl}".encode()))
    old = [t.clone() for t in teacher]
    copies = _poisoned_copies(teacher, len(shapes) - 3, c_dtype)
    m = 1.0 if kind == "float" else torch.tensor(0.75, device=device)
    if kind == "float":  # m = 1 keeps the teacher: put the ties there, 1 + (2j + 1) 2^-9 (bf16 step 2^-7 at 1)
        teacher[0].copy_(torch.arange(1000, device=device, dtype=torch.float32).mul_(2 ** -8).add_(2 ** -9).add_(1))
        old[0] = teacher[0].clone()
    if impl == "triton":
        multi_tensor_ema_(teacher, student, m, copies=copies, cache={}, chunk=128, block=32)
    else:
        update_teacher_(teacher, student, m, impl="foreach", copies=copies)
    _check_update(teacher, old, student, float(m), f"{impl} teacher")
    _check_copies(copies, teacher, len(shapes), impl)


def test_copies_errors(device):
    t = [torch.zeros(4, device=device), torch.zeros(6, device=device)]
    s = [torch.ones(4, device=device), torch.ones(6, device=device)]
    bf = torch.bfloat16
    with pytest.raises(ValueError, match="3 copies for 2 teacher tensors"):
        multi_tensor_ema_(t, s, 0.5, copies=[torch.empty(4, dtype=bf, device=device)] * 3, cache={})
    with pytest.raises(TypeError, match=r"copies\[0\] is torch.float32"):
        multi_tensor_ema_(t, s, 0.5, copies=[torch.empty(4, device=device)], cache={})
    with pytest.raises(TypeError, match=r"copies\[1\] is torch.float16"):
        multi_tensor_ema_(t, s, 0.5, copies=[torch.empty(4, dtype=bf, device=device),
                                             torch.empty(6, dtype=torch.float16, device=device)], cache={})
    with pytest.raises(ValueError, match=r"copies\[1\] \(\(2, 3\) on .*teacher\[1\]'s shape \(6,\)"):
        multi_tensor_ema_(t, s, 0.5, copies=[torch.empty(4, dtype=bf, device=device),
                                             torch.empty(2, 3, dtype=bf, device=device)], cache={})
    assert torch.equal(t[0], torch.zeros(4, device=device)), "a rejected call must not write"


class _Net(nn.Module):
    def __init__(self, hidden: int = 7) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 3, bias=False)
        self.register_buffer("steps", torch.zeros(2))


class _Wrap(nn.Module):
    """Puts a module under a wrapper attribute, as DDP (module.) or torch.compile (_orig_mod.) do."""

    def __init__(self, attr: str, inner: nn.Module) -> None:
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("impl", ["auto", "foreach", "triton"])
@pytest.mark.parametrize("wrapper", [None, "module", "_orig_mod"])
def test_teacher_ema_modules(device, impl, wrapper):
    if impl == "triton" and not ops.triton_usable(device):
        pytest.skip("triton unusable here")
    torch.manual_seed(17)
    student_net, teacher_net = _Net().to(device), _Net().to(device)
    teacher_net.requires_grad_(False)
    teacher_net.steps.fill_(3.0)
    student = _Wrap(wrapper, student_net) if wrapper else student_net
    ema = TeacherEMA(student, teacher_net, impl=impl)
    assert ema.impl == ("triton" if impl == "triton" or (impl == "auto" and device.type == "cuda") else "foreach")
    old = {n: p.detach().clone() for n, p in teacher_net.named_parameters()}
    s_params = dict(student_net.named_parameters())
    for m in (0.9, 0.5):
        ema.step(m)
        for n in old:
            multi_tensor_ema_reference_([old[n]], [s_params[n].detach()], m)
    for n, p in teacher_net.named_parameters():
        assert_close(p, old[n], name=n)
    assert torch.equal(teacher_net.steps, torch.full((2,), 3.0, device=device)), "buffers are not EMA'd"
    assert not any(p.grad is not None for p in student_net.parameters())


def _dino_pair():
    """A small DINO student / teacher (ViT with the bf16 stream + DINO head, as build_models makes)."""
    from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone

    def wrapper():
        torch.manual_seed(0)
        backbone = build_backbone("vit_tiny", 16, depth=2, img_size=32, low_precision_stream=True, attn_backend="sdpa")
        return MultiCropWrapper(backbone, DINOHead(192, 300, hidden_dim=64, bottleneck_dim=32), packed=True)

    student, teacher = wrapper(), wrapper()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return student, teacher.requires_grad_(False)


@pytest.mark.parametrize("impl", ["foreach", "triton"])
def test_teacher_forward_on_the_compute_copy_equals_autocast(impl):
    """TeacherEMA(compute_dtype=bf16): the teacher's forward runs on a copy whose linear, conv and
    LayerNorm parameters are bf16 tensors the EMA writes (poisoned with NaN first: each is written
    by the step), the weight-normed last layer, tokens and position embedding the teacher's own
    fp32 ones; under bf16 autocast its outputs equal the fp32 teacher's bit for bit (autocast casts
    to nearest even too). A state-dict load into the teacher refreshes the copy."""
    if impl == "triton" and not ops.triton_usable("cpu"):
        pytest.skip("triton unusable here")
    student, teacher = _dino_pair()
    ema = TeacherEMA(student, teacher, impl=impl, compute_dtype=torch.bfloat16)
    copy = ema.forward_teacher
    assert copy is not teacher
    bf16 = {n for n, p in copy.named_parameters() if p.dtype == torch.bfloat16}
    assert "head.mlp.0.weight" in bf16 and "backbone.blocks.0.attn.qkv.weight" in bf16 and "backbone.norm.bias" in bf16
    shared = {n for n, p in copy.named_parameters() if p is dict(teacher.named_parameters())[n]}
    assert shared == {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.weight_g",
                      "head.last_layer.weight_v"}, shared
    with torch.no_grad():
        for n, p in copy.named_parameters():
            if n in bf16:
                p.fill_(float("nan"))
    views = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for m in (0.9, torch.tensor(0.5)):
        ema.step(m)
        with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
            assert torch.equal(copy(views), teacher(views))
    teacher.load_state_dict(student.state_dict())  # e.g. a resume: the copy follows (a load hook)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert torch.equal(copy(views), teacher(views))
        assert torch.equal(copy(views), student(views))
    assert TeacherEMA(student, teacher, impl=impl).forward_teacher is teacher  # no compute dtype: no copy
    assert TeacherEMA(student, teacher, impl=impl, compute_dtype=torch.float32).forward_teacher is teacher


def test_teacher_ema_mismatch_errors():
    with pytest.raises(ValueError, match=r"only in student \['fc3.weight'\]"):
        student = _Net()
        student.fc3 = nn.Linear(3, 3, bias=False)
        TeacherEMA(student, _Net())
    with pytest.raises(ValueError, match=r"fc1.weight: student \(9, 5\) vs teacher \(7, 5\)"):
        TeacherEMA(_Net(hidden=9), _Net())
    with pytest.raises(ValueError, match="impl"):
        TeacherEMA(_Net(), _Net(), impl="cuda")


def test_kernel_errors(device):
    t = [torch.zeros(4, device=device), torch.zeros(6, device=device)]
    s = [torch.ones(4, device=device), torch.ones(6, device=device)]
    with pytest.raises(ValueError, match="teacher has 2 tensors but student has 1"):
        multi_tensor_ema_(t, s[:1], 0.5)
    with pytest.raises(ValueError, match=r"shape mismatch at index 1: teacher \(6,\) vs student \(2, 3\)"):
        multi_tensor_ema_(t, [s[0], s[1].view(2, 3)], 0.5, cache={})
    with pytest.raises(ValueError, match=r"student\[1\] is on meta"):
        multi_tensor_ema_(t, [s[0], torch.empty(6, device="meta")], 0.5, cache={})
    with pytest.raises(TypeError, match=r"teacher\[1\] is torch.bfloat16"):
        multi_tensor_ema_([t[0], t[1].bfloat16()], s, 0.5, cache={})
    with pytest.raises(TypeError, match=r"student\[0\] is torch.float64"):
        multi_tensor_ema_(t, [s[0].double(), s[1]], 0.5, cache={})
    with pytest.raises(ValueError, match=r"teacher\[0\] .* not contiguous"):
        multi_tensor_ema_([torch.zeros(3, 4, device=device).t(), t[1]], [torch.ones(4, 3, device=device), s[1]],
                          0.5, cache={})
    with pytest.raises(TypeError, match=r"student\[1\] is a float"):
        multi_tensor_ema_(t, [s[0], 1.0], 0.5, cache={})
    with pytest.raises(TypeError, match="must be a list or tuple"):
        multi_tensor_ema_(iter(t), s, 0.5)
    with pytest.raises(ValueError, match="1-element floating tensor"):
        multi_tensor_ema_(t, s, torch.tensor([0.5, 0.5], device=device))
    with pytest.raises(ValueError, match="1-element floating tensor"):
        multi_tensor_ema_(t, s, torch.tensor(1, device=device))
    with pytest.raises(TypeError, match="momentum must be a float"):
        multi_tensor_ema_(t, s, True)
    with pytest.raises(ValueError, match="chunk must be"):
        build_ema_plan(t, s, chunk=100, block=32)
    with pytest.raises(ValueError, match="impl must be one of"):
        update_teacher_(t, s, 0.5, impl="fast")
    assert torch.equal(t[0], torch.zeros(4, device=device)), "a rejected call must not write"
    multi_tensor_ema_([], [], 0.5)  # empty lists: nothing to do


def test_dtensor_local_shards():
    """FSDP2-style DTensor parameters: update_teacher_ writes the local shards in place."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if dist.get_world_size() != 1:
            pytest.skip("needs a single-rank group")
        mesh = init_device_mesh("cpu", (1,))
        teacher, student = _pairs([(6, 5), (9,)], torch.float32, torch.device("cpu"), seed=21)
        old = [t.clone() for t in teacher]
        t_d = [nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]), requires_grad=False) for t in teacher]
        s_d = [nn.Parameter(distribute_tensor(s, mesh, [Shard(0)])) for s in student]
        with pytest.raises(TypeError, match="DTensor"):
            multi_tensor_ema_(t_d, s_d, 0.5, cache={})
        impls = ["foreach"] + (["triton"] if ops.triton_usable("cpu") else [])
        for impl in impls:
            with torch.no_grad():
                for t, o in zip(t_d, old):
                    t.to_local().copy_(o)
            update_teacher_(t_d, s_d, 0.5, impl=impl)
            _check_update([t.to_local() for t in t_d], old, student, 0.5, f"dtensor-{impl}")
    finally:
        if own_group:
            dist.destroy_process_group()


@requires_cuda
def test_cuda_no_host_sync_and_graph_capture():
    """After the plan is built, an update with a tensor momentum never syncs and can be captured."""
    device = torch.device("cuda")
    teacher, student = _pairs(SHAPES, torch.bfloat16, device, seed=31)
    m = torch.tensor(0.9, device=device)
    cache: dict = {}
    multi_tensor_ema_(teacher, student, m, cache=cache)  # builds the plan (a host->device copy)
    torch.cuda.set_sync_debug_mode("error")
    try:
        multi_tensor_ema_(teacher, student, m, cache=cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    old = [t.clone() for t in teacher]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multi_tensor_ema_(teacher, student, m, cache=cache)
    for t, o in zip(teacher, old):
        t.copy_(o)
    m.fill_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    _check_update(teacher, old, student, 0.5, "graph")


def test_a_launch_without_the_copy_constexprs_is_the_plain_ema():
    """``C_DTYPE`` and ``HAS_COPY`` are the kernel's last, defaulted parameters: a launch that does not
    name them (as ../shared/tools/aot_compile.py issues it, and every launch did before the bf16 copy)
    is the plain EMA, not a TypeError."""
    from dino_fast.kernels import ema as kema
    g = torch.Generator().manual_seed(zlib.crc32(b"ema-no-copy-constexprs"))
    teacher = [torch.randn(37, generator=g), torch.randn(3, 50, generator=g)]
    student = [torch.randn(t.shape, generator=g) for t in teacher]
    expected = [t.clone() for t in teacher]
    multi_tensor_ema_reference_(expected, student, 0.9)
    plan = build_ema_plan(teacher, student)
    for s_dtype, aligned, table in plan.groups:
        kema._ema_kernel[(table.shape[0],)](table, table, 0.9, S_DTYPE=kema._TL_DTYPE[s_dtype], M_FROM_PTR=False,
                                             ALIGNED=aligned, BLOCK=kema.DEFAULT_BLOCK, num_warps=kema._NUM_WARPS)
    for i, (t, e) in enumerate(zip(teacher, expected)):
        assert_close(t, e, torch.float32, name=f"teacher[{i}]")
