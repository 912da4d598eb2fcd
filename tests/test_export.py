"""Exports of a 32-px run read by the official code and by timm, and the official-layout writer
taking the parts it needs (not the trainer).

A run trained on 32-px crops with patch 16 has a 2x2 position-embedding grid; the official
``vision_transformer.vit_tiny`` (and timm's default ``vit_tiny_patch16_224``) are built at 224 px,
a 14x14 grid, and load ``pos_embed`` by shape. Every export writes it on the 14x14 grid (official
bicubic +0.1 rule). Checked here with the official loading code (``RefViT`` and
``official_load_pretrained_weights``, transcribed in tests/test_pretrained.py):

- at 224 px the official model gives our features within fp32 rounding: our model resizes its
  2x2 grid to 14x14 with the same rule, so both add the same embedding;
- at the training size (32 px) the official model resizes 14x14 back to 2x2 (bicubic, +0.1):
  upsampling then downsampling is not the identity (the +0.1 rule samples the 14x14 grid about
  0.1 cell off the original centres, and the cubic kernel smooths twice), so the embedding it
  adds differs from ours by about 10 % of the embedding (a random one; smoother when trained).
  On the normed CLS features (entries up to ~3.5) that measured at most 1.3e-2 absolute, 0.34 %
  of the features' norm (vit_tiny/16 and /8, 2 and 10 steps, CPU fp32); ``ROUND_TRIP`` allows
  3e-2. At 64 px the difference is 1.8e-3; at 224 px 3e-6 (fp32 rounding).
"""
from __future__ import annotations

import logging

import pytest
import torch

from dino_fast.export import export_checkpoint, main, write_official_checkpoint
from dino_fast.models import DINOHead, MultiCropWrapper, build_backbone, interpolate_pos_encoding
from dino_fast.official import describe_official_grid, to_official_checkpoint, to_official_grid
from dino_fast.pretrained import load_pretrained
from tests.helpers import assert_close
from tests.test_pretrained import RefViT, official_load_pretrained_weights

FP32 = dict(rtol=1e-4, atol=1e-5)  # fp32, different op order (fused vs explicit attention, matmul vs interpolate)
ROUND_TRIP = dict(rtol=0.0, atol=3e-2)  # 14x14 -> 2x2 bicubic of a 2x2 -> 14x14 bicubic (module docstring)


def _images(seed: int, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def run32(demo_root, tmp_path_factory):
    """Two steps of a vit_tiny/16 (full depth, as timm's and the official default) on 32-px crops,
    with --save_official_checkpoint: (output folder, checkpoint directory)."""
    from dino_fast.train import Trainer
    from tests.test_train import tiny_cfg

    out = tmp_path_factory.mktemp("run32")
    cfg = tiny_cfg(demo_root, out, depth=0, patch_size=16, max_steps=2, save_official_checkpoint=True)
    Trainer(cfg).fit()
    return out, out / "checkpoints" / "step-00000002"


def _official_vit_tiny() -> RefViT:
    return RefViT(192, 12, 3, 16, img_size=224).eval()  # official vits.vit_tiny(patch_size=16)


def _check_official_features(official: RefViT, ours: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        x = _images(1, 224)
        assert_close(official(x), ours(x), name=f"{name} @ 224 px (the official eval size)", **FP32)
        x = _images(2, 32)
        assert_close(official(x), ours(x), name=f"{name} @ 32 px (training size, grid round trip)", **ROUND_TRIP)


@pytest.mark.parametrize("fmt", ["official", "released", "save_official_checkpoint"])
def test_official_tools_load_a_32px_run(run32, tmp_path, fmt, capsys):
    out, ckpt = run32
    ours = load_pretrained(ckpt).eval()  # our teacher on its 2x2 grid
    assert ours.pos_embed.shape == (1, 5, 192)
    if fmt == "save_official_checkpoint":
        path = out / "checkpoint.pth"
    else:
        path = tmp_path / f"{fmt}.pth"
        assert main(["--checkpoint", str(ckpt), "--format", fmt, "--output", str(path)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines == [f"wrote {path}: " + ("official main_dino.py checkpoint layout" if fmt == "official" else
                                              "official released backbone layout (teacher)")
                         + "; pos_embed resized 2x2 -> 14x14 (official bicubic) for the official 224-px models"]
    official = _official_vit_tiny()
    msg = official_load_pretrained_weights(official, path, "teacher")  # utils.load_pretrained_weights
    assert msg.missing_keys == [] and all(k.startswith("head.") for k in msg.unexpected_keys), msg
    if fmt == "released":
        official.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
    _check_official_features(official, ours, fmt)


def test_timm_default_224_model_loads_a_32px_run(run32, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    _, ckpt = run32
    path = tmp_path / "timm.pth"
    assert main(["--checkpoint", str(ckpt), "--format", "timm", "--output", str(path)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {path}: timm vit_tiny_patch16_224 state dict (teacher); pos_embed resized 2x2 -> 14x14 (official "
        f"bicubic) for the official 224-px models")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    model.load_state_dict(torch.load(path, map_location="cpu"), strict=True)
    ours = load_pretrained(ckpt).eval()
    with torch.no_grad():
        x = _images(3, 224)
        assert_close(model(x), ours(x), name="timm vit_tiny_patch16_224 @ 224 px", **FP32)


def test_export_at_the_official_size_keeps_the_grid(tmp_path, capsys):
    """A backbone trained at 224 px: nothing is resized, and the line says so."""
    torch.manual_seed(5)
    backbone = build_backbone("vit_tiny", 16, depth=1)
    sd = backbone.state_dict()
    assert describe_official_grid(sd) == "pos_embed kept on its 14x14 grid (the official 224-px models' own)"
    assert torch.equal(to_official_grid(sd)["pos_embed"], sd["pos_embed"])
    from dino_fast.models import build_resnet

    assert describe_official_grid(build_resnet("resnet18").state_dict()) == "no pos_embed (a convnet): nothing resized"


@pytest.mark.parametrize("img_size,patch", [(32, 16), (48, 8), (96, 16)])
def test_to_official_grid_is_the_official_interpolation(img_size, patch):
    torch.manual_seed(img_size + patch)
    sd = build_backbone("vit_tiny", patch, depth=1, img_size=img_size).state_dict()
    out = to_official_grid(sd)
    side = 224 // patch
    assert out["pos_embed"].shape == (1, 1 + side * side, 192)
    assert_close(out["pos_embed"], interpolate_pos_encoding(sd["pos_embed"], side, side), name="resized pos_embed")
    assert all(torch.equal(out[k], v) for k, v in sd.items() if k != "pos_embed")
    # what the official model does at 224 px with the resized grid: the grid unchanged (already 14x14)
    assert torch.equal(interpolate_pos_encoding(out["pos_embed"], side, side), out["pos_embed"])


# ----------------------------------------------------------------------------- the writer takes parts
def _pair(img_size: int):
    torch.manual_seed(7)
    return [MultiCropWrapper(build_backbone("vit_tiny", 16, depth=1, img_size=img_size),
                             DINOHead(192, 32, hidden_dim=64, bottleneck_dim=16)) for _ in range(2)]


@pytest.mark.parametrize("img_size", [224, 32])
def test_write_official_checkpoint_takes_parts(tmp_path, img_size, caplog):
    student, teacher = _pair(img_size)
    optimizer = torch.optim.AdamW(student.parameters())
    student(_images(7, 32)).sum().backward()
    optimizer.step()
    parts = dict(optimizer_sd=optimizer.state_dict(), epoch=3, config={"arch": "vit_tiny"},
                 dino_loss_sd={"center": torch.randn(1, 32)}, scaler_sd=None)
    # another rank: gathers (a collective when sharded), writes nothing
    assert write_official_checkpoint(tmp_path / "a", student=student, teacher=teacher, write=False, **parts) is None
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.INFO, logger="dino_fast.export"):
        path = write_official_checkpoint(tmp_path / "a", student=student, teacher=teacher.state_dict(), write=True,
                                         snapshot_epoch=2, **parts)  # a module or a full state dict
    assert path == tmp_path / "a" / "checkpoint.pth" and (tmp_path / "a" / "checkpoint0002.pth").is_file()
    ckpt = torch.load(path, map_location="cpu")
    expected = to_official_checkpoint(student.state_dict(), teacher.state_dict(), optimizer.state_dict(), 3,
                                      {"arch": "vit_tiny"}, parts["dino_loss_sd"])
    assert ckpt.keys() == expected.keys() and ckpt["epoch"] == 3
    for name in ("student", "teacher"):
        assert all(torch.equal(ckpt[name][k], v) for k, v in expected[name].items())
    assert ckpt["teacher"]["backbone.pos_embed"].shape == (1, 197, 192)
    # the optimizer's pos_embed moments are on the trained grid: left out when the grid is resized
    assert (ckpt["optimizer"]["state"] == {}) == (img_size != 224)
    line = [r.message for r in caplog.records if "official layout" in r.message]
    assert len(line) == 1 and ("resized 2x2 -> 14x14" in line[0]) == (img_size == 32), line


def test_export_checkpoint_rejects_a_file(tmp_path):
    from dino_fast.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError, match="--format 'onnx'"):
        export_checkpoint(tmp_path, "onnx", tmp_path / "x.pth")
    (tmp_path / "f.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        export_checkpoint(tmp_path / "f.pth", "official", tmp_path / "x.pth")
