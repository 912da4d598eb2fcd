"""DALI multi-crop loader: contract, per-sample augmentation statistics, pixel-level
checks against plain-torch / torchvision references, order, sharding, bad files.

Runs the CPU mode (CI, no GPU); the GPU mode runs the same checks under
``@requires_cuda``. Images are tiny (<= 64 px) and generated per test session.
"""
from __future__ import annotations

import colorsys
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia.dali is not installed")

from dino_fast.data.dali import PARAM_NAMES, DALIMultiCropLoader, dali_available  # noqa: E402
from dino_fast.data.dali_validate import validate_image_file  # noqa: E402
from dino_fast.data.folder import CorruptImageWarning, DataError, ImageFolderDataset  # noqa: E402
from tests.helpers import requires_cuda  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
LOCALS = 4  # local crops in the statistics runs: V = 6
Z = 4.5  # binomial tolerance in standard deviations


def _pixels(view: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalization: (B, 3, H, W) in uint8 units (float64)."""
    return (view.double().cpu() * STD.double() + MEAN.double()) * 255.0


def _write_tree(root: Path, images: list[np.ndarray], classes: int, ext: str = "png") -> Path:
    for k, img in enumerate(images):
        folder = root / f"class_{k % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"img_{k:03d}.{ext}")
    return root


def _run(loader: DALIMultiCropLoader, epochs: int = 1) -> list[tuple]:
    out = []
    for _ in range(epochs):
        out.extend(loader)
    return out


def _cat_params(batches: list[tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[2][k] for b in batches]) for k in batches[0][2]}


def _loader(root: Path, batch_size: int, **kw) -> DALIMultiCropLoader:
    kw.setdefault("device", "cpu")
    kw.setdefault("num_threads", 2)
    return DALIMultiCropLoader(root, batch_size, **kw)


# --- datasets -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """36 JPEG noise images, 3 classes, non-square (48x40)."""
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(36)]
    return _write_tree(tmp_path_factory.mktemp("jpeg"), imgs, classes=3, ext="jpg")


@pytest.fixture(scope="module")
def const_root(tmp_path_factory) -> Path:
    """Constant-colour PNGs: crop, resize, blur and flip leave them unchanged, so each
    output pixel is exactly the colour ops applied to the known colour. Moderate
    colours (grey 60..140 +- 20 per channel) so no torchvision op clamps."""
    rng = np.random.default_rng(2)
    imgs = []
    for _ in range(32):
        colour = rng.integers(60, 141) + rng.integers(-20, 21, size=3)
        imgs.append(np.broadcast_to(colour.astype(np.uint8), (36, 44, 3)).copy())
    return _write_tree(tmp_path_factory.mktemp("const"), imgs, classes=2)


@pytest.fixture(scope="module")
def texture_root(tmp_path_factory) -> Path:
    """PNGs with a left-to-right luma ramp (0..160) plus strong colour noise: flips
    reverse the ramp, blur removes the noise, grayscale removes the colour."""
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 160, 64)[None, :, None]
    imgs = [np.clip(40 + ramp + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(32)]
    return _write_tree(tmp_path_factory.mktemp("texture"), imgs, classes=2)


@pytest.fixture(scope="module")
def const_run(const_root):
    loader = _loader(const_root, 16, local_crops_number=LOCALS, global_crops_size=24, local_crops_size=12,
                     return_params=True, seed=5)
    return loader, _run(loader, epochs=8)


@pytest.fixture(scope="module")
def texture_run(texture_root):
    loader = _loader(texture_root, 16, local_crops_number=LOCALS, global_crops_size=32, local_crops_size=16,
                     return_params=True, seed=7)
    return loader, _run(loader, epochs=2)


# --- contract -----------------------------------------------------------------------------------------------

def test_dali_available():
    assert dali_available()


def test_views_shapes_dtype_labels_and_range(jpeg_root):
    loader = _loader(jpeg_root, 8, local_crops_number=2, global_crops_size=32, local_crops_size=16,
                     return_params=True)
    batches = _run(loader)
    assert len(batches) == len(loader) == 36 // 8
    lo = ((0 - MEAN) / STD).view(3)
    hi = ((1 - MEAN) / STD).view(3)
    for views, labels, params in batches:
        assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in views)
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        for v in views:
            assert torch.isfinite(v).all()
            per_channel = v.transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
        for idx, label in zip(params["index"].tolist(), labels.tolist()):  # label = class folder of that file
            path, expected = loader.samples[idx]
            assert label == expected == loader.class_to_idx[Path(path).parent.name]
    seen = torch.cat([b[2]["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen)  # one epoch, no repeats (drop policy)


def test_build_train_data_dali(jpeg_root):
    """The trainer's builder: config -> DALI loader with the config's values, views in the training dtype."""
    from dino_fast.config import TrainConfig
    from dino_fast.data.build import build_train_data

    cfg = TrainConfig.from_dict(dict(data_path=str(jpeg_root), data_backend="dali", batch_size_per_gpu=4,
                                     global_crops_scale=(0.5, 1.0), local_crops_scale=(0.1, 0.3),
                                     local_crops_number=3, global_crops_size=32, local_crops_size=16, patch_size=8,
                                     num_workers=2, seed=3))
    data = build_train_data(cfg, torch.device("cpu"), rank=1, world=2, compute_dtype=torch.bfloat16)
    loader = data.loader
    assert data.backend == "dali" and "bfloat16" in data.describe()
    assert (loader.batch_size, loader.num_views, loader.shard_id, loader.num_shards, loader.seed) == (4, 5, 1, 2, 3)
    assert (loader.global_crops_scale, loader.local_crops_scale) == ((0.5, 1.0), (0.1, 0.3))
    assert data.num_batches == len(loader) == 36 // 8
    batches = list(data.epoch(1, start_batch=2))
    assert len(batches) == 2
    assert [tuple(v.shape) for v in batches[0]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(v.dtype == torch.bfloat16 and v.is_contiguous() for v in batches[0])


def test_recipe_is_what_the_loader_draws(jpeg_root, monkeypatch):
    """The loader's per-view probabilities come from dino_fast.data.recipe (changed there, changed here)."""
    from dino_fast.data import recipe

    monkeypatch.setattr(recipe, "BLUR_P", (0.0, 1.0, 0.0))
    monkeypatch.setattr(recipe, "SOLARIZE_P", (1.0, 0.0, 0.0))
    prm = _cat_params(_run(_loader(jpeg_root, 12, local_crops_number=2, global_crops_size=16, local_crops_size=8,
                                   return_params=True)))
    assert prm["blur"].tolist() == [[False, True, False, False]] * 36
    assert prm["solarize"].tolist() == [[True, False, False, False]] * 36


def test_bf16_views_match_fp32(jpeg_root):
    kw = dict(local_crops_number=1, global_crops_size=16, local_crops_size=8, seed=3)
    v32, _ = next(iter(_loader(jpeg_root, 8, **kw)))
    v16, _ = next(iter(_loader(jpeg_root, 8, dtype=torch.bfloat16, **kw)))
    for a, b in zip(v32, v16):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-2)


# --- pixel-level checks -------------------------------------------------------------------------------------

def _yiq_hue(img: torch.Tensor, h: float) -> torch.Tensor:
    """Hue shift by ``h`` of a turn as a rotation of the YIQ chroma plane, (3, H, W) in [0, 1].
    In YIQ, rotating (I, Q) by +phi lowers the HSV hue, hence the -2*pi*h."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
    phi = -2 * math.pi * h
    rot = torch.tensor([[1, 0, 0], [0, math.cos(phi), -math.sin(phi)], [0, math.sin(phi), math.cos(phi)]],
                       dtype=torch.float64)
    m = torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq
    return torch.einsum("ij,jhw->ihw", m, img.double())


def _reference_colour(rgb: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    """The colour ops on a constant (3,) colour in uint8 units, written with torchvision's
    functional ops (brightness, contrast about the mean luma, saturation, grayscale) and
    the YIQ hue rotation; then PIL's solarize."""
    img = (rgb.double() / 255.0).view(3, 1, 1)
    if p["color_jitter"]:
        img = TF.adjust_brightness(img, p["brightness"])
        img = TF.adjust_contrast(img, p["contrast"])
        img = TF.adjust_saturation(img, p["saturation"])
        img = _yiq_hue(img, p["hue"])
    if p["grayscale"]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    v = (img.view(3) * 255.0).clamp(0, 255).round()
    if p["solarize"]:
        v = torch.where(v >= 128, 255 - v, v)
    return v


def _source_colour(loader: DALIMultiCropLoader, index: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(loader.samples[index][0]))[0, 0].astype(np.float64))


def _check_colour_ops(loader: DALIMultiCropLoader, batches: list[tuple]) -> None:
    worst, count = 0.0, 0
    for views, _, params in batches:
        for v, view in enumerate(views):
            px = _pixels(view)  # (B, 3, H, W)
            flat = px.flatten(2)
            assert (flat.amax(2) - flat.amin(2)).max() < 1e-3, "a constant image did not stay constant"
            for i in range(px.shape[0]):
                p = {k: params[k][i, v].item() for k in PARAM_NAMES}
                expected = _reference_colour(_source_colour(loader, params["index"][i].item()), p)
                diff = (px[i, :, 0, 0] - expected).abs().max().item()
                assert diff <= 1.0 + 1e-3, (f"view {v} sample {i}: got {px[i, :, 0, 0].tolist()}, "
                                            f"expected {expected.tolist()} for {p}")
                worst, count = max(worst, diff), count + 1
    print(f"colour ops: {count} views, worst |diff| {worst:.3f} uint8 levels")


def test_colour_ops_match_reference(const_run):
    """Jitter (b, c, s, hue), grayscale, solarize and normalization, pixel for pixel."""
    _check_colour_ops(*const_run)


def test_hue_moves_hsv_hue_in_the_drawn_direction(const_run):
    loader, batches = const_run
    checked = 0
    for views, _, params in batches:
        px = _pixels(views[0])[:, :, 0, 0]
        for i in range(px.shape[0]):
            h = params["hue"][i, 0].item()
            if params["grayscale"][i, 0] or abs(h) < 0.03:
                continue
            src = _source_colour(loader, params["index"][i].item())
            h0 = colorsys.rgb_to_hsv(*(src / 255).tolist())[0]
            h1 = colorsys.rgb_to_hsv(*(px[i].clamp(0, 255) / 255).tolist())[0]
            shift = (h1 - h0 + 0.5) % 1.0 - 0.5
            assert shift * h > 0, f"hue drawn {h:+.3f} of a turn moved the HSV hue by {shift:+.3f}"
            checked += 1
    assert checked >= 20


def test_grayscale_equal_channels_else_colour(texture_run):
    _, batches = texture_run
    n_gray = 0
    for views, _, params in batches:
        for v, view in enumerate(views):
            px = _pixels(view)
            spread = (px.amax(1) - px.amin(1)).flatten(1).amax(1)  # max channel spread per sample
            gray = params["grayscale"][:, v]
            assert (spread[gray] < 1e-3).all(), f"view {v}: grayscale sample with unequal channels"
            assert (spread[~gray] > 3).all(), f"view {v}: colour sample came out gray"
            n_gray += int(gray.sum())
    assert n_gray > 0


def test_flip_reverses_the_ramp(texture_run):
    """The source luma rises left to right; a flipped view must fall. Solarized views are skipped."""
    _, batches = texture_run
    agree = total = 0
    for views, _, params in batches:
        for v, view in enumerate(views):
            luma = (_pixels(view) * LUMA).sum(1)
            w = luma.shape[-1]
            falls = luma[..., : w // 2].mean((1, 2)) > luma[..., w - w // 2:].mean((1, 2))
            keep = ~params["solarize"][:, v]
            agree += int((falls == params["flip"][:, v])[keep].sum())
            total += int(keep.sum())
    assert agree / total >= 0.95, f"flip record matches the pixels in only {agree}/{total} views"


def test_blur_smooths(texture_run):
    """Neighbour differences (per unit of b*c) drop where a blur with sigma > 1.2 ran."""
    _, batches = texture_run
    blurred, sharp = [], []
    for views, _, params in batches:
        for v in range(2, len(views)):  # locals: blur p=0.5, no solarize
            luma = (_pixels(views[v]) * LUMA).sum(1)
            tv = (luma[..., 1:] - luma[..., :-1]).abs().mean((1, 2))
            tv = tv / (params["brightness"][:, v] * params["contrast"][:, v]).double()
            blur, sigma = params["blur"][:, v], params["blur_sigma"][:, v]
            blurred += tv[blur & (sigma > 1.2)].tolist()
            sharp += tv[~blur].tolist()
    assert len(blurred) >= 5 and len(sharp) >= 5
    ratio = float(np.median(blurred) / np.median(sharp))
    assert ratio < 0.6, f"blurred/sharp neighbour difference ratio {ratio:.2f}"


# --- statistics of the per-sample draws ---------------------------------------------------------------------

def _assert_rate(coins: torch.Tensor, p: float, name: str) -> None:
    n = coins.numel()
    rate = coins.float().mean().item()
    tol = Z * math.sqrt(p * (1 - p) / n) if 0 < p < 1 else 0.0
    assert abs(rate - p) <= tol, f"{name}: rate {rate:.3f} over {n} draws, expected {p} +- {tol:.3f}"


def test_augmentation_probabilities(const_run):
    _, batches = const_run
    prm = _cat_params(batches)
    n = prm["flip"].shape[0]
    assert n >= 200
    _assert_rate(prm["flip"], 0.5, "flip")
    _assert_rate(prm["color_jitter"], 0.8, "color_jitter")
    _assert_rate(prm["grayscale"], 0.2, "grayscale")
    _assert_rate(prm["blur"][:, 0], 1.0, "blur global 1")
    _assert_rate(prm["blur"][:, 1], 0.1, "blur global 2")
    _assert_rate(prm["blur"][:, 2:], 0.5, "blur locals")
    _assert_rate(prm["solarize"][:, 1], 0.2, "solarize global 2")
    _assert_rate(prm["solarize"][:, [0] + list(range(2, 2 + LOCALS))], 0.0, "solarize elsewhere")


def test_draws_are_per_sample_and_per_view(const_run):
    _, batches = const_run
    for views, _, params in batches:  # p=0.5: a per-batch coin would make every batch uniform
        assert 0 < params["flip"][:, 0].sum() < params["flip"].shape[0]
    prm = _cat_params(batches)
    same = (prm["flip"][:, 0] == prm["flip"][:, 1]).float()
    _assert_rate(same, 0.5, "flip agreement between the two global views")


def test_factor_ranges(const_run):
    _, batches = const_run
    prm = _cat_params(batches)
    on, blur = prm["color_jitter"], prm["blur"]
    for name, (lo, hi) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2),
                           "hue": (-0.1, 0.1)}.items():
        x = prm[name]
        assert x[on].min() >= lo - 1e-6 and x[on].max() <= hi + 1e-6, name
        assert abs(x[on].mean().item() - (lo + hi) / 2) < Z * (hi - lo) / math.sqrt(12 * on.sum().item()), name
        identity = 0.0 if name == "hue" else 1.0
        assert (x[~on] == identity).all(), f"{name} not identity where jitter is off"
    sigma = prm["blur_sigma"]
    assert sigma[blur].min() >= 0.1 - 1e-6 and sigma[blur].max() <= 2.0 + 1e-6 and (sigma[~blur] == 0).all()


# --- order, determinism, sharding ---------------------------------------------------------------------------

def test_deterministic_with_seed(jpeg_root):
    kw = dict(local_crops_number=1, global_crops_size=16, local_crops_size=8, return_params=True)
    a = _run(_loader(jpeg_root, 8, seed=11, **kw))
    b = _run(_loader(jpeg_root, 8, seed=11, num_threads=1, **kw))
    c = _run(_loader(jpeg_root, 8, seed=12, **kw))
    for (va, la, pa), (vb, lb, pb) in zip(a, b):
        assert torch.equal(la, lb) and all(torch.equal(pa[k], pb[k]) for k in pa)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    assert not all(torch.equal(x[0][0], y[0][0]) for x, y in zip(a, c))


def test_order_per_epoch_set_epoch_and_resume(jpeg_root):
    from dino_fast.data.sampling import ResumableSampler

    kw = dict(local_crops_number=0, global_crops_size=8, return_params=True, seed=4)
    loader = _loader(jpeg_root, 8, **kw)
    epochs = [torch.cat([b[2]["index"] for b in _run(loader)]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    sampler = ResumableSampler(len(loader.samples), 8, seed=4)
    for e, got in enumerate(epochs):  # the torchvision path's order, for the same seed
        sampler.set_epoch(e)
        assert got.tolist() == [i for i, _ in sampler]
    fresh = _loader(jpeg_root, 8, **kw)
    fresh.set_epoch(1, start_batch=2)
    assert len(fresh) == loader.batches_per_epoch - 2
    tail = torch.cat([b[2]["index"] for b in _run(fresh)])
    assert torch.equal(tail, epochs[1][16:])


def test_resume_is_bit_identical(jpeg_root):
    """Draws are a function of (seed, epoch, batch, shard): batches 2.. of epoch 1 from a loader started
    there equal those of a loader that ran epoch 0 and 1 from the start, pixels and draws."""
    kw = dict(local_crops_number=2, global_crops_size=16, local_crops_size=8, return_params=True, seed=6)
    full = _run(_loader(jpeg_root, 8, **kw), epochs=2)[4 + 2:]
    resumed = _loader(jpeg_root, 8, **kw)
    resumed.set_epoch(1, start_batch=2)
    tail = _run(resumed)
    assert len(tail) == len(full) == 2
    for (va, la, pa), (vb, lb, pb) in zip(full, tail):
        assert torch.equal(la, lb) and all(torch.equal(pa[k], pb[k]) for k in pa)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    other_shard = _run(_loader(jpeg_root, 4, shard_id=1, num_shards=2, **kw))
    assert not torch.equal(other_shard[0][2]["crop"], _run(_loader(jpeg_root, 4, num_shards=2, **kw))[0][2]["crop"])


def test_crops_are_drawn_on_the_header_size(jpeg_root):
    """Sizes come from the JPEG frame header; every crop lies inside its image with its area in scale."""
    loader = _loader(jpeg_root, 12, local_crops_number=2, global_crops_size=16, local_crops_size=8,
                     return_params=True)
    assert loader._sizes.tolist() == [[40, 48]] * 36  # (height, width) of the 48x40 JPEGs
    prm = _cat_params(_run(loader))
    top, left, h, w = prm["crop"].unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 48).all()
    frac = (h * w).double() / (40 * 48)
    for views, (lo, hi) in ((slice(0, 2), loader.global_crops_scale), (slice(2, None), loader.local_crops_scale)):
        f = frac[:, views]  # rounding w, h to whole pixels moves the area a little past the range
        assert f.min() >= lo * 0.9 and f.max() <= hi * 1.1, (f.min(), f.max())


@pytest.mark.parametrize("n_images,last_batch", [(40, "drop"), (37, "drop"), (37, "pad")])
def test_two_shards_cover_the_dataset(tmp_path, n_images, last_batch):
    rng = np.random.default_rng(n_images)
    root = _write_tree(tmp_path, [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(n_images)],
                       classes=2)
    kw = dict(local_crops_number=0, global_crops_size=8, return_params=True, num_threads=1,
              last_batch=last_batch, seed=9)
    shards = [_loader(root, 4, shard_id=k, num_shards=2, **kw) for k in range(2)]
    assert len(shards[0]) == len(shards[1])
    seen = [torch.cat([b[2]["index"] for b in _run(s)]).tolist() for s in shards]
    both = seen[0] + seen[1]
    if last_batch == "drop":
        assert len(set(both)) == len(both) == (n_images // 8) * 8  # no duplicates, tail dropped
    else:
        assert set(both) == set(range(n_images)) and len(both) == math.ceil(n_images / 8) * 8


# --- bad input ----------------------------------------------------------------------------------------------

def test_corrupt_files_are_skipped_and_the_epoch_runs(tmp_path):
    rng = np.random.default_rng(0)
    root = _write_tree(tmp_path, [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(16)],
                       classes=2, ext="jpg")
    good = (root / "class_0" / "img_000.jpg").read_bytes()
    bad = {"truncated.jpg": good[: len(good) // 2], "garbage.jpg": bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
           "empty.jpg": b"", "text.png": b"not an image"}
    for name, data in bad.items():
        (root / "class_1" / name).write_bytes(data)
    with pytest.warns(CorruptImageWarning) as record:
        loader = _loader(root, 4, local_crops_number=0, global_crops_size=8, return_params=True)
    assert loader.num_skipped == len(bad)
    named = " ".join(str(w.message) for w in record)
    assert all(name in named for name in bad)
    batches = _run(loader)
    assert len(batches) == 16 // 4
    used = {Path(loader.samples[i][0]).name for b in batches for i in b[2]["index"].tolist()}
    assert not used & set(bad)
    assert validate_image_file(str(root / "class_0" / "img_000.jpg")) is None
    assert "truncated" in validate_image_file(str(root / "class_1" / "truncated.jpg"))


@pytest.mark.parametrize("window", [16384, 64])  # 64: every check past the first bytes reads by seeking
def test_validate_image_file(tmp_path, monkeypatch, window):
    import io

    import dino_fast.data.dali_validate as validate_mod

    monkeypatch.setattr(validate_mod, "_HEAD_BYTES", window)
    monkeypatch.setattr(validate_mod, "_TAIL_BYTES", window)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    cases = {"ok.jpg": (jpeg, None), "trailing.jpg": (jpeg + bytes(300), None),
             "cut.jpg": (jpeg[:-300], "truncated"), "cut_header.jpg": (jpeg[:100], "truncated"),
             "ok.png": (png, None), "cut.png": (png[:-20], "truncated PNG"), "empty.jpg": (b"", "empty")}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        got = validate_image_file(str(tmp_path / name))
        assert (got is None) if expected is None else (got is not None and expected in got), (name, got)
    assert validate_image_file(str(tmp_path / "cut.jpg"), mode="full") is not None
    assert validate_image_file(str(tmp_path / "cut.jpg"), mode="none") is None


@pytest.mark.parametrize("name,data,match", [
    # the header cannot even give a size: refused when its batch is fed, naming the file
    ("zz_garbage.jpg", b"\xff\xd8\xff" + bytes(200), "zz_garbage.jpg.*validate='header'"),
    # a valid PNG header over garbage: only DALI's decoder finds out
    ("zz_broken.png", None, "validate='full'"),
])
def test_unchecked_corrupt_file_gives_a_clear_error(tmp_path, name, data, match):
    import io

    rng = np.random.default_rng(0)
    root = _write_tree(tmp_path, [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)],
                       classes=1, ext="jpg")
    if data is None:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()[:33] + bytes(rng.integers(0, 256, 300, dtype=np.uint8))  # signature + IHDR kept
    (root / "class_0" / name).write_bytes(data)
    loader = _loader(root, 5, local_crops_number=0, global_crops_size=8, validate="none")
    with pytest.raises(DataError, match=match):
        _run(loader)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with an IEND chunk: passes every header check but the size."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG frame header claiming width x height, a scan and an end-of-image marker."""
    sof = b"\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + bytes(9)
    return b"\xff\xd8" + sof + b"\xff\xda\x00\x08" + bytes(6) + bytes(100) + b"\xff\xd9"


def test_decompression_bomb_is_skipped_from_its_header(tmp_path):
    """A 20000 x 20000 image (4e8 pixels, over twice PIL's default limit of 89.5e6) is refused from its
    header, JPEG or PNG, as the torchvision path refuses it (PIL's DecompressionBombError)."""
    rng = np.random.default_rng(0)
    root = _write_tree(tmp_path, [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)], classes=2)
    (root / "class_0" / "bomb.png").write_bytes(_png_header(20000, 20000))
    (root / "class_1" / "bomb.jpg").write_bytes(_jpeg_header(20000, 20000))
    with pytest.warns(CorruptImageWarning) as record:
        loader = _loader(root, 4, local_crops_number=0, global_crops_size=8, return_params=True)
    named = " ".join(str(w.message) for w in record)
    assert "bomb.png" in named and "bomb.jpg" in named and "decompression bomb" in named
    assert sorted(Path(p).name for p, _ in loader.skipped) == ["bomb.jpg", "bomb.png"]
    assert len(_run(loader)) == 2
    with pytest.raises(Image.DecompressionBombError):  # the torchvision path's verdict on the same file
        ImageFolderDataset.load_image(str(root / "class_0" / "bomb.png"))


@pytest.mark.parametrize("side,verdict", [(14, "kept"), (15, "refused")])
def test_pixel_limit_follows_pil(tmp_path, monkeypatch, side, verdict):
    """PIL's semantics at a small limit (100): over the limit warned and decoded, over twice refused;
    the limit is read when the loader is built, and None turns it off."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    rng = np.random.default_rng(side)
    root = _write_tree(tmp_path, [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(4)],
                       classes=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if verdict == "kept":  # 196 pixels: over 100, under 200
            loader = _loader(root, 2, local_crops_number=0, global_crops_size=8)
            assert loader.num_skipped == 0 and len(_run(loader)) == 2
        else:  # 225 pixels > 200
            with pytest.raises(DataError, match="no decodable image"):
                _loader(root, 2, local_crops_number=0, global_crops_size=8)
    assert any("MAX_IMAGE_PIXELS" in str(w.message) for w in record)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert _loader(root, 2, local_crops_number=0, global_crops_size=8).num_skipped == 0


def test_unchecked_bomb_is_refused_when_fed(tmp_path):
    rng = np.random.default_rng(1)
    root = _write_tree(tmp_path, [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)], classes=1)
    (root / "class_0" / "bomb.png").write_bytes(_png_header(20000, 20000))
    loader = _loader(root, 4, local_crops_number=0, global_crops_size=8, validate="none")
    with pytest.raises(DataError, match="bomb.png.*decompression bomb"):
        _run(loader)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        DALIMultiCropLoader(tmp_path / "nope", 4, device="cpu")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(device="tpu"), ValueError, "device"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(last_batch="keep"), ValueError, "last_batch"),
    (dict(shard_id=2, num_shards=2), ValueError, "shard_id"),
    (dict(global_crops_scale=(0.5, 0.2)), ValueError, "global_crops_scale"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=64), DataError, "fewer than one global batch"),
])
def test_bad_arguments(jpeg_root, kwargs, exc, match):
    kwargs = {"batch_size": 4, "device": "cpu", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            DALIMultiCropLoader(jpeg_root, **kwargs)


# --- GPU mode -----------------------------------------------------------------------------------------------

@requires_cuda
def test_gpu_mode(const_root):
    loader = DALIMultiCropLoader(const_root, 8, local_crops_number=2, global_crops_size=24, local_crops_size=12,
                                 device="gpu", device_id=torch.cuda.current_device(), dtype=torch.bfloat16,
                                 return_params=True, num_threads=2)
    batches = _run(loader)
    for views, labels, params in batches:
        assert [tuple(v.shape) for v in views] == [(8, 3, 24, 24)] * 2 + [(8, 3, 12, 12)] * 2
        assert all(v.is_cuda and v.dtype == torch.bfloat16 for v in views) and labels.is_cuda
    # bf16 holds ~3 significant digits: compare in fp32 mode for the pixel-exact check.
    loader32 = DALIMultiCropLoader(const_root, 8, local_crops_number=2, global_crops_size=24, local_crops_size=12,
                                   device="gpu", return_params=True, num_threads=2)
    _check_colour_ops(loader32, _run(loader32))
