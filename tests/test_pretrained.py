"""load_pretrained on every weights layout, the exports, and the one-line errors.

The reference is a small ViT written here from the official DINO
``vision_transformer.py`` (same key names, official position-embedding
interpolation, explicit attention), independent of dino_fast and timm.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone
from dino_fast.pretrained import (PretrainedError, detect_layout, export_official_backbone, export_timm_state_dict,
                                  infer_vit_config, load_pretrained, save_official_backbone, save_timm_state_dict,
                                  timm_model_name)
from tests.helpers import assert_close

FP32 = dict(rtol=1e-5, atol=1e-5)  # fp32, different op order (fused vs explicit attention)


# ----------------------------------------------------------------------------- reference
class RefAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim, 4 * dim)

    def forward(self, x, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + y
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    """Official DINO VisionTransformer (img_size 224), minus dropout / drop path."""

    def __init__(self, dim: int, depth: int, num_heads: int, patch: int, img_size: int = 224) -> None:
        super().__init__()
        self.patch_embed = RefPatchEmbed(patch, dim)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim))
        self.blocks = nn.ModuleList([RefBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        with torch.no_grad():  # non-trivial norms and biases so that any mix-up shows
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.05)
                elif "norm" in name:
                    p.normal_(1.0, 0.1)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for i, blk in enumerate(self.blocks):
            if i < len(self.blocks) - 1:
                x = blk(x)
            else:
                return blk(x, return_attention=True)


def fake_head(dim: int, out_dim: int = 32, prefix: str = "head.") -> dict[str, torch.Tensor]:
    """A DINO head's tensors under the official key names."""
    return {f"{prefix}mlp.0.weight": torch.randn(64, dim), f"{prefix}mlp.0.bias": torch.randn(64),
            f"{prefix}mlp.2.weight": torch.randn(16, 64), f"{prefix}mlp.2.bias": torch.randn(16),
            f"{prefix}last_layer.weight_g": torch.ones(out_dim, 1),
            f"{prefix}last_layer.weight_v": torch.randn(out_dim, 16)}


def official_training_checkpoint(student: RefViT, teacher: RefViT, dim: int) -> dict:
    """What official main_dino.py saves: DDP student (module.), plain teacher, args Namespace."""
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    s = {f"module.backbone.{k}": v for k, v in student.state_dict().items()} | fake_head(dim, prefix="module.head.")
    t = {f"backbone.{k}": v for k, v in teacher.state_dict().items()} | fake_head(dim)
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=32, norm_last_layer=True, lr=0.0005,
                              global_crops_scale=(0.4, 1.0), data_path="/path/to/imagenet/train", seed=0)
    return {"student": s, "teacher": t, "optimizer": opt.state_dict(), "epoch": 3, "args": args,
            "dino_loss": {"center": torch.randn(1, 32)}, "fp16_scaler": {"scale": 65536.0, "_growth_tracker": 5}}


CASES = [  # (arch, dim, heads, patch, depth)
    ("vit_tiny", 192, 3, 16, 2),
    ("vit_small", 384, 6, 8, 1),
]


def _images(seed: int, size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- official layouts
@pytest.mark.parametrize("arch,dim,heads,patch,depth", CASES)
def test_official_training_checkpoint(tmp_path, arch, dim, heads, patch, depth):
    torch.manual_seed(1)
    student, teacher = RefViT(dim, depth, heads, patch).eval(), RefViT(dim, depth, heads, patch).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save(official_training_checkpoint(student, teacher, dim), path)
    assert detect_layout(torch.load(path, weights_only=False)) == "official_training"
    for key, ref in (("teacher", teacher), ("student", student)):
        model = load_pretrained(path, key=key)
        assert not model.training
        assert (model.embed_dim, len(model.blocks), model.patch_size) == (dim, depth, patch)
        for size in (224, 96):  # global and local crop resolutions (pos-embed interpolated at 96)
            x = _images(size, size)
            with torch.no_grad():
                assert_close(model(x), ref(x), name=f"{arch}/{patch} {key} CLS @ {size}px", **FP32)
        with torch.no_grad():
            x = _images(7, 96)
            assert_close(model.get_last_selfattention(x), ref.get_last_selfattention(x),
                         name="last self-attention", **FP32)


@pytest.mark.parametrize("backend", ["math", "sdpa", "xformers"])
def test_released_backbone_weights(tmp_path, backend, device):
    if backend == "xformers" and device.type != "cuda":
        pytest.skip("the xformers backend runs on CUDA only")
    torch.manual_seed(2)
    ref = RefViT(384, 2, 6, 16).eval()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(ref.state_dict(), path)
    model = load_pretrained(path, attn_backend=backend).to(device)
    assert infer_vit_config(ref.state_dict())["arch"] == "vit_small"
    # fp32 on the device under test; TF32 off so the CUDA run is held to fp32 accuracy too
    tol = FP32 if device.type == "cpu" else dict(rtol=1e-4, atol=1e-4)
    for size in (224, 96):
        x = _images(size + 1, size)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            assert_close(model(x.to(device)), ref(x), name=f"released weights CLS @ {size}px ({backend})", **tol)


def test_export_official_backbone_loads_into_reference(tmp_path):
    torch.manual_seed(3)
    model = build_backbone("vit_tiny", 16, depth=2).eval()
    ref = RefViT(192, 2, 3, 16).eval()
    ref.load_state_dict(export_official_backbone(model), strict=True)
    x = _images(3, 96)
    with torch.no_grad():
        assert_close(ref(x), model(x), name="official layout export", **FP32)
    path = save_official_backbone(model, tmp_path / "out" / "backbone.pth")
    assert sorted(os.listdir(path.parent)) == ["backbone.pth"]  # no temp file left behind
    with torch.no_grad():
        assert_close(load_pretrained(path)(x), model(x), name="official export reload", **FP32)


# ----------------------------------------------------------------------------- timm
def test_timm_round_trip(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    model = build_backbone("vit_small", 16, depth=2).eval()
    name = timm_model_name(model)
    assert name == "vit_small_patch16_224"
    tm = timm.create_model(name, pretrained=False, num_classes=0, depth=2).eval()
    tm.load_state_dict(export_timm_state_dict(model), strict=True)
    x = _images(4, 224)
    with torch.no_grad():
        assert_close(tm(x), model(x), name="timm(export(model))", **FP32)
    for fname in ("vit.safetensors", "vit.pth"):
        path = save_timm_state_dict(model, tmp_path / fname)
        with torch.no_grad():
            assert_close(load_pretrained(path)(x), model(x), name=f"reload {fname}", **FP32)


def test_timm_classifier_state_dict(tmp_path, caplog):
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2).eval()
    path = tmp_path / "timm.pth"
    torch.save(tm.state_dict(), path)
    with caplog.at_level("INFO", logger="dino_fast.pretrained"):
        model = load_pretrained(path)
    assert "head.weight" in caplog.text and "classifier" in caplog.text
    x = _images(5, 224)
    with torch.no_grad():
        assert_close(model(x), tm.forward_head(tm.forward_features(x), pre_logits=True), name="timm CLS", **FP32)


# ----------------------------------------------------------------------------- dino_fast
def test_dino_fast_checkpoint(tmp_path):
    from dino_fast.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save

    torch.manual_seed(6)
    wrappers = [MultiCropWrapper(build_backbone("vit_tiny", 16, depth=2), DINOHead(192, 32, hidden_dim=64,
                                                                                    bottleneck_dim=16))
                for _ in range(2)]
    student, teacher = wrappers
    opt = torch.optim.AdamW(student.parameters())
    state = {"format": CHECKPOINT_FORMAT, "student": student.state_dict(), "teacher": teacher.state_dict(),
             "optimizer": opt.state_dict(), "dino_loss": {"center": torch.zeros(1, 32)}, "step": 10, "epoch": 1,
             "config": {"arch": "vit_tiny", "patch_size": 16, "global_crops_scale": [0.4, 1.0]},
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    path = atomic_torch_save(state, tmp_path / "checkpoint-00000010.pth")
    x = _images(6, 96)
    for key, ref in (("teacher", teacher), ("student", student)):
        model = load_pretrained(path, key=key)
        with torch.no_grad():
            assert_close(model(x), ref.backbone.eval()(x), name=f"dino_fast {key}", **FP32)
    with pytest.raises(PretrainedError, match=r"unknown key='ema'.*\['student', 'teacher'\]"):
        load_pretrained(path, key="ema")


# ----------------------------------------------------------------------------- errors
def _one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(PretrainedError, match="file not found") as e:
        load_pretrained(tmp_path / "nope.pth")
    _one_line_error(e)
    torch.manual_seed(7)
    path = tmp_path / "full.pth"
    torch.save(RefViT(192, 1, 3, 16).state_dict(), path)
    blob = path.read_bytes()
    for name, data in (("half.pth", blob[: len(blob) // 2]), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PretrainedError, match="truncated|empty") as e:
            load_pretrained(tmp_path / name)
        assert name in _one_line_error(e)
    (tmp_path / "half.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(PretrainedError, match="safetensors") as e:
        load_pretrained(tmp_path / "half.safetensors")
    _one_line_error(e)


class _Evil:
    """Unpickling this would create a directory: proof that arbitrary code does not run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pickles_that_are_not_checkpoints(tmp_path):
    cases = {
        "plain.pkl": (lambda p: pickle.dump({"lr": 0.1, "epochs": 3}, open(p, "wb")), "not a PyTorch checkpoint"),
        "nothing.pth": (lambda p: torch.save({"lr": 0.1, "note": "hi"}, p), "not a checkpoint: no model state dict"),
        "list.pth": (lambda p: torch.save([torch.ones(2)], p), "holds a list"),
        "module.pth": (lambda p: torch.save(nn.Linear(2, 2), p), "refuses to unpickle torch.nn.modules.linear.Linear"),
        "evil.pth": (lambda p: torch.save({"w": torch.ones(1), "x": _Evil(str(tmp_path / "pwned"))}, p),
                     "refuses to unpickle (os|posix).makedirs"),
    }
    for name, (write, pattern) in cases.items():
        write(tmp_path / name)
        with pytest.raises(PretrainedError, match=pattern) as e:
            load_pretrained(tmp_path / name)
        _one_line_error(e)
    assert not (tmp_path / "pwned").exists()


def test_other_architecture(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with pytest.raises(PretrainedError, match="not a ViT backbone state dict") as e:
        load_pretrained(path)
    _one_line_error(e)

    torch.manual_seed(8)
    small = RefViT(384, 2, 6, 16).state_dict()
    with pytest.raises(PretrainedError, match=r"do not fit vit_base.*shape mismatches") as e:
        load_pretrained(small, arch="vit_base")
    _one_line_error(e)
    # A named arch means its full depth: the 10 absent blocks are listed as missing.
    with pytest.raises(PretrainedError, match=r"missing keys \['blocks\.10\..*\(\+\d+ more\)") as e:
        load_pretrained(small, arch="vit_small")
    _one_line_error(e)
    with pytest.raises(PretrainedError, match=r"shape mismatches.*patch_embed\.proj\.weight"):
        load_pretrained(small, patch_size=8)
    extra = dict(small, **{"dist_token": torch.zeros(1, 1, 384)})
    with pytest.raises(PretrainedError, match=r"unexpected keys \['dist_token'\]"):
        load_pretrained(extra)
    with pytest.raises(PretrainedError, match="embed dim 100 matches no known arch"):
        load_pretrained({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16), "pos_embed": torch.zeros(1, 5, 100),
                         "cls_token": torch.zeros(1, 1, 100), "blocks.0.norm1.weight": torch.zeros(100)})
    with pytest.raises(TypeError):
        load_pretrained(42)
