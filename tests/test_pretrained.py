"""load_pretrained on every weights layout, the exports, and the one-line errors.

The reference is a small ViT written here from the official DINO
``vision_transformer.py`` (same key names, official position-embedding
interpolation, explicit attention), independent of dino_fast and timm.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone
from dino_fast.export import (export_official_backbone, export_timm_state_dict, save_official_backbone,
                              save_timm_state_dict, timm_model_name)
from dino_fast.pretrained import PretrainedError, detect_layout, infer_vit_config, load_pretrained
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
    """The single-file checkpoint of earlier dino_fast versions ("format": "dino_fast")."""
    from dino_fast.checkpoint import atomic_torch_save

    torch.manual_seed(6)
    wrappers = [MultiCropWrapper(build_backbone("vit_tiny", 16, depth=2), DINOHead(192, 32, hidden_dim=64,
                                                                                    bottleneck_dim=16))
                for _ in range(2)]
    student, teacher = wrappers
    opt = torch.optim.AdamW(student.parameters())
    state = {"format": "dino_fast", "student": student.state_dict(), "teacher": teacher.state_dict(),
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


def test_masked_image_modelling_backbone():
    """A backbone trained with iBOT-style masking holds a mask_token its forward never uses."""
    torch.manual_seed(9)
    model = build_backbone("vit_tiny", 16, depth=1, masked_im_modeling=True).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    loaded = load_pretrained(model.state_dict())
    assert not hasattr(loaded, "mask_token") or loaded.mask_token is None
    x = _images(9, 64)
    with torch.no_grad():
        assert_close(loaded(x), model(x), name="CLS of a masked-image-modelling backbone", **FP32)


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
    path = tmp_path / "vgg.pth"
    with torch.device("meta"):
        keys = list(torchvision.models.vgg11().state_dict())[:4]
    torch.save({k: torch.zeros(2) for k in keys}, path)
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


# ----------------------------------------------------------------------------- ResNet
class OfficialDINOHead(nn.Module):
    """facebookresearch/dino vision_transformer.DINOHead (init aside): same modules, same keys."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        for _ in range(nlayers - 2):
            layers.append(nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        with pytest.warns(FutureWarning):  # deprecated in torch, what the official code calls
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False


class OfficialMultiCropWrapper(nn.Module):
    """facebookresearch/dino utils.MultiCropWrapper.__init__ (its keys: backbone.*, head.*)."""

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head


class DDP(nn.Module):
    """What DistributedDataParallel adds to the keys: ``module.``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def official_has_batchnorms(model):
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    for name, module in model.named_modules():
        if isinstance(module, bn_types):
            return True
    return False


def official_load_pretrained_weights(model, pretrained_weights, checkpoint_key):
    """facebookresearch/dino utils.load_pretrained_weights (the file branch), with torch's
    default torch.load (weights_only=True since torch 2.6)."""
    state_dict = torch.load(pretrained_weights, map_location="cpu")
    if checkpoint_key is not None and checkpoint_key in state_dict:
        state_dict = state_dict[checkpoint_key]
    # remove `module.` prefix
    state_dict = {k.replace("module.", ""): v for k, v in state_dict.items()}
    # remove `backbone.` prefix induced by multicrop wrapper
    state_dict = {k.replace("backbone.", ""): v for k, v in state_dict.items()}
    return model.load_state_dict(state_dict, strict=False)


def official_eval_resnet(arch: str) -> nn.Module:
    """eval_knn.py / eval_linear.py: ``torchvision_models.__dict__[arch](num_classes=0); model.fc = nn.Identity()``."""
    import torchvision

    with warnings.catch_warnings():  # fc = Linear(2048, 0) warns that its init is a no-op
        warnings.simplefilter("ignore", UserWarning)
        model = torchvision.models.__dict__[arch](num_classes=0)
    model.fc = nn.Identity()
    return model


def _randomize_bn_(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine weights, so eval outputs depend on them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
                m.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("variant", ["released", "no_bn_counters", "with_fc"])
def test_released_resnet50_weights(tmp_path, variant, caplog):
    """dino_resnet50_pretrain.pth: a torchvision ResNet-50 state dict without fc (also: an older
    file without num_batches_tracked, a full classifier state dict whose fc is dropped)."""
    torch.manual_seed(20)
    ref = _randomize_bn_(official_eval_resnet("resnet50")).eval()
    sd = ref.state_dict()
    if variant == "no_bn_counters":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if variant == "with_fc":
        sd = dict(sd, **{"fc.weight": torch.randn(10, 2048), "fc.bias": torch.randn(10)})
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(sd, path)
    with caplog.at_level("INFO", logger="dino_fast.pretrained"):
        model = load_pretrained(path)
    if variant == "with_fc":
        assert "fc.weight" in caplog.text
    assert model.embed_dim == 2048 and not model.training and isinstance(model.fc, nn.Identity)
    x = _images(20, 32, batch=2)
    with torch.no_grad():
        assert_close(model(x), ref(x), name=f"resnet50 features ({variant})", **FP32)
    assert model.layer1[0].conv1.weight.data_ptr() != ref.layer1[0].conv1.weight.data_ptr()
    assert export_official_backbone(model).keys() == ref.state_dict().keys()
    assert timm_model_name(model) == "resnet50"


def test_resnet_timm_export(tmp_path):
    timm = pytest.importorskip("timm")
    from dino_fast.models import build_resnet

    torch.manual_seed(23)
    model = _randomize_bn_(build_resnet("resnet18")).eval()
    name = timm_model_name(model)
    assert name == "resnet18"
    tm = timm.create_model(name, pretrained=False, num_classes=0).eval()
    tm.load_state_dict(export_timm_state_dict(model), strict=True)
    x = _images(23, 32, batch=2)
    with torch.no_grad():
        assert_close(tm(x), model(x), name="timm resnet18(export(model))", **FP32)
        path = save_official_backbone(model, tmp_path / "resnet18.pth")
        assert_close(load_pretrained(path)(x), model(x), name="official resnet export reload", **FP32)


def test_resnet_arch_errors():
    import torchvision

    with torch.device("meta"):
        sd = torchvision.models.resnet18().state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    with pytest.raises(PretrainedError, match=r"arch 'vit_small' given but the weights are a resnet18") as e:
        load_pretrained(sd, arch="deit_small")
    _one_line_error(e)
    with pytest.raises(PretrainedError, match=r"do not fit resnet34.*missing keys") as e:
        load_pretrained(sd, arch="resnet34")
    _one_line_error(e)
    with pytest.raises(PretrainedError, match="not a ResNet state dict"):
        load_pretrained(RefViT(192, 1, 3, 16).state_dict(), arch="resnet50")
    with pytest.raises(PretrainedError, match="unknown arch 'vit_giant'"):
        load_pretrained(sd, arch="vit_giant")


def test_official_resnet_training_checkpoint(tmp_path):
    """An official ResNet run: BatchNorm -> the teacher is DDP-wrapped too, so both models'
    keys read module.backbone.* / module.head.*."""
    torch.manual_seed(21)
    models = {}
    for key in ("student", "teacher"):
        wrapper = OfficialMultiCropWrapper(_randomize_bn_(official_eval_resnet("resnet18")),
                                           OfficialDINOHead(512, 32, hidden_dim=64, bottleneck_dim=16))
        assert official_has_batchnorms(wrapper)
        models[key] = DDP(wrapper)
    ckpt = {"student": models["student"].state_dict(), "teacher": models["teacher"].state_dict(),
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 5,
            "args": argparse.Namespace(arch="resnet18", optimizer="lars"), "dino_loss": {"center": torch.zeros(1, 32)}}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    x = _images(21, 32, batch=2)
    for key in ("teacher", "student"):
        model = load_pretrained(path, key=key)
        ref = models[key].module.backbone.eval()
        with torch.no_grad():
            assert_close(model(x), ref(x), name=f"official resnet18 run [{key}]", **FP32)


# ----------------------------------------------------------------------------- official checkpoint writer
def _our_pair(arch: str, out_dim: int = 32, use_bn: bool = False):
    torch.manual_seed(22)
    if arch == "resnet18":
        from dino_fast.models import build_resnet

        backbones = [_randomize_bn_(build_resnet(arch)) for _ in range(2)]
    else:
        backbones = [build_backbone(arch, 16, depth=2) for _ in range(2)]
    dim = backbones[0].embed_dim
    student, teacher = (MultiCropWrapper(b, DINOHead(dim, out_dim, use_bn=use_bn, hidden_dim=64, bottleneck_dim=16))
                        for b in backbones)
    return student, teacher


@pytest.mark.parametrize("arch,use_bn,fp16", [("vit_tiny", False, False), ("vit_tiny", True, True),
                                              ("resnet18", False, True)])
def test_official_checkpoint_writer(tmp_path, arch, use_bn, fp16):
    from dino_fast.dino_loss import DINOLoss
    from dino_fast.official import save_official_checkpoint
    from dino_fast.optim import build_optimizer

    student, teacher = _our_pair(arch, use_bn=use_bn)
    optimizer = build_optimizer(student, "lars" if arch == "resnet18" else "adamw")
    student(_images(22, 32, batch=2)).sum().backward()
    optimizer.step()
    loss = DINOLoss(32, 4, 0.04, 0.07, 2, 5, impl="torch")
    loss.center.normal_()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if fp16 else None
    args = {"arch": arch, "patch_size": 16, "global_crops_scale": (0.4, 1.0), "output_dir": tmp_path,
            "nb": [1, 2], "use_fp16": fp16}
    path = save_official_checkpoint(
        tmp_path / "checkpoint.pth", student_sd=student.state_dict(), teacher_sd=teacher.state_dict(),
        optimizer_sd=optimizer.state_dict(), epoch=3, args_dict=args, dino_loss_sd=loss.state_dict(),
        fp16_scaler_sd=scaler.state_dict() if fp16 else None)

    ckpt = torch.load(path, map_location="cpu")  # plain torch.load, as the official scripts do
    expected = {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} | ({"fp16_scaler"} if fp16 else set())
    assert set(ckpt) == expected and ckpt["epoch"] == 3
    assert ckpt["args"] == dict(args, output_dir=str(tmp_path))
    assert_close(ckpt["dino_loss"]["center"], loss.center, name="center")
    if fp16:
        assert ckpt["fp16_scaler"]["scale"] == 1024.0

    # official main_dino.py: student = DDP(...); teacher = DDP(...) only if utils.has_batchnorms(student)
    bn = official_has_batchnorms(student)
    assert bn == (arch == "resnet18" or use_bn)
    official_student, official_teacher = DDP(copy.deepcopy(student)), copy.deepcopy(teacher)
    if bn:
        official_teacher = DDP(official_teacher)
    # restart_from_checkpoint loads them (strict here: every key must land)
    official_student.load_state_dict(ckpt["student"], strict=True)
    official_teacher.load_state_dict(ckpt["teacher"], strict=True)
    restored = copy.deepcopy(optimizer)
    restored.load_state_dict(ckpt["optimizer"])

    # official eval_knn.py / eval_linear.py: build the bare backbone, load_pretrained_weights
    if arch == "resnet18":
        backbone = official_eval_resnet(arch)
    else:
        backbone = RefViT(192, 2, 3, 16)
    for key, ours in (("teacher", teacher), ("student", student)):
        msg = official_load_pretrained_weights(backbone, path, key)
        assert msg.missing_keys == [], msg
        assert all(k.startswith("head.") for k in msg.unexpected_keys), msg
        x = _images(23, 32, batch=2)
        with torch.no_grad():
            ref = backbone.eval()(x)
            assert_close(ours.backbone.eval()(x), ref, name=f"official eval of our {key}", **FP32)
            assert_close(load_pretrained(ckpt, key=key)(x), ref, name=f"load_pretrained [{key}]", **FP32)


def test_official_checkpoint_writer_rejects_bad_parts():
    from dino_fast.official import to_official_checkpoint

    student, teacher = _our_pair("vit_tiny")
    good = dict(student_sd=student.state_dict(), teacher_sd=teacher.state_dict(),
                optimizer_sd={"state": {}, "param_groups": []}, epoch=1, args_dict={"arch": "vit_tiny"},
                dino_loss_sd={"center": torch.zeros(1, 32)})
    # DDP / compile prefixes on the way in are normalised to the official ones
    wrapped = {f"module._orig_mod.{k}": v for k, v in student.state_dict().items()}
    out = to_official_checkpoint(**dict(good, student_sd=wrapped))
    assert out["student"].keys() == {f"module.{k}" for k in student.state_dict()}
    assert out["teacher"].keys() == teacher.state_dict().keys() and "fp16_scaler" not in out
    assert argparse.Namespace(**out["args"]).arch == "vit_tiny"
    with pytest.raises(ValueError, match="not a MultiCropWrapper state dict"):
        to_official_checkpoint(**dict(good, teacher_sd=teacher.backbone.state_dict()))
    with pytest.raises(TypeError, match="args.*object"):
        to_official_checkpoint(**dict(good, args_dict={"args": object()}))
    with pytest.raises(ValueError, match="center"):
        to_official_checkpoint(**dict(good, dino_loss_sd={}))
    with pytest.raises(ValueError, match="optimizer_sd"):
        to_official_checkpoint(**dict(good, optimizer_sd={}))


# ----------------------------------------------------------------------------- hubconf
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB = [("dino_vits16", 384, 6, 16), ("dino_vits8", 384, 6, 8), ("dino_vitb16", 768, 12, 16),
       ("dino_vitb8", 768, 12, 8)]


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("name,dim,heads,patch", HUB)
def test_hub_vits(name, dim, heads, patch, no_download):
    model = torch.hub.load(REPO, name, source="local", pretrained=False, depth=2)  # depth: a cheap build
    assert (model.embed_dim, model.blocks[0].attn.num_heads, model.patch_size, len(model.blocks)) == \
        (dim, heads, patch, 2)
    with pytest.raises(ValueError, match="never downloads.*dl.fbaipublicfiles.com/dino/"):
        torch.hub.load(REPO, name, source="local", pretrained=True, depth=1)


def test_hub_vits16_local_weights(tmp_path, no_download):
    torch.manual_seed(30)
    ref = RefViT(384, 2, 6, 16).eval()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(ref.state_dict(), path)
    model = torch.hub.load(REPO, "dino_vits16", source="local", weights=str(path), depth=2, num_classes=0).eval()
    x = _images(30, 64)
    with torch.no_grad():
        assert_close(model(x), ref(x), name="hub dino_vits16(weights=...)", **FP32)
    with pytest.raises(PretrainedError, match="missing keys"):  # the full-depth model: strict keys
        torch.hub.load(REPO, "dino_vits16", source="local", weights=str(path))


def test_hub_resnet50(tmp_path, no_download):
    model = torch.hub.load(REPO, "dino_resnet50", source="local")
    assert model.embed_dim == 2048 and isinstance(model.fc, nn.Identity)
    torch.manual_seed(31)
    ref = _randomize_bn_(official_eval_resnet("resnet50")).eval()
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(ref.state_dict(), path)
    model = torch.hub.load(REPO, "dino_resnet50", source="local", weights=path).eval()
    x = _images(31, 32, batch=2)
    with torch.no_grad():
        assert_close(model(x), ref(x), name="hub dino_resnet50(weights=...)", **FP32)


OFFICIAL_HUB_NAMES = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_xcit_small_12_p16",
                      "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16", "dino_xcit_medium_24_p8", "dino_resnet50"]


def test_hub_has_every_official_entry(no_download):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(REPO, "hubconf.py"))
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert all(callable(getattr(hub, name, None)) for name in OFFICIAL_HUB_NAMES)


# ----------------------------------------------------------------------------- XCiT
def official_xcit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm XCiT's weights under the facebookresearch/xcit names (xcit.py; the released
    dino_xcit_*_pretrain.pth): ``pos_embeder.*`` for timm's ``pos_embed.*``, and one class-attention
    ``qkv`` Linear for timm's ``q``, ``k``, ``v`` (official ``qkv(x).reshape(B, N, 3, heads, C // heads)``:
    the q rows, then k, then v)."""
    src, out = model.state_dict(), {}
    for k, v in src.items():
        if k.startswith("pos_embed."):
            out["pos_embeder." + k[len("pos_embed."):]] = v
        elif k.startswith("cls_attn_blocks.") and ".attn.q." in k:
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat([v, src[k.replace(".attn.q.", ".attn.k.")],
                                                                  src[k.replace(".attn.q.", ".attn.v.")]])
        elif not (k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k)):
            out[k] = v
    return out


def _xcit(arch: str = "xcit_small_12_p16", seed: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn_(build_backbone(arch, depth=1)).eval()


@pytest.mark.parametrize("layout", ["released", "official_training"])
def test_official_xcit_weights(layout):
    """Official XCiT weights (the released file, or an official run whose teacher is DDP-wrapped
    because XCiT has BatchNorm) load strictly into timm's XCiT and give its features."""
    from timm.models.xcit import checkpoint_filter_fn

    from dino_fast.models import xcit_official_keys, xcit_timm_keys

    ref = _xcit()
    sd = official_xcit_state_dict(ref)
    assert "pos_embeder.token_projection.weight" in sd and "cls_attn_blocks.1.attn.qkv.weight" in sd
    mapped = xcit_timm_keys(sd)
    timm_mapped = checkpoint_filter_fn(dict(sd), ref)  # timm's own reading of the official names
    assert set(mapped) == set(timm_mapped) == set(ref.state_dict())
    assert all(torch.equal(mapped[k], timm_mapped[k]) for k in mapped)
    back = xcit_official_keys(mapped)  # the way back, for an official-layout export
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    if layout == "official_training":
        teacher = {f"module.backbone.{k}": v for k, v in sd.items()} | fake_head(384, prefix="module.head.")
        sd = {"teacher": teacher, "student": teacher, "epoch": 1}
    model = load_pretrained(sd)
    assert type(model) is type(ref) and len(model.blocks) == 1 and model.embed_dim == 384
    x = _images(40, 48, batch=2)
    with torch.no_grad():
        assert_close(model(x), ref(x), name=f"official XCiT ({layout})", **FP32)
    with pytest.raises(PretrainedError, match="missing keys"):  # a named arch is its full 12 blocks
        load_pretrained(sd, arch="xcit_small_12_p16")
    with pytest.raises(PretrainedError, match="weights are a xcit_small_12_p16"):
        load_pretrained(sd, arch="xcit_medium_24_p16")


@pytest.mark.parametrize("name,dim,patch", [("dino_xcit_small_12_p16", 384, 16), ("dino_xcit_small_12_p8", 384, 8),
                                            ("dino_xcit_medium_24_p16", 512, 16), ("dino_xcit_medium_24_p8", 512, 8)])
def test_hub_xcit(tmp_path, name, dim, patch, no_download):
    """The official XCiT entries build timm's XCiT (num_classes=0), read the released file's names,
    and never download."""
    model = torch.hub.load(REPO, name, source="local", depth=1, num_classes=0)  # depth: a cheap build
    assert (model.embed_dim, model.patch_embed.patch_size, len(model.blocks)) == (dim, patch, 1)
    with pytest.raises(ValueError, match="never downloads.*dl.fbaipublicfiles.com/dino/"):
        torch.hub.load(REPO, name, source="local", pretrained=True, depth=1)
    ref = _xcit(name.removeprefix("dino_"), seed=41)
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(official_xcit_state_dict(ref), path)
    model = torch.hub.load(REPO, name, source="local", weights=path, depth=1).eval()
    x = _images(41, 32, batch=2)
    with torch.no_grad():
        assert_close(model(x), ref(x), name=f"hub {name}(weights=...)", **FP32)
