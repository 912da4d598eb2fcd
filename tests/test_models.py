"""DINO ViT / head / multi-crop vs timm and vs the official DINO code (re-written here from the
official vision_transformer.py). Shallow models keep the file fast on CPU."""
from __future__ import annotations

from collections import Counter
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from dino_fast.models import (ARCHS, DINOHead, DinoViT, DropPath, MultiCropWrapper, PackedSeqlens, build_backbone,
                              interpolate_pos_encoding, set_attn_backend, xformers_usable)
from dino_fast.models.vit import _same_size_runs
from tests.helpers import assert_close, requires_cuda
from tests.test_attention import fp32_tol, use_twins
from tests.test_pos_embed import official_interpolate_pos_encoding

FP32 = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.usefixtures("no_tf32")  # tight fp32 tolerances


@pytest.fixture
def twins(monkeypatch):
    """varlen / flex through their CPU twins (see tests/test_attention.py)."""
    use_twins(monkeypatch)


# --- references written from the official DINO vision_transformer.py (pos-embed: test_pos_embed) ---
def official_tokens(ref: VisionTransformer, img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Official ``prepare_tokens`` on the weights of a timm ViT (plain stride-p conv)."""
    B, _, w, h = img.shape
    x = ref.patch_embed.proj(img).flatten(2).transpose(1, 2)
    x = torch.cat((ref.cls_token.expand(B, -1, -1), x), dim=1)
    return x + official_interpolate_pos_encoding(ref.pos_embed, x, w, h, patch_size)


def official_forward(ref: VisionTransformer, img: torch.Tensor, patch_size: int) -> torch.Tensor:
    x = official_tokens(ref, img, patch_size)
    for blk in ref.blocks:
        x = blk(x)
    return ref.norm(x)[:, 0]


def timm_reference(depth: int, patch_size: int, embed_dim: int = 192, heads: int = 3, seed: int = 0,
                   device: torch.device | str = "cpu") -> VisionTransformer:
    """A randomly initialised timm ViT with DINO's settings (LayerNorm eps 1e-6, qkv bias)."""
    torch.manual_seed(seed)
    ref = VisionTransformer(img_size=224, patch_size=patch_size, num_classes=0, embed_dim=embed_dim, depth=depth,
                            num_heads=heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).to(device)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or skipped one shows
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        ref.cls_token.normal_(0, 0.5)
    return ref.eval()


def load_from(ref: VisionTransformer, backend: str, device: torch.device | str, **kw) -> DinoViT:
    depth, p = len(ref.blocks), ref.patch_embed.patch_size[0]
    arch = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}[ref.embed_dim]
    model = build_backbone(arch, patch_size=p, depth=depth, attn_backend=backend, **kw).to(device)
    model.load_state_dict(ref.state_dict())
    return model.eval()


def views(batch: int, seed: int, device, sizes=(32, 32, 16, 16, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]


# --- backbone vs timm / official -------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("patch_size,embed_dim,heads", [(16, 384, 6), (8, 192, 3)])
def test_backbone_matches_timm_at_224(backend, patch_size, embed_dim, heads, device):
    ref = timm_reference(depth=2, patch_size=patch_size, embed_dim=embed_dim, heads=heads, seed=patch_size,
                         device=device)
    model = load_from(ref, backend, device)
    img = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad():
        assert_close(model(img), ref(img), name=f"{backend} CLS vs timm", **FP32)


@pytest.mark.parametrize("hw", [(96, 96), (64, 112), (100, 75), (224, 224)])
def test_backbone_matches_official_at_any_size(hw, device):
    """Local-crop sizes, non-square and non-divisible inputs: official tokens + blocks."""
    ref = timm_reference(depth=1, patch_size=16, embed_dim=384, heads=6, seed=sum(hw), device=device)
    model = load_from(ref, "sdpa", device)
    img = torch.randn(2, 3, *hw, device=device)
    with torch.no_grad():
        assert_close(model(img), official_forward(ref, img, 16), name=f"CLS at {hw}", **FP32)


def test_state_dict_keys_equal_timm_and_official():
    depth = 2
    model = build_backbone("vit_tiny", patch_size=16, depth=depth)
    ref = timm_reference(depth=depth, patch_size=16)
    official = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"}
    for i in range(depth):
        for mod in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            official |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
    assert set(model.state_dict()) == set(ref.state_dict()) == official
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 192) and model.embed_dim == 192


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_archs(arch):
    expected = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}[arch]
    assert (ARCHS[arch]["embed_dim"], ARCHS[arch]["num_heads"], ARCHS[arch]["depth"]) == (*expected, 12)
    model = build_backbone(arch, patch_size=8, depth=1)
    assert model.embed_dim == expected[0] and model.blocks[0].attn.num_heads == expected[1]
    assert model.blocks[0].norm1.eps == 1e-6 and model.blocks[0].attn.qkv.bias is not None
    assert model.pos_embed.shape[1] == 1 + 28 * 28
    assert model(torch.randn(1, 3, 16, 24)).shape == (1, expected[0])


def test_build_backbone_rejects_bad_args():
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="patch_size"):
        build_backbone("vit_tiny", patch_size=0)
    assert build_backbone("vit_tiny", patch_size=4, depth=1, img_size=32)(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_backbone("vit_tiny", depth=1, attn_backend="flash")
    with pytest.raises(ValueError, match="fixes"):
        build_backbone("vit_tiny", depth=1, num_classes=10)
    model = build_backbone("vit_tiny", patch_size=16, depth=1)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 8, 32))
    with pytest.raises(ValueError, match="views\\[1\\]"):
        model.forward_packed([torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32, dtype=torch.float64)])


# --- packed multi-crop forward ---------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "math", "varlen", "flex"])
@pytest.mark.parametrize("sizes", [(32, 32, 16, 16, 16), (40, 40, 24, 16, 24)])
def test_packed_equals_per_resolution(backend, sizes, device, twins):
    """Globals + locals (patch 8; 17, 26, 10, 5-token sequences): one packed pass vs one pass per
    resolution on the math backend, CLS outputs and every parameter's gradient."""
    ref = timm_reference(depth=2, patch_size=8, seed=11 + sizes[-1], device=device)
    model = load_from(ref, backend, device, drop_path_rate=0.2)  # eval(): drop path off, must not matter
    reference = load_from(ref, "math", device)
    xs = views(batch=2, seed=5, device=device, sizes=sizes)
    packed = model.forward_packed(xs)
    per_res = torch.cat([reference(torch.cat(xs[s:e])) for s, e in _same_size_runs(xs)])
    assert packed.shape == (10, 192)
    tol = fp32_tol(device, backend)
    assert_close(packed, per_res, name=f"{backend} packed CLS", **tol)
    with torch.no_grad():
        assert_close(packed[:2], official_forward(ref, xs[0], 8), name="packed CLS vs official", **tol)
    g = torch.randn_like(packed)
    grads = torch.autograd.grad(packed, list(model.parameters()), g)
    grads_ref = torch.autograd.grad(per_res, list(reference.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        assert_close(a, b, name=f"{backend} grad {name}", **tol)


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flex"])
@pytest.mark.parametrize("sizes", [(16, 32, 16, 32), (24,)])
def test_packed_interleaved_and_single_view(backend, sizes, device, twins):
    model = load_from(timm_reference(depth=1, patch_size=8, seed=3, device=device), backend, device)
    xs = views(batch=3, seed=7, device=device, sizes=sizes)
    with torch.no_grad():
        assert_close(model.forward_packed(xs), torch.cat([model(x) for x in xs]), name=f"{backend} packed",
                     **fp32_tol(device, backend))


@pytest.mark.parametrize("backend", ["auto", "varlen", "flex"])
@pytest.mark.parametrize("whole", [True, False])
def test_packed_compiled_agrees_with_eager(backend, whole, twins):
    """Compiled as the trainer does (``compile: true``: the whole packed forward, PackedSeqlens
    and its cached cu_seqlens / block mask built inside) or block by block (e.g. under FSDP):
    it traces and agrees with eager. Dynamo only (backend="eager"): inductor on 2 CPU cores
    would take minutes; graph counts are tests/preflight/test_compile.py's."""
    model = load_from(timm_reference(depth=2, patch_size=8, seed=17), backend, "cpu")
    xs = views(batch=2, seed=8, device="cpu", sizes=(24, 16, 16))
    try:
        with torch.no_grad():
            expected = model.forward_packed(xs)
            if whole:
                out = torch.compile(model.forward_packed, backend="eager")(xs)
            else:
                for blk in model.blocks:
                    blk.compile(backend="eager")
                out = model.forward_packed(xs)
    finally:
        torch._dynamo.reset()
    assert_close(out, expected, name=f"{backend} compiled (whole={whole})", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_packed_with_activation_checkpointing(backend, device, twins):
    """Checkpointed blocks recompute with the same PackedSeqlens: same CLS and gradients."""
    model = load_from(timm_reference(depth=2, patch_size=8, seed=13, device=device), backend, device)
    xs = views(batch=2, seed=4, device=device, sizes=(24, 16, 16))
    outs, grads = [], []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        out = model.forward_packed(xs)
        outs.append(out)
        grads.append(torch.autograd.grad(out, list(model.parameters()), torch.ones_like(out)))
    assert_close(outs[1], outs[0], name="checkpointed CLS", **fp32_tol(device, backend))
    for (name, _), a, b in zip(model.named_parameters(), grads[1], grads[0]):
        assert_close(a, b, name=f"checkpointed grad {name}", **fp32_tol(device, backend))


def test_packed_drop_path_is_per_sequence():
    torch.manual_seed(0)
    seqs = PackedSeqlens([5] * 40 + [2] * 60)
    y = torch.ones(1, seqs.total, 3)
    out = DropPath(0.5)(y, seqs)
    per_seq = out[0].split(list(seqs.seqlens))  # (len, 3) each
    for part in per_seq:
        assert torch.equal(part, part[:1].expand_as(part)), "drop path must act on whole sequences"
    firsts = torch.stack([p[0, 0] for p in per_seq])
    assert set(firsts.unique().tolist()) == {0.0, 2.0}  # dropped or scaled by 1 / keep_prob


@pytest.mark.parametrize("drop_prob", [0.1, 0.5])
def test_drop_path_draws_per_sample_and_per_sequence(drop_prob):
    """Bernoulli(1 - p) per sample (dim 0) or per packed sequence, kept rows scaled by 1 / (1 - p):
    the frequency of kept draws within 4 sigma of 1 - p over 4,000 draws each way."""
    torch.manual_seed(3)
    layer, keep = DropPath(drop_prob), 1.0 - drop_prob
    per_sample = layer(torch.ones(4000, 2, 3))[:, 0, 0]  # (4000,)
    seqs = PackedSeqlens([3] * 1500 + [1] * 2500)
    per_seq = torch.stack([t[0, 0] for t in layer(torch.ones(1, seqs.total, 2), seqs)[0].split(list(seqs.seqlens))])
    for name, drawn in (("per sample", per_sample), ("per sequence", per_seq)):
        assert ((drawn == 0) | ((drawn - 1 / keep).abs() < 1e-6)).all(), f"{name}: values {drawn.unique()}"
        kept = (drawn > 0).float().mean().item()
        assert abs(kept - keep) < 4 * (keep * drop_prob / 4000) ** 0.5, f"{name}: kept {kept:.3f}, expected {keep}"
    assert torch.equal(layer.eval()(per_sample), per_sample)  # eval: identity


def test_drop_path_rate_is_a_buffer_outside_the_state_dict():
    with_drop = build_backbone("vit_tiny", 8, depth=3, drop_path_rate=0.2, img_size=32)
    plain = build_backbone("vit_tiny", 8, depth=3, drop_path_rate=0.0, img_size=32)
    assert list(with_drop.state_dict()) == list(plain.state_dict())  # official keys, nothing added
    rates = [float(b.drop_path1.keep_prob) if isinstance(b.drop_path1, DropPath) else 1.0 for b in with_drop.blocks]
    assert rates == pytest.approx([1.0, 0.9, 0.8])  # timm's linear decay rule, block 0 without drop path


def test_compiled_blocks_share_one_graph_whatever_their_drop_rate(twins):
    """Each block compiled alone (the old compile path), four blocks at rates 0, 0.1, 0.2, 0.3:
    a float rate made Dynamo compile one graph per rate (12 student blocks hit the recompile
    limit of 8); the rate as a buffer gives one graph without drop path and one with it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_backbone("vit_tiny", 8, depth=4, drop_path_rate=0.3, attn_backend="sdpa", img_size=32).train()
    try:
        for blk in model.blocks:
            blk.compile(backend="eager")
        for _ in range(2):
            model.forward_packed(views(batch=2, seed=1, device="cpu", sizes=(32, 32, 16))).sum().backward()
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["stats"])
    finally:
        torch._dynamo.reset()


def test_packed_training_with_drop_path_runs_and_differs_per_view():
    model = build_backbone("vit_tiny", patch_size=8, depth=2, drop_path_rate=0.9, attn_backend="sdpa").train()
    torch.manual_seed(1)
    out = model.forward_packed(views(batch=4, seed=2, device="cpu"))
    out.sum().backward()
    assert out.shape == (20, 192) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("packed", [False, True])
def test_multicrop_wrapper_matches_per_view(packed, device):
    ref = timm_reference(depth=1, patch_size=8, seed=4, device=device)
    backbone = load_from(ref, "sdpa", device)
    torch.manual_seed(0)
    head = DINOHead(192, 97, hidden_dim=64, bottleneck_dim=32).to(device)
    wrapper = MultiCropWrapper(backbone, head, packed=packed)
    xs = views(batch=2, seed=9, device=device)
    out = wrapper(xs)
    expected = head(torch.cat([official_forward(ref, x, 8) for x in xs]))
    assert out.shape == (10, 97)
    assert_close(out, expected, name=f"wrapper packed={packed}", **FP32)
    assert_close(wrapper(xs[0]), expected[:2], name="single tensor input", **FP32)
    with pytest.raises(TypeError):
        wrapper([])
    with pytest.raises(TypeError, match="forward_packed"):
        MultiCropWrapper(nn.Linear(3, 3), head, packed=True)


# --- masked image modelling (iBOT / DINOv2 mask token) --------------------------------------
def _mim_pair(device, seed: int = 21) -> tuple[DinoViT, DinoViT]:
    """A default model and a masked_im_modeling one with the same backbone weights."""
    ref = timm_reference(depth=2, patch_size=8, seed=seed, device=device)
    plain = load_from(ref, "sdpa", device)
    mim = build_backbone("vit_tiny", patch_size=8, depth=2, attn_backend="sdpa", masked_im_modeling=True).to(device)
    missing, unexpected = mim.load_state_dict(ref.state_dict(), strict=False)
    assert missing == ["mask_token"] and unexpected == []  # the documented way to load old checkpoints
    return plain, mim.eval()


def test_mask_token_keys_and_init():
    plain = build_backbone("vit_tiny", patch_size=16, depth=1)
    mim = build_backbone("vit_tiny", patch_size=16, depth=1, masked_im_modeling=True)
    assert "mask_token" not in plain.state_dict() and not hasattr(plain, "mask_token")
    assert set(mim.state_dict()) - set(plain.state_dict()) == {"mask_token"}
    assert mim.mask_token.shape == (1, 1, 192) and torch.count_nonzero(mim.mask_token) == 0


@pytest.mark.parametrize("hw", [(32, 32), (40, 24)])
def test_masks_none_is_unchanged_and_checkpoint_without_token_loads(hw, device):
    plain, mim = _mim_pair(device)
    img = torch.randn(2, 3, *hw, device=device)
    with torch.no_grad():
        assert_close(mim(img), plain(img), name="masks=None", rtol=0, atol=0)
        assert_close(mim.prepare_tokens(img), plain.prepare_tokens(img), name="tokens", rtol=0, atol=0)
    assert torch.count_nonzero(mim.mask_token) == 0, "a checkpoint without mask_token leaves it at init"


@pytest.mark.parametrize("hw,frac", [((32, 32), 0.5), ((40, 24), 0.3), ((16, 16), 1.0)])
def test_masked_patches_are_the_mask_token_before_the_blocks(hw, frac, device):
    plain, mim = _mim_pair(device, seed=22)
    with torch.no_grad():
        mim.mask_token.normal_()
    g = torch.Generator().manual_seed(hw[0] + int(10 * frac))
    img = torch.randn(3, 3, *hw, generator=g).to(device)
    h, w = hw[0] // 8, hw[1] // 8
    masks = (torch.rand(3, h * w, generator=g) < frac).to(device)
    masks[0, 0] = True
    with torch.no_grad():
        tokens = mim.prepare_tokens(img, masks)
        patches = plain.patch_embed(img).reshape(3, h * w, -1)  # (B, h*w, D), no pos-embed yet
        expected_patches = torch.where(masks[..., None], mim.mask_token.expand(3, h * w, -1), patches)
        pos = interpolate_pos_encoding(mim.pos_embed, h, w)
        expected = torch.cat([mim.cls_token.expand(3, -1, -1), expected_patches], dim=1) + pos
    assert_close(tokens, expected, name="masked tokens", **FP32)
    # Masked positions hold mask token + their position embedding, whatever the image was.
    assert_close(tokens[:, 1:][masks], (mim.mask_token[0, 0] + pos[0, 1:].expand(3, -1, -1)[masks]),
                 name="mask token at masked positions", **FP32)


def test_forward_tokens_and_mask_token_gradient(device):
    _, mim = _mim_pair(device, seed=23)
    img = torch.randn(2, 3, 32, 24, device=device)
    cls, patches = mim.forward_tokens(img)
    assert cls.shape == (2, 192) and patches.shape == (2, 12, 192)
    with torch.no_grad():
        assert_close(cls, mim(img), name="forward_tokens CLS", rtol=0, atol=0)
        assert_close(patches, mim.forward_features(img)[:, 1:], name="forward_tokens patches", rtol=0, atol=0)
    masks = torch.zeros(2, 12, dtype=torch.bool, device=device)
    masks[:, ::3] = True
    cls_m, patches_m = mim.forward_tokens(img, masks)
    (patches_m.sum() + cls_m.sum()).backward()
    assert mim.mask_token.grad is not None and torch.count_nonzero(mim.mask_token.grad) > 0


def test_masks_bad_inputs_raise():
    plain = build_backbone("vit_tiny", patch_size=8, depth=1)
    mim = build_backbone("vit_tiny", patch_size=8, depth=1, masked_im_modeling=True)
    img = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="masked_im_modeling=True"):
        plain.prepare_tokens(img, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, h\*w\)"):
        mim.prepare_tokens(img, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        mim.prepare_tokens(img, torch.zeros(2, 4))


# --- evaluation API --------------------------------------------------------------------------
def test_get_last_selfattention(device):
    ref = timm_reference(depth=2, patch_size=8, seed=6, device=device)
    model = load_from(ref, "sdpa", device)
    img = torch.randn(2, 3, 40, 24, device=device)
    attn = model.get_last_selfattention(img)
    n = 1 + 5 * 3
    assert attn.shape == (2, 3, n, n)
    assert_close(attn.sum(-1), torch.ones(2, 3, n, device=device), name="row sums", **FP32)
    with torch.no_grad():  # official: last block's softmax(q k^T / sqrt(d)) on norm1 of its input
        x = ref.blocks[0](official_tokens(ref, img, 8))
        q, k, _ = ref.blocks[1].attn.qkv(ref.blocks[1].norm1(x)).reshape(2, n, 3, 3, 64).permute(2, 0, 3, 1, 4)
        expected = F.softmax(q @ k.transpose(-2, -1) * 64 ** -0.5, dim=-1)
    assert_close(attn, expected, name="attention", **FP32)


def test_get_intermediate_layers(device):
    ref = timm_reference(depth=3, patch_size=8, seed=8, device=device)
    model = load_from(ref, "sdpa", device)
    img = torch.randn(2, 3, 32, 24, device=device)
    with torch.no_grad():
        outs = model.get_intermediate_layers(img, n=2)
        assert [o.shape for o in outs] == [(2, 13, 192)] * 2
        x = ref.blocks[1](ref.blocks[0](official_tokens(ref, img, 8)))
        assert_close(outs[0], ref.norm(x), name="block 2 normed", **FP32)
        assert_close(outs[1][:, 0], model(img), name="last block CLS", **FP32)
    with pytest.raises(ValueError, match="n must be"):
        model.get_intermediate_layers(img, n=4)


# --- head ------------------------------------------------------------------------------------
def _official_last_layer(head: DINOHead) -> torch.Tensor:
    """Weight the official nn.utils.weight_norm(Linear) computes from (g, v): g * v / ||v||_row."""
    return torch._weight_norm(head.last_layer.weight_v, head.last_layer.weight_g, 0)


@pytest.mark.parametrize("nlayers,use_bn", [(3, False), (1, False), (4, True)])
def test_head_matches_reference(nlayers, use_bn, device):
    torch.manual_seed(nlayers)
    head = DINOHead(48, 301, use_bn=use_bn, nlayers=nlayers, hidden_dim=40, bottleneck_dim=24).to(device)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # exercise g (official checkpoints can have g != 1)
    x = torch.randn(6, 48, device=device)
    z = head.mlp(x)
    assert z.shape == (6, 24)
    expected = F.normalize(z, dim=-1) @ _official_last_layer(head).t()
    out = head(x)
    assert out.shape == (6, 301)
    assert_close(out, expected, name="head", **FP32)
    linear_count = sum(isinstance(m, nn.Linear) for m in head.mlp.modules())
    assert linear_count == nlayers and (sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) > 0) == use_bn
    assert all(int(torch.count_nonzero(m.bias)) == 0 for m in head.mlp.modules() if isinstance(m, nn.Linear))
    stds = [m.weight.std().item() for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert all(0.015 < s < 0.025 for s in stds), stds  # trunc_normal(std=.02)


def test_head_bottleneck_is_unit_norm():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=16, bottleneck_dim=8)
    seen = {}
    head.last_layer.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    head(torch.randn(5, 32) * 10)
    assert_close(seen["z"].norm(dim=-1), torch.ones(5), name="bottleneck norms", **FP32)
    # With g = 1 every prototype is a unit vector.
    assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50), name="prototype norms", **FP32)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_weight_norm_params(norm_last_layer):
    head = DINOHead(16, 40, norm_last_layer=norm_last_layer, hidden_dim=8, bottleneck_dim=4)
    keys = set(head.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= keys and "last_layer.weight" not in keys
    assert "last_layer.bias" not in keys
    g = head.last_layer.weight_g
    assert g.shape == (40, 1) and head.last_layer.weight_v.shape == (40, 4)
    assert torch.equal(g, torch.ones(40, 1)) and g.requires_grad == (not norm_last_layer)
    head(torch.randn(3, 16)).sum().backward()
    assert (g.grad is not None) == (not norm_last_layer) and head.last_layer.weight_v.grad is not None


def test_head_loads_official_weight_norm_state_dict():
    """An official DINOHead state dict (nn.utils.weight_norm keys) loads and gives its outputs."""
    torch.manual_seed(1)
    lin = nn.Linear(8, 30, bias=False)
    g = torch.rand(30, 1) + 0.5
    official_w = g * lin.weight / lin.weight.norm(dim=1, keepdim=True)
    head = DINOHead(16, 30, hidden_dim=12, bottleneck_dim=8)
    sd = head.state_dict()
    sd["last_layer.weight_g"], sd["last_layer.weight_v"] = g, lin.weight.detach().clone()
    head.load_state_dict(sd)
    x = torch.randn(4, 16)
    assert_close(head(x), F.normalize(head.mlp(x), dim=-1) @ official_w.t(), name="loaded head", **FP32)


def test_backend_switch_is_per_module():
    model = build_backbone("vit_tiny", patch_size=16, depth=2, attn_backend="math")
    assert {b.attn.backend for b in model.blocks} == {"math"} and model.attn_backend == "math"
    set_attn_backend(model, "sdpa")
    assert {b.attn.backend for b in model.blocks} == {"sdpa"}
    wrapper = MultiCropWrapper(model, DINOHead(192, 8, hidden_dim=16, bottleneck_dim=8))
    assert wrapper.attn_backend == "sdpa" and wrapper.attn_head_dim == 64  # what the trainer logs
    model.attn_backend = "auto"  # the property sets every block
    model.blocks[1].attn.backend = "math"
    assert wrapper.attn_backend == "mixed"


# --- bf16 residual stream (low_precision_stream) ---------------------------------------------
@pytest.fixture
def cuda_autocast_policy(monkeypatch):
    """CUDA autocast runs ``layer_norm`` in fp32 and returns fp32 (its fp32 op list); CPU autocast
    runs it in the input's dtype. The stream tests emulate the CUDA policy, which is the one a
    GPU run meets, so that they see what the bf16 stream changes there."""
    real = F.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(x.device.type):
            return real(x, shape, weight, bias, eps)
        with torch.autocast(x.device.type, enabled=False):
            return real(x.float(), shape, *(None if t is None else t.float() for t in (weight, bias)), eps)

    monkeypatch.setattr(F, "layer_norm", layer_norm)


def _stream_pair(seed: int) -> tuple[DinoViT, DinoViT]:
    """A small ViT with the fp32 stream and its copy with the bf16 stream (same weights,
    perturbed so that the norms' affine parameters and biases are not their init)."""
    torch.manual_seed(seed)
    ref = build_backbone("vit_tiny", 8, depth=2, attn_backend="sdpa", img_size=32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    lp = build_backbone("vit_tiny", 8, depth=2, attn_backend="sdpa", img_size=32, low_precision_stream=True).eval()
    lp.load_state_dict(ref.state_dict())  # same keys: the LayerNorm subclass adds none
    return ref, lp


def _stream_dtypes(model: DinoViT, run) -> tuple[set[torch.dtype], torch.Tensor]:
    """(dtypes of the residual stream: every block's output and the final norm's, run's output)."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype)) for m in [*model.blocks, model.norm]]
    try:
        out = run(model)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_stream_matches_the_fp32_stream_under_autocast(packed, cuda_autocast_policy):
    """Under bf16 autocast: the fp32 stream (fp32 cls token / pos-embed promote it, autocast's
    layer_norm returns fp32) vs the bf16 stream. Both round to bf16 (8 bits, 0.4 %), at other
    places over two blocks: within 2.5 % of the output's scale, 4 % of each gradient's (measured
    up to 1.3 % and 2.3 %)."""
    ref, lp = _stream_pair(seed=7 + packed)
    xs = views(batch=2, seed=3, device="cpu")
    run = (lambda m: m.forward_packed(xs)) if packed else (lambda m: m(torch.cat(xs[:2])))
    with torch.autocast("cpu", torch.bfloat16):
        (ref_dtypes, expected), (lp_dtypes, out) = _stream_dtypes(ref, run), _stream_dtypes(lp, run)
    assert ref_dtypes == {torch.float32} and lp_dtypes == {torch.bfloat16}
    assert_close(out, expected, name="bf16-stream CLS", rtol=0, atol=2.5e-2 * float(expected.detach().abs().max()))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, list(lp.parameters()), g.to(out.dtype))
    grads_ref = torch.autograd.grad(expected, list(ref.parameters()), g)
    for (name, _), a, b in zip(ref.named_parameters(), grads, grads_ref):
        assert a.dtype == b.dtype == torch.float32, name
        assert_close(a, b, name=f"bf16-stream grad {name}", rtol=0, atol=4e-2 * float(b.abs().max()))
    with torch.no_grad():  # without autocast the switch changes nothing
        assert torch.equal(run(lp), run(ref))


def saved_activation_bytes(model: nn.Module, run) -> tuple[int, list[tuple[torch.dtype, int]]]:
    """Bytes of the tensors autograd saves for backward during ``run(model)``, each storage once,
    the model's parameters excluded; and (dtype, numel) of each saved storage."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = (storage.nbytes(), t.dtype, storage.nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model)
    return sum(n for n, _, _ in saved.values()), [(dtype, numel) for _, dtype, numel in saved.values()]


def test_bf16_stream_saves_only_bf16_activations(cuda_autocast_policy):
    """No fp32 activation of the stream's size is kept for backward (with the fp32 stream, each
    LayerNorm keeps its fp32 input), so fewer bytes per image."""
    ref, lp = _stream_pair(seed=3)
    ref.train(), lp.train()
    xs = views(batch=2, seed=5, device="cpu")
    tokens = sum(x.shape[0] * (1 + (x.shape[-1] // 8) ** 2) for x in xs)

    def run(m):
        with torch.autocast("cpu", torch.bfloat16):
            return m.forward_packed(xs)

    (ref_bytes, ref_saved), (lp_bytes, lp_saved) = saved_activation_bytes(ref, run), saved_activation_bytes(lp, run)
    stream = tokens * ref.embed_dim  # elements of one (1, T, D) stream tensor
    assert any(dtype == torch.float32 and numel >= stream for dtype, numel in ref_saved)
    big_fp32 = [(dtype, numel) for dtype, numel in lp_saved if dtype == torch.float32 and numel >= stream]
    assert not big_fp32, f"fp32 activations saved with the bf16 stream: {big_fp32}"
    assert lp_bytes < ref_bytes


# --- recompute_norm_gelu: LayerNorm and GELU outputs rebuilt in backward, not kept -------------
def _graph_nodes(out: torch.Tensor) -> Counter:
    """How many autograd nodes of each type produced ``out``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return Counter(type(n).__name__ for n in seen)


def _recompute_model(backend: str, bf16: bool, seed: int) -> DinoViT:
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", 8, depth=2, attn_backend=backend, img_size=32, low_precision_stream=bf16,
                           drop_path_rate=0.1)
    with torch.no_grad():  # norms' affine parameters and biases off their init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


@pytest.mark.parametrize("backend", ["varlen", "sdpa"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-stream"])
@pytest.mark.parametrize("packed", [True, False])
def test_recompute_norm_gelu_matches_the_saving_path(backend, bf16, packed, twins, cuda_autocast_policy):
    """Switch on vs off, same weights and drop-path draws: the forward runs the modules' own ops
    (outputs bit for bit), the backward their formulas with the norm / GELU rebuilt (gradients
    within each dtype's rounding: the sums over q, k and v run in another order). The rebuilding
    functions are in the graph: both norms of each block on varlen, norm2 and the GELU on sdpa."""
    model = _recompute_model(backend, bf16, seed=11 + packed)
    xs = views(batch=2, seed=4, device="cpu")
    run = (lambda: model.forward_packed(xs)) if packed else (lambda: model(torch.cat(xs[:2])))
    results = {}
    for on in (False, True):
        model.recompute_norm_gelu = on
        torch.manual_seed(5)  # the same drop-path draws
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = run()
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        nodes = _graph_nodes(out)
        assert nodes["_ActLinearBackward"] == (2 if on else 0), nodes
        assert nodes["_NormLinearsBackward"] == (0 if not on else 4 if backend == "varlen" else 2), nodes
        results[on] = out, torch.autograd.grad(out, list(model.parameters()), g)
    (expected, grads_ref), (out, grads) = results[False], results[True]
    assert torch.equal(out, expected), f"forward differs: {(out.float() - expected.float()).abs().max()}"
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        assert a.dtype == b.dtype == torch.float32, name
        if bf16:
            assert_close(a, b, name=f"grad {name}", rtol=0, atol=2e-2 * float(b.abs().max()) + 1e-6)
        else:
            assert_close(a, b, torch.float32, name=f"grad {name}", atol=1e-5 * float(b.abs().max()))


def test_recompute_norm_gelu_keeps_ten_of_sixteen(twins, cuda_autocast_policy):
    """Activation bytes kept for backward per image (the slope between batch 2 and 4: each storage
    once, parameters excluded), bf16 stream, packed varlen: a block keeps x, q, k, v, the attention
    output, x1 and the fc1 output (10 stream widths per token) instead of also norm1(x), norm2(x1)
    and GELU(fc1) (16): about 0.63 of the saving path's per image (measured 0.64 here, with the
    patch embedding's inputs)."""
    model = _recompute_model("varlen", bf16=True, seed=3)

    def per_image(on: bool) -> float:
        model.recompute_norm_gelu = on
        kept = []
        for batch in (2, 4):
            xs = views(batch=batch, seed=5, device="cpu")

            def run(m):
                with torch.autocast("cpu", torch.bfloat16):
                    return m.forward_packed(xs)
            kept.append(saved_activation_bytes(model, run)[0])
        return (kept[1] - kept[0]) / 2

    saving, recomputing = per_image(False), per_image(True)
    assert recomputing <= 0.66 * saving, f"{recomputing:.0f} B per image kept vs {saving:.0f} without recompute"


# --- CUDA: the real kernels, bf16 ------------------------------------------------------------
def _need_xformers() -> None:
    if not xformers_usable(torch.cuda.current_device()):
        pytest.skip("xformers attention kernels are not usable on this GPU / build")


def _need(backend: str) -> None:
    import dino_fast.models.attention as attention_mod

    if backend in ("varlen", "flex", "xformers"):
        problem = getattr(attention_mod, f"{backend}_problem")(torch.cuda.current_device())
        if problem:
            pytest.skip(f"{backend} is not usable here: {problem}")


@requires_cuda
def test_xformers_backbone_matches_sdpa_bf16():
    _need_xformers()
    model = load_from(timm_reference(depth=2, patch_size=16, embed_dim=384, heads=6, seed=1, device="cuda"),
                      "sdpa", "cuda")
    img = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(img)
        set_attn_backend(model, "xformers")
        out = model(img)
    assert_close(out, expected, dtype=torch.bfloat16, name="xformers vs sdpa (bf16)")


@requires_cuda
@pytest.mark.parametrize("backend", ["varlen", "flex", "xformers", "sdpa", "auto"])
def test_packed_equals_per_resolution_bf16(backend):
    _need(backend)
    model = load_from(timm_reference(depth=2, patch_size=16, embed_dim=384, heads=6, seed=2, device="cuda"),
                      backend, "cuda")
    xs = views(batch=8, seed=3, device="cuda", sizes=(224, 224, 96, 96, 96, 96))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model.forward_packed(xs)
        set_attn_backend(model, "sdpa")  # per resolution on sdpa (flash) as the reference
        per_res = torch.cat([model(torch.cat(xs[:2])), model(torch.cat(xs[2:]))])
    assert_close(packed, per_res, dtype=torch.bfloat16, name=f"{backend} packed vs per-resolution (bf16)")
    g = torch.randn_like(packed)
    w = model.blocks[0].attn.qkv.weight
    (ga,) = torch.autograd.grad(packed, w, g)
    (gb,) = torch.autograd.grad(per_res, w, g)
    assert_close(ga, gb, dtype=torch.bfloat16, rtol=5e-2, atol=5e-2, name="qkv grad (bf16)")
