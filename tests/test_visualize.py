"""CLS attention maps of the last block: values, the official mass threshold, PNG files; `dino-fast
visualize` with every official visualize_attention.py flag; the forward's compute dtype."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.errors import ConfigError, DataError
from dino_fast.eval.visualize import attention_mass_mask, cls_attention, colorize, main, visualize_attention
from dino_fast.models import build_backbone
from tests.helpers import assert_close, write_image


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16, depth=2).eval()


def reference_cls_attention(model, x: torch.Tensor) -> torch.Tensor:
    """Last block's CLS-row attention from the math: softmax(q_cls k^T / sqrt(d)) per head."""
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        for blk in model.blocks[:-1]:
            tokens = blk(tokens)
        last = model.blocks[-1]
        h = last.norm1(tokens)
        B, N, D = h.shape
        heads = last.attn.num_heads
        qkv = (h @ last.attn.qkv.weight.T + last.attn.qkv.bias).reshape(B, N, 3, heads, D // heads)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, N, d)
        scores = (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0] / (D // heads) ** 0.5  # (B, H, N)
        return scores.softmax(dim=-1)


@pytest.mark.parametrize("hw", [(64, 48), (96, 96), (70, 37)])
def test_cls_attention_values(vit, hw, device):
    import copy

    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 accuracy on CUDA too
        attn = cls_attention(copy.deepcopy(vit).to(device), x.to(device)).cpu()
    n = 1 + (hw[0] // 16) * (hw[1] // 16)
    assert attn.shape == (2, 3, n)
    assert_close(attn.sum(dim=-1), torch.ones(2, 3), name="row sums", rtol=0, atol=1e-5)
    assert_close(attn, reference_cls_attention(vit, x), name="CLS attention", rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cls_attention(vit, x[0])


def reference_mask(a: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entry i when the mass of all entries <= a_i exceeds 1 - threshold of the total."""
    a = a.double()
    below = (a[:, None, :] <= a[:, :, None]).double()  # (H, n, n): [h, i, j] = a_j <= a_i
    mass = (below * a[:, None, :]).sum(-1) / a.sum(-1, keepdim=True)
    return mass > 1 - threshold


@pytest.mark.parametrize("heads,n", [(3, 12), (6, 49), (12, 37), (1, 1)])
@pytest.mark.parametrize("threshold", [0.6, 0.3, 0.95])
def test_attention_mass_mask(heads, n, threshold):
    g = torch.Generator().manual_seed(heads * 100 + n)
    a = torch.rand(heads, n, generator=g) ** 3  # peaky, distinct values
    mask = attention_mass_mask(a, threshold)
    assert mask.dtype == torch.bool and mask.shape == (heads, n)
    assert torch.equal(mask, reference_mask(a, threshold))
    frac = (a * mask).sum(-1) / a.sum(-1)
    assert (frac >= threshold - 1e-6).all(), frac
    # minimal: dropping the smallest kept entry falls below the threshold
    smallest = torch.where(mask, a, torch.inf).min(dim=-1).values
    assert ((frac - smallest / a.sum(-1)) < threshold + 1e-6).all()
    with pytest.raises(ValueError, match="threshold"):
        attention_mass_mask(a, 1.5)


def test_colorize_range():
    v = np.array([[0.0, 0.5], [2.0, 1.0]])
    rgb = colorize(v)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [68, 1, 84] and rgb[1, 0].tolist() == [253, 231, 37]  # viridis ends
    flat = colorize(np.ones((3, 3)))  # constant map: one color, no division by zero
    assert len({tuple(px) for px in flat.reshape(-1, 3).tolist()}) == 1


def test_visualize_attention_files(tmp_path, vit):
    write_image(tmp_path / "in.jpg", 90, 70)
    out = tmp_path / "maps"
    paths = visualize_attention(vit, tmp_path / "in.jpg", out, image_size=(72, 56), threshold=0.6)
    heads = 3
    names = ["img.png", *[f"attn-head{j}.png" for j in range(heads)], "attn-mean.png", "attn-overlay.png",
             *[f"mask_th0.6_head{j}.png" for j in range(heads)]]
    assert [p.name for p in paths] == names and all(p.parent == out for p in paths)
    imgs = {}
    for p in paths:
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (48, 64), (p.name, im.size)  # resized to 72x56 (HxW), cropped to patch multiples
            imgs[p.name] = np.asarray(im)
    # the maps are those of the image the model saw
    from torchvision import transforms
    from dino_fast.eval.features import IMAGENET_MEAN, IMAGENET_STD

    x = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(Image.fromarray(imgs["img.png"])))
    attn = reference_cls_attention(vit, x[None])[0, :, 1:].reshape(heads, 4, 3)  # (H, 64/16, 48/16)
    for j in range(heads):
        r, c = divmod(int(attn[j].argmax()), 3)
        assert imgs[f"attn-head{j}.png"][r * 16 + 7, c * 16 + 7].tolist() == [253, 231, 37]  # the hottest patch
        keep = attention_mass_mask(attn[j].reshape(1, -1), 0.6).reshape(4, 3)
        keep_px = keep.repeat_interleave(16, 0).repeat_interleave(16, 1).numpy()
        changed = (imgs[f"mask_th0.6_head{j}.png"] != imgs["img.png"]).any(-1)
        assert not changed[~keep_px].any(), "pixels outside the mask must be the image's"
        assert changed[keep_px].mean() > 0.9, "the kept patches must be tinted"
    mean = attn.mean(0)
    r, c = divmod(int(mean.argmax()), 3)
    assert imgs["attn-mean.png"][r * 16 + 7, c * 16 + 7].tolist() == [253, 231, 37]


def test_visualize_errors(tmp_path, vit):
    out = tmp_path / "maps"
    with pytest.raises(DataError, match=f"^visualize: image not found: {tmp_path / 'missing.png'}$"):
        visualize_attention(vit, tmp_path / "missing.png", out)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        visualize_attention(vit, tmp_path / "bad.png", out)
    assert str(e.value).startswith(f"visualize: cannot decode image {tmp_path / 'bad.png'} (not an image, or corrupt")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=f"image path is not a file: {tmp_path}"):
        visualize_attention(vit, tmp_path, out)
    write_image(tmp_path / "ok.png", 40, 40)
    with pytest.raises(ConfigError, match="threshold"):
        visualize_attention(vit, tmp_path / "ok.png", out, threshold=0.0)
    with pytest.raises(ConfigError, match="smaller than one patch"):
        visualize_attention(vit, tmp_path / "ok.png", out, image_size=(8, 8))
    with pytest.raises(ConfigError, match="image_size must be one int or"):
        visualize_attention(vit, tmp_path / "ok.png", out, image_size=(0, 32))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"output_dir {tmp_path / 'file'} is a file"):
        visualize_attention(vit, tmp_path / "ok.png", tmp_path / "file")
    assert not out.exists(), "nothing may be written when the input is refused"


def test_main_non_image_is_one_line_naming_the_file(tmp_path, vit, capsys):
    """`dino-fast visualize` on a non-image: one line naming it, exit 2, nothing written."""
    from dino_fast.cli import main as cli_main
    from dino_fast.export import save_official_backbone

    weights = save_official_backbone(vit, tmp_path / "w.pth")
    (tmp_path / "notes.txt").write_text("hello")
    out = tmp_path / "o"
    argv = ["--pretrained_weights", str(weights), "--image_path", str(tmp_path / "notes.txt"), "--image_size", "48",
            "--output_dir", str(out), "--device", "cpu"]
    with pytest.raises(DataError, match=f"cannot decode image {tmp_path / 'notes.txt'}"):
        main(argv)
    assert cli_main(["visualize", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dino-fast: error: visualize: cannot decode image "
                                               f"{tmp_path / 'notes.txt'}"), err
    argv[3] = str(tmp_path / "nope.jpg")
    assert cli_main(["visualize", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"dino-fast: error: visualize: image not found: {tmp_path / 'nope.jpg'}"
    assert not out.exists()


def test_main_cli(tmp_path, vit):
    from dino_fast.export import save_official_backbone

    weights = save_official_backbone(vit, tmp_path / "w.pth")
    write_image(tmp_path / "in.png", 50, 50)
    rc = main(["--pretrained_weights", str(weights), "--image_path", str(tmp_path / "in.png"), "--image_size", "48",
               "--output_dir", str(tmp_path / "o"), "--threshold", "0.5", "--device", "cpu"])
    assert rc == 0
    assert (tmp_path / "o" / "attn-mean.png").is_file() and (tmp_path / "o" / "mask_th0.5_head2.png").is_file()


# ----------------------------------------------------------------------------- official command lines
def official_visualize_parser():
    """visualize_attention.py's parser, transcribed (help texts left out)."""
    import argparse

    parser = argparse.ArgumentParser('Visualize Self-Attention maps')
    parser.add_argument('--arch', default='vit_small', type=str, choices=['vit_tiny', 'vit_small', 'vit_base'])
    parser.add_argument('--patch_size', default=8, type=int)
    parser.add_argument('--pretrained_weights', default='', type=str)
    parser.add_argument("--checkpoint_key", default="teacher", type=str)
    parser.add_argument("--image_path", default=None, type=str)
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+")
    parser.add_argument('--output_dir', default='.')
    parser.add_argument("--threshold", type=float, default=None)
    return parser


def test_visualize_takes_every_official_flag():
    from dino_fast.eval.visualize import build_parser
    from tests.test_knn import assert_official_flags

    assert_official_flags(build_parser(), official_visualize_parser(), "visualize_attention.py")


def test_official_visualize_command_line(tmp_path, vit, capsys):
    """Every visualize_attention.py flag at its default (--threshold None: no masks, as there),
    then the image size shrunk; the arch/patch defaults differ from the weights: one warning."""
    from dino_fast.export import save_official_backbone

    weights = save_official_backbone(vit, tmp_path / "w.pth")
    write_image(tmp_path / "in.png", 50, 50)
    out = tmp_path / "o"
    argv = ["--arch", "vit_small", "--patch_size", "8", "--checkpoint_key", "teacher", "--image_size", "480", "480",
            "--output_dir", ".", "--pretrained_weights", str(weights), "--image_path", str(tmp_path / "in.png"),
            "--image_size", "48", "--output_dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    assert not list(out.glob("mask_th*")) and (out / "attn-head2.png").is_file()
    with pytest.raises(ConfigError, match="--image_path is needed"):
        main(["--pretrained_weights", str(weights), "--output_dir", str(out)])
    with pytest.raises(ConfigError, match="--pretrained_weights is needed"):
        main(["--image_path", str(tmp_path / "in.png"), "--output_dir", str(out)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_visualize_runs_in_the_given_dtype(tmp_path, vit, monkeypatch, dtype):
    import dino_fast.eval.visualize as visualize
    from tests.test_knn import record_autocast

    seen = record_autocast(monkeypatch, visualize, "cls_attention")
    write_image(tmp_path / "in.png", 40, 40)
    visualize_attention(vit, tmp_path / "in.png", tmp_path / "o", image_size=32, threshold=None, compute_dtype=dtype)
    assert seen == [dtype]
