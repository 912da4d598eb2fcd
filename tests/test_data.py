"""Tests of the torchvision data path: DINO multi-crop augmentation, ImageFolder reader, demo dataset."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dino_fast.config import ConfigError, TrainConfig
from dino_fast.data import DataAugmentationDINO, DataError, ImageFolderDataset, build_train_data, \
    collate_views, make_demo_dataset
from dino_fast.data.demo import DEMO_CLASSES
from dino_fast.data.folder import CorruptImageWarning
from dino_fast.data.transforms import DECISIONS, ViewTransform
from tests.helpers import assert_close

# ImageNet statistics written out (not imported): the spec, not the code under test.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def colourful_image(seed: int, w: int = 48, h: int = 40) -> Image.Image:
    """Smooth random colour field (+ noise): every channel differs, every crop has texture."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.float64)
    img += rng.normal(0, 20, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


# --- DataAugmentationDINO -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_local,g,l,src", [(8, 224, 96, (64, 64)), (2, 33, 17, (50, 31)), (0, 16, 8, (9, 13))])
def test_views_count_size_dtype_range(n_local, g, l, src):
    torch.manual_seed(n_local)
    aug = DataAugmentationDINO(local_crops_number=n_local, global_crops_size=g, local_crops_size=l)
    views = aug(colourful_image(n_local, *src))
    assert len(views) == aug.num_views == 2 + n_local
    for k, v in enumerate(views):
        size = g if k < 2 else l
        assert v.shape == (3, size, size), f"view {k}: shape {tuple(v.shape)}"
        assert v.dtype == torch.float32
        assert torch.isfinite(v).all()
        raw = unnormalize(v)  # normalized with ImageNet stats <=> back in [0, 1]
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5, f"view {k}: range [{raw.min()}, {raw.max()}]"


def test_grayscale_and_palette_sources_give_three_channels():
    aug = DataAugmentationDINO(local_crops_number=1, global_crops_size=16, local_crops_size=8)
    for mode in ("L", "P", "RGBA"):
        views = aug(colourful_image(1).convert(mode))
        assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)], mode


def _binomial_ok(hits: int, n: int, p: float, sigmas: float = 4.0) -> tuple[bool, str]:
    rate, sd = hits / n, math.sqrt(p * (1 - p) / n)
    return abs(rate - p) <= sigmas * sd, f"rate {rate:.4f} vs p={p} over n={n} (4 sigma = {sigmas * sd:.4f})"


def test_recorded_decision_rates():
    """Rates of every recorded decision, per view type, match the DINO recipe."""
    torch.manual_seed(0)
    n_calls, n_local = 1000, 4
    aug = DataAugmentationDINO(local_crops_number=n_local, global_crops_size=12, local_crops_size=8)
    img = colourful_image(0, 24, 24)
    recs = [aug(img, return_params=True)[1] for _ in range(n_calls)]
    by_view = {"global1": [r[0] for r in recs], "global2": [r[1] for r in recs],
               "local": [p for r in recs for p in r[2:]]}
    expected = {  # decision -> probability per view type
        "blur": {"global1": 1.0, "global2": 0.1, "local": 0.5},
        "solarize": {"global1": 0.0, "global2": 0.2, "local": 0.0},
    }
    for kind, ps in by_view.items():
        for d in DECISIONS:
            p = expected.get(d, {}).get(kind, {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2}.get(d))
            hits = sum(r.applied[d] for r in ps)
            if p in (0.0, 1.0):  # never / always: exact
                assert hits == p * len(ps), f"{d} on {kind}: {hits}/{len(ps)}, expected p={p}"
            else:
                ok, msg = _binomial_ok(hits, len(ps), p)
                assert ok, f"{d} on {kind}: {msg}"
    sigmas = [r.blur_sigma for rs in by_view.values() for r in rs]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    b, c, s, h = zip(*(r.jitter_factors for rs in by_view.values() for r in rs))
    for name, vals, lo, hi in (("brightness", b, 0.6, 1.4), ("contrast", c, 0.6, 1.4),
                               ("saturation", s, 0.8, 1.2), ("hue", h, -0.1, 0.1)):
        assert lo <= min(vals) and max(vals) <= hi, f"{name} factors outside [{lo}, {hi}]"
        assert max(vals) - min(vals) > 0.9 * (hi - lo), f"{name} factors do not cover [{lo}, {hi}]"


@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4), (0.3, 0.3)])
def test_crop_area_within_scale(scale):
    torch.manual_seed(1)
    img = colourful_image(2, 400, 300)
    vt = ViewTransform(16, scale)
    for _ in range(300):
        i, j, h, w = vt.sample_params(img).crop
        assert 0 <= i and 0 <= j and i + h <= 300 and j + w <= 400
        frac = h * w / (400 * 300)
        # fallback (no fitting crop in 10 tries) is the central crop of the whole image
        assert scale[0] * 0.98 <= frac <= scale[1] * 1.02 or (h, w) == (300, 400), (scale, frac)


def test_call_output_is_exactly_its_record():
    """The views __call__ returns are what apply() makes of the returned records."""
    torch.manual_seed(3)
    aug = DataAugmentationDINO(local_crops_number=3, global_crops_size=20, local_crops_size=12)
    img = colourful_image(3)
    views, recs = aug(img, return_params=True)
    for k, (vt, v, r) in enumerate(zip(aug.view_transforms(), views, recs)):
        assert torch.equal(v, vt.apply(img, r)), f"view {k}"
        pixels = torch.from_numpy(np.asarray(vt.apply_pil(img, r)).copy()).permute(2, 0, 1).float() / 255
        assert_close(v, (pixels - MEAN) / STD, name=f"normalized view {k}")


def _force(rec, **applied):
    return dataclasses.replace(rec, applied={**rec.applied, **applied})


def test_grayscale_decision_changes_pixels():
    """Recorded grayscale <=> all three channels equal (colourful source)."""
    torch.manual_seed(4)
    aug = DataAugmentationDINO(local_crops_number=6, global_crops_size=16, local_crops_size=12)
    img = colourful_image(4)
    seen = {True: 0, False: 0}
    for _ in range(20):
        views, recs = aug(img, return_params=True)
        for v, r in zip(views, recs):
            raw = unnormalize(v)
            spread = (raw.max(0).values - raw.min(0).values).max().item()
            gray = r.applied["grayscale"]
            seen[gray] += 1
            assert (spread < 1e-5) if gray else (spread > 0.02), f"grayscale={gray} but channel spread {spread}"
    assert seen[True] > 0 and seen[False] > 0


def test_solarize_decision_changes_pixels():
    """A global-2 view recorded as solarized equals the same view with solarize forced
    off, with every value >= 128 inverted."""
    aug = DataAugmentationDINO(local_crops_number=0, global_crops_size=24)
    img = colourful_image(5)
    for seed in range(200):
        torch.manual_seed(seed)
        views, recs = aug(img, return_params=True)
        if recs[1].applied["solarize"]:
            break
    else:
        pytest.fail("no solarized global-2 view in 200 seeds")
    vt = aug.global_transfo2
    on = np.asarray(vt.apply_pil(img, recs[1])).astype(np.int32)
    off = np.asarray(vt.apply_pil(img, _force(recs[1], solarize=False))).astype(np.int32)
    assert (on != off).any()
    np.testing.assert_array_equal(on, np.where(off >= 128, 255 - off, off))
    assert torch.equal(views[1], vt.apply(img, recs[1]))


def test_flip_blur_jitter_decisions_change_pixels():
    torch.manual_seed(6)
    vt = ViewTransform(20, (0.4, 1.0))
    img = colourful_image(6)
    rec = _force(vt.sample_params(img), flip=False, color_jitter=False, grayscale=False, blur=False,
                 solarize=False)
    base_pil = vt.apply_pil(img, rec)
    base = np.asarray(base_pil).astype(np.float64)
    i, j, h, w = rec.crop  # crop then bicubic resize, done by PIL directly
    np.testing.assert_array_equal(base, np.asarray(img.crop((j, i, j + w, i + h)).resize((20, 20), Image.BICUBIC)))
    flipped = np.asarray(vt.apply_pil(img, _force(rec, flip=True))).astype(np.float64)
    np.testing.assert_array_equal(flipped, base[:, ::-1])
    blurred = np.asarray(vt.apply_pil(img, _force(rec, blur=True))).astype(np.float64)
    tv = lambda a: np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()  # noqa: E731
    assert tv(blurred) < tv(base), "blur did not smooth the view"
    np.testing.assert_array_equal(blurred, np.asarray(base_pil.filter(ImageFilter.GaussianBlur(rec.blur_sigma))))
    jittered = np.asarray(vt.apply_pil(img, _force(rec, color_jitter=True))).astype(np.float64)
    assert np.abs(jittered - base).max() > 2


def test_determinism_with_seed():
    aug = DataAugmentationDINO(local_crops_number=4, global_crops_size=24, local_crops_size=12)
    img = colourful_image(7)

    def run(seed):
        torch.manual_seed(seed)
        return aug(img)

    a, b, c = run(11), run(11), run(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_crops_scale=(0.0, 1.0)), "global_crops_scale"),
    (dict(global_crops_scale=(0.5, 0.4)), "global_crops_scale"),
    (dict(local_crops_scale=(0.05, 1.5)), "local_crops_scale"),
    (dict(local_crops_scale=0.3), "local_crops_scale"),
    (dict(local_crops_number=-1), "local_crops_number"),
    (dict(local_crops_number=2.0), "local_crops_number"),
    (dict(global_crops_size=0), "global_crops_size"),
    (dict(local_crops_size=96.5), "local_crops_size"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataAugmentationDINO(**kwargs)


def test_non_pil_input_raises():
    with pytest.raises(TypeError, match="PIL"):
        DataAugmentationDINO(local_crops_number=0)(torch.zeros(3, 32, 32))


# --- the recipe, shared by both back-ends ------------------------------------------------------------------

def test_recipe_holds_the_official_constants():
    """main_dino.py / utils.py values, written out here (the spec, not the code under test)."""
    from dino_fast.data import recipe

    assert (recipe.FLIP_P, recipe.JITTER_P, recipe.GRAYSCALE_P) == (0.5, 0.8, 0.2)
    assert (recipe.BRIGHTNESS, recipe.CONTRAST, recipe.SATURATION, recipe.HUE) == (0.4, 0.4, 0.2, 0.1)
    assert recipe.BLUR_SIGMA == (0.1, 2.0) and recipe.BLUR_P == (1.0, 0.1, 0.5)
    assert recipe.SOLARIZE_P == (0.0, 0.2, 0.0) and recipe.SOLARIZE_THRESHOLD == 128
    assert recipe.CROP_RATIO == (3 / 4, 4 / 3)
    assert recipe.GLOBAL_CROPS_SCALE == (0.4, 1.0) and recipe.LOCAL_CROPS_SCALE == (0.05, 0.4)
    assert torch.equal(torch.tensor(recipe.IMAGENET_MEAN).view(3, 1, 1), MEAN)
    assert torch.equal(torch.tensor(recipe.IMAGENET_STD).view(3, 1, 1), STD)


def test_torchvision_views_read_the_recipe(monkeypatch):
    """DataAugmentationDINO takes its per-view probabilities and jitter strengths from the recipe
    (tests/test_dali.py checks the same for the DALI loader)."""
    from dino_fast.data import recipe

    monkeypatch.setattr(recipe, "BLUR_P", (0.3, 0.6, 0.9))
    monkeypatch.setattr(recipe, "SOLARIZE_P", (0.7, 0.0, 0.4))
    monkeypatch.setattr(recipe, "BRIGHTNESS", 0.1)
    monkeypatch.setattr(recipe, "HUE", 0.05)
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    probs = [(vt.prob["blur"], vt.prob["solarize"], vt.prob["flip"], vt.prob["color_jitter"], vt.prob["grayscale"])
             for vt in aug.view_transforms()]
    assert probs == [(0.3, 0.7, 0.5, 0.8, 0.2), (0.6, 0.0, 0.5, 0.8, 0.2)] + [(0.9, 0.4, 0.5, 0.8, 0.2)] * 2
    jitter = aug.local_transfo._jitter
    got = [tuple(r) for r in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)]
    assert_close(torch.tensor(got), torch.tensor([(0.9, 1.1), (0.6, 1.4), (0.8, 1.2), (-0.05, 0.05)]), name="jitter")


# --- per-batch draws and batched photometric ops (the DALI path's host / torch side) --------------------

def test_batch_draws_are_a_function_of_their_position():
    from dino_fast.data import batch_augment as ba
    from dino_fast.data.recipe import view_recipes

    views = view_recipes((0.4, 1.0), (0.05, 0.4), 3, 32, 16)
    sizes = np.array([[40, 48], [64, 64], [375, 500]] * 5)

    def draws(*position):
        return ba.draw_batch(ba.batch_rng(*position), sizes, views)

    a, b = draws(1, 2, 3, 0), draws(1, 2, 3, 0)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    for other in ((2, 2, 3, 0), (1, 3, 3, 0), (1, 2, 4, 0), (1, 2, 3, 1)):  # seed, epoch, batch, shard
        assert not np.array_equal(draws(*other).crop, a.crop), other


def test_batch_draw_rates_and_ranges():
    from dino_fast.data import batch_augment as ba
    from dino_fast.data.recipe import view_recipes

    n = 3000
    d = ba.draw_batch(np.random.default_rng(0), np.full((n, 2), 64), view_recipes((0.4, 1), (0.05, 0.4), 2, 16, 8))
    expected = {"flip": [0.5] * 4, "color_jitter": [0.8] * 4, "grayscale": [0.2] * 4, "blur": [1.0, 0.1, 0.5, 0.5],
                "solarize": [0.0, 0.2, 0.0, 0.0]}
    for name, ps in expected.items():
        for v, p in enumerate(ps):
            hits = int(getattr(d, name)[:, v].sum())
            if p in (0.0, 1.0):
                assert hits == p * n, (name, v, hits)
            else:
                ok, msg = _binomial_ok(hits, n, p)
                assert ok, f"{name} view {v}: {msg}"
    on = d.color_jitter
    for name, lo, hi, identity in (("brightness", 0.6, 1.4, 1), ("contrast", 0.6, 1.4, 1),
                                   ("saturation", 0.8, 1.2, 1), ("hue", -0.1, 0.1, 0)):
        x = getattr(d, name)
        assert lo <= x[on].min() and x[on].max() <= hi and x[on].max() - x[on].min() > 0.95 * (hi - lo), name
        assert (x[~on] == identity).all(), name
    assert 0.1 <= d.blur_sigma[d.blur].min() and d.blur_sigma[d.blur].max() <= 2.0
    assert (d.blur_sigma[~d.blur] == 0).all()


@pytest.mark.parametrize("size,scale", [((300, 400), (0.05, 0.4)), ((375, 500), (0.4, 1.0)), ((41, 23), (0.4, 1.0))])
def test_random_resized_crops_match_torchvision(size, scale):
    """Same window distribution as torchvision's RandomResizedCrop.get_params (area fraction, aspect, position)."""
    import torchvision.transforms as T

    from dino_fast.data import batch_augment as ba

    n = 4000
    h_img, w_img = size
    ours = ba.random_resized_crops(np.random.default_rng(1), np.tile(size, (n, 1)), np.array([scale]))[:, 0]
    torch.manual_seed(1)
    img = Image.new("RGB", (w_img, h_img))
    theirs = np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])
    for crops in (ours, theirs):
        top, left, h, w = crops.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= h_img).all() and (left + w <= w_img).all()

    def stats(crops):
        top, left, h, w = crops.T.astype(np.float64)
        centre_x = (left + w / 2) / w_img
        return np.array([(h * w).mean() / (h_img * w_img), np.log(w / h).mean(), np.log(w / h).std(), centre_x.mean(),
                         np.quantile(h * w, 0.1) / (h_img * w_img), np.quantile(h * w, 0.9) / (h_img * w_img)])

    np.testing.assert_allclose(stats(ours), stats(theirs), atol=0.02)


def test_random_resized_crop_fallback_is_torchvision_s():
    """No try fits a 10 x 300 image: both take the central crop at the ratio limit."""
    import torchvision.transforms as T

    from dino_fast.data import batch_augment as ba

    ours = ba.random_resized_crops(np.random.default_rng(0), np.array([[10, 300], [300, 10]]), np.array([[0.4, 1.0]]))
    for k, (h, w) in enumerate(((10, 300), (300, 10))):
        theirs = T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.4, 1.0], [3 / 4, 4 / 3])
        assert tuple(ours[k, 0]) == tuple(theirs)


def test_crop_windows_fold_the_flip():
    from dino_fast.data import batch_augment as ba
    from dino_fast.data.recipe import view_recipes

    d = ba.draw_batch(np.random.default_rng(2), np.full((50, 2), 64), view_recipes((0.4, 1), (0.05, 0.4), 1, 16, 8))
    for v in range(3):
        start, end = ba.crop_windows(d, v)
        top, left, h, w = d.crop[:, v].T
        flip = d.flip[:, v]
        np.testing.assert_array_equal(start[:, 0], top)
        np.testing.assert_array_equal(end[:, 0], top + h)
        np.testing.assert_array_equal(start[:, 1], np.where(flip, left + w, left))
        np.testing.assert_array_equal(end[:, 1], np.where(flip, left, left + w))
    assert 0 < d.flip.sum() < d.flip.size


def _reflect(i: int, n: int) -> int:
    """Mirror an index into [0, n) without repeating the edge sample (reflect-101), by bouncing."""
    if n == 1:
        return 0
    while not 0 <= i < n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _blur_reference(signal: np.ndarray, sigma: float) -> np.ndarray:
    """1-D Gaussian blur along the last axis, tap by tap: weights exp(-t^2 / 2 sigma^2), |t| <= ceil(3 sigma)."""
    if sigma == 0:
        return signal.copy()
    r = math.ceil(3 * sigma)
    taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    n = signal.shape[-1]
    out = np.zeros_like(signal, dtype=np.float64)
    for o in range(n):
        for t, wt in zip(range(-r, r + 1), taps):
            out[..., o] += wt * signal[..., _reflect(o + t, n)]
    return out


@pytest.mark.parametrize("n", [1, 2, 5, 13, 16, 32])
def test_blur_matrices_match_a_tap_by_tap_blur(n):
    from dino_fast.data import batch_augment as ba

    sigmas = torch.tensor([0.0, 0.1, 0.37, 1.0, 1.63, 2.0])
    a = ba.blur_matrices(sigmas, n)
    x = np.random.default_rng(n).uniform(0, 255, (len(sigmas), n))
    expected = torch.tensor(np.stack([_blur_reference(x[k], float(s)) for k, s in enumerate(sigmas)]))
    got = torch.einsum("kij,kj->ki", a.double(), torch.tensor(x))
    assert_close(got, expected, rtol=1e-5, atol=1e-4, name=f"blur n={n}")
    assert torch.equal(a[0], torch.eye(n)), "sigma 0 must be the exact identity"
    assert_close(a.sum(2), torch.ones(len(sigmas), n), name="rows sum to 1")


def _photometric_reference(x: np.ndarray, m: np.ndarray, offset: float, sigma: float, solarize: bool) -> np.ndarray:
    """One view, written from the math: (3, H, W) uint8 -> uint8 levels (float64)."""
    luma = np.array([0.299, 0.587, 0.114])
    mu = (x.reshape(3, -1).mean(1) * luma).sum()
    y = np.clip(np.round(np.einsum("cd,dhw->chw", m, x) + offset * mu), 0, 255)
    y = np.round(_blur_reference(_blur_reference(y, sigma).swapaxes(1, 2), sigma).swapaxes(1, 2))
    return np.where(solarize & (y >= 128), 255 - y, y)


@pytest.mark.parametrize("b,f,size", [(3, 2, 13), (2, 5, 16), (1, 1, 7)])
def test_apply_photometric_matches_a_per_view_reference(b, f, size):
    from dino_fast.data import batch_augment as ba
    from dino_fast.data.recipe import view_recipes

    rng = np.random.default_rng(size)
    views = view_recipes((0.4, 1), (0.05, 0.4), f, size, size)[-f:]
    views = [dataclasses.replace(v, solarize_p=0.5) for v in views]
    d = ba.draw_batch(rng, np.full((b, 2), 64), views)
    params = ba.view_params(d)
    x = rng.integers(0, 256, (b, f, 3, size, size), dtype=np.uint8)
    got = ba.apply_photometric(torch.from_numpy(x), torch.from_numpy(params))
    assert len(got) == f and all(v.shape == (b, 3, size, size) and v.is_contiguous() for v in got)
    levels = torch.stack([(v.double() * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)) * 255 for v in got], 1)
    expected = torch.tensor(np.stack([np.stack([
        _photometric_reference(x[i, v].astype(np.float64), params[i, v, :9].reshape(3, 3).astype(np.float64),
                               float(params[i, v, 9]), float(params[i, v, 10]), bool(params[i, v, 11]))
        for v in range(f)]) for i in range(b)]))
    # float32 vs float64: a value on a .5 boundary may round the other way (one level), rarely
    assert_close(levels, expected, rtol=0, atol=1.0 + 1e-3, name="photometric levels")
    assert (levels - expected).abs().gt(0.01).double().mean() < 0.01
    bf16 = ba.apply_photometric(torch.from_numpy(x), torch.from_numpy(params), dtype=torch.bfloat16)
    assert all(u.dtype == torch.bfloat16 and torch.equal(u, v.to(torch.bfloat16)) for u, v in zip(bf16, got))


def test_apply_photometric_identity_and_solarize_threshold():
    """Every uint8 value through identity colour and no blur: unchanged, or solarized exactly at >= 128."""
    from dino_fast.data import batch_augment as ba

    x = torch.arange(256, dtype=torch.uint8).view(16, 16).expand(1, 2, 3, 16, 16)  # (B, F, 3, H, W)
    params = torch.zeros(1, 2, ba.NUM_VIEW_PARAMS)
    params[..., :9] = torch.eye(3).flatten()
    params[0, 1, 11] = 1.0  # view 1 solarized
    plain, solarized = ((v.double() * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)) * 255
                        for v in ba.apply_photometric(x, params))
    levels = torch.arange(256, dtype=torch.float64).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert_close(plain, levels, rtol=0, atol=1e-3, name="identity")
    assert_close(solarized, torch.where(levels >= 128, 255 - levels, levels), rtol=0, atol=1e-3, name="solarize")


# --- ImageFolderDataset -------------------------------------------------------------------------------------

def write_images(folder, n: int, seed: int, ext: str = "jpg", size=(20, 16), mode="RGB") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        img = colourful_image(seed * 1000 + k, *size).convert(mode)
        paths.append(folder / f"img_{k:03d}.{ext}")
        img.save(paths[-1])
    return paths


def test_folder_classes_samples_and_rgb(tmp_path):
    write_images(tmp_path / "zebra", 2, 1)
    write_images(tmp_path / "apple", 3, 2, ext="png")
    write_images(tmp_path / "mango" / "nested", 1, 3, ext="JPEG", mode="L")  # grayscale, upper-case ext
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 2, 2] == ds.targets
    assert len(ds) == 6 and all(os.path.isfile(p) for p, _ in ds.samples)
    for k in range(len(ds)):
        img, label = ds[k]
        assert img.mode == "RGB" and label == ds.samples[k][1]
    ds_t = ImageFolderDataset(tmp_path, transform=lambda im: np.asarray(im).shape)
    assert ds_t[3] == ((16, 20, 3), 1)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=f"data folder not found: {tmp_path / 'nope'}"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        ImageFolderDataset(tmp_path / "file.jpg")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path)  # holds only a file
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images .* found under"):
        ImageFolderDataset(tmp_path)
    write_images(tmp_path / "cat", 1, 0)
    with pytest.raises(DataError, match="class folder 'dog' has no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(TypeError, match="extensions"):
        ImageFolderDataset(tmp_path, extensions=".jpg")
    assert issubclass(DataError, ValueError)


def make_corrupt_folder(root):
    """3 classes x 3 images; a truncated JPEG (a/1) and random bytes named .jpg (c/2, the last sample)."""
    paths = [write_images(root / c, 3, s) for s, c in enumerate("abc")]
    data = paths[0][1].read_bytes()
    paths[0][1].write_bytes(data[: len(data) // 2])
    paths[2][2].write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return paths[0][1], paths[2][2]


def test_corrupt_image_replaced_by_next_warned_once_and_counted(tmp_path):
    truncated, garbage = make_corrupt_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert ds.samples[1][0] == str(truncated) and ds.samples[8][0] == str(garbage)
    with pytest.warns(CorruptImageWarning, match=truncated.name):
        img, label = ds[1]
    assert label == ds.samples[2][1] and np.array_equal(np.asarray(img), np.asarray(ds[2][0]))
    with pytest.warns(CorruptImageWarning, match=garbage.name):
        img, label = ds[8]  # last index wraps to the first sample
    assert label == 0 and np.array_equal(np.asarray(img), np.asarray(ds[0][0]))
    assert ds.num_corrupt == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second visit must not warn again
        ds[1], ds[8]
    assert ds.num_corrupt == 2


def _train_data(root, **kw):
    """The trainer's torchvision loader (build_train_data) over ``root``."""
    base = dict(data_path=str(root), data_backend="torchvision", batch_size_per_gpu=4, num_workers=0,
                local_crops_number=2, global_crops_size=16, local_crops_size=8, patch_size=8, seed=0)
    return build_train_data(TrainConfig.from_dict({**base, **kw}), torch.device("cpu"))


def test_corrupt_images_do_not_kill_the_epoch(tmp_path):
    truncated, garbage = make_corrupt_folder(tmp_path)
    data = _train_data(tmp_path, batch_size_per_gpu=3)
    with pytest.warns(CorruptImageWarning) as record:
        batches = list(data.epoch(0))
    msgs = " ".join(str(w.message) for w in record)
    assert truncated.name in msgs and garbage.name in msgs
    assert len(batches) == data.num_batches == 3 and all(v.shape[0] == 3 for b in batches for v in b)
    assert data.dataset.num_corrupt == 2


def test_all_corrupt_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(CorruptImageWarning), pytest.raises(DataError, match="no readable image"):
        ds[0]


# --- collate and loader -------------------------------------------------------------------------------------

def test_collate_views_shapes_and_errors():
    batch = [([torch.full((3, 8, 8), float(b)), torch.full((3, 8, 8), float(b)), torch.full((3, 4, 4), float(b))], b)
             for b in range(5)]
    views, labels = collate_views(batch)
    assert [tuple(v.shape) for v in views] == [(5, 3, 8, 8), (5, 3, 8, 8), (5, 3, 4, 4)]
    assert labels.dtype == torch.long and labels.tolist() == list(range(5))
    assert all(torch.equal(v[:, 0, 0, 0], labels.float()) for v in views)  # sample order kept
    with pytest.raises(TypeError, match="list of view tensors"):
        collate_views([(torch.zeros(3, 4, 4), 0)])
    with pytest.raises(ValueError, match="view counts"):
        collate_views([batch[0], (batch[1][0][:2], 1)])


def test_train_data_batches_and_worker_determinism(tmp_path):
    for s, c in enumerate("abc"):
        write_images(tmp_path / c, 4, s)

    def epoch(seed, workers=2):
        return list(_train_data(tmp_path, batch_size_per_gpu=5, num_workers=workers, seed=seed).epoch(0))

    a, b, c, d = epoch(0), epoch(0), epoch(1), epoch(0, workers=0)
    assert len(a) == 2  # 12 samples, the tail that does not fill a batch dropped
    assert [tuple(v.shape) for v in a[0]] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 2
    same = lambda x, y: all(torch.equal(u, v) for bx, by in zip(x, y) for u, v in zip(bx, by))  # noqa: E731
    assert same(a, b), "same seed gave different batches"
    assert same(a, d), "the views depend on the number of workers"
    assert not same(a, c)


def test_train_data_argument_errors(tmp_path):
    write_images(tmp_path / "a", 3, 0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        _train_data(tmp_path, batch_size_per_gpu=4)
    with pytest.raises(ConfigError, match="data_path"):
        _train_data("")


# --- demo dataset -------------------------------------------------------------------------------------------

SMALL = dict(n_train_per_class=3, n_val_per_class=2, size=32, seed=1)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.jpg"))


def test_demo_dataset_layout_and_decode(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", **SMALL)
    assert root == tmp_path / "demo"
    for split, n in (("train", 3), ("val", 2)):
        ds = ImageFolderDataset(root / split)
        assert ds.classes == sorted(DEMO_CLASSES) and len(ds.classes) == 10
        assert len(ds) == 10 * n
        assert np.bincount(ds.targets).tolist() == [n] * 10
        for path, _ in ds.samples:
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
                im.load()


def test_demo_dataset_deterministic_and_cached(tmp_path):
    a = make_demo_dataset(tmp_path / "a", **SMALL)
    b = make_demo_dataset(tmp_path / "b", **SMALL)
    c = make_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 2})
    assert _files(a) == _files(b) == _files(c)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in _files(a))
    # cached: a second call rewrites nothing
    mtimes = {f: (a / f).stat().st_mtime_ns for f in _files(a)}
    assert make_demo_dataset(tmp_path / "a", **SMALL) == a
    assert mtimes == {f: (a / f).stat().st_mtime_ns for f in _files(a)}


def test_demo_dataset_regenerated_without_marker(tmp_path):
    root = make_demo_dataset(tmp_path / "d", **SMALL)
    files = _files(root)
    victim = root / files[0]
    original = victim.read_bytes()
    victim.unlink()
    (root / "train" / "circle" / "partial_junk.jpg").write_bytes(b"half written")
    make_demo_dataset(root, **SMALL)
    assert not victim.exists(), "marker present: nothing should be regenerated"
    (root / ".complete").unlink()  # as after an interrupted generation
    make_demo_dataset(root, **SMALL)
    assert victim.read_bytes() == original and _files(root) == files
    assert (root / ".complete").is_file()
    # other parameters on the same root: regenerated for them
    make_demo_dataset(root, **{**SMALL, "n_val_per_class": 1})
    assert len(list((root / "val").rglob("*.jpg"))) == 10
    assert json.loads((root / ".complete").read_text())["n_val_per_class"] == 1


def test_demo_dataset_default_root_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_FAST_CACHE", str(tmp_path / "cache"))
    r1 = make_demo_dataset(**SMALL)
    r2 = make_demo_dataset(**{**SMALL, "seed": 3})
    assert r1.parent == r2.parent == tmp_path / "cache"
    assert r1.name.startswith("demo-") and r1 != r2
    foreign = tmp_path / "mine"
    write_images(foreign / "train" / "x", 1, 0)
    with pytest.raises(DataError, match="refusing to overwrite"):
        make_demo_dataset(foreign, **SMALL)
    assert (foreign / "train" / "x" / "img_000.jpg").is_file()
    with pytest.raises(ValueError, match="size"):
        make_demo_dataset(tmp_path / "e", size=0)


def test_demo_dataset_has_class_structure(tmp_path):
    """1-NN on a translation-invariant shape feature (|FFT| of the gradient
    magnitude, colour-free) must beat chance (0.1) by far: the label is in the geometry."""
    root = make_demo_dataset(tmp_path / "s", n_train_per_class=40, n_val_per_class=10, size=64, seed=0)

    def features(split):
        ds = ImageFolderDataset(root / split)
        xs = []
        for path, _ in ds.samples:
            gy, gx = np.gradient(np.asarray(ds.load_image(path), dtype=np.float64).mean(-1))
            f = np.abs(np.fft.fft2(np.hypot(gx, gy))).ravel()
            xs.append(f / np.linalg.norm(f))
        return np.stack(xs), np.asarray(ds.targets)

    (xt, yt), (xv, yv) = features("train"), features("val")
    acc = float((yt[(xv @ xt.T).argmax(1)] == yv).mean())
    assert acc > 0.5, f"1-NN accuracy {acc:.3f}"


# --- DINOMultiCrop: the public transform --------------------------------------------------------------------

def test_dino_multicrop_defaults_are_the_official_recipe():
    from dino_fast.data import DINOMultiCrop

    crops = DINOMultiCrop()
    assert crops.kwargs() == dict(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                                  global_crops_size=224, local_crops_size=96)  # main_dino.py defaults
    assert crops.num_views == 10 and [v.size for v in crops.views] == [224] * 2 + [96] * 8
    assert [(v.blur_p, v.solarize_p) for v in crops.views[:3]] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    assert "DINOMultiCrop" in __import__("dino_fast.data", fromlist=["__all__"]).__all__


def test_dino_multicrop_call_is_the_torchvision_transform():
    from dino_fast.data import DINOMultiCrop

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    crops = DINOMultiCrop(local_crops_number=3, global_crops_size=24, local_crops_size=12)
    torch.manual_seed(7)
    views = crops(img)
    torch.manual_seed(7)
    ref = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, 24, 12)(img)
    assert [tuple(v.shape) for v in views] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert all(torch.equal(a, b) for a, b in zip(views, ref))
    with pytest.raises(ValueError, match="local_crops_number"):
        DINOMultiCrop(local_crops_number=-1)
    with pytest.raises(ValueError, match="global_crops_scale"):
        DINOMultiCrop(global_crops_scale=(0.5, 0.1))


def test_dino_multicrop_builds_both_loaders_of_the_trainer(tmp_path):
    from dino_fast.data import DINOMultiCrop

    for s, c in enumerate("ab"):
        write_images(tmp_path / c, 4, s)
    data = _train_data(tmp_path, local_crops_number=3, global_crops_scale=(0.3, 0.9))
    crops = DINOMultiCrop(global_crops_scale=(0.3, 0.9), local_crops_number=3, global_crops_size=16,
                          local_crops_size=8)
    assert data.multicrop == crops and data.dataset.transform == crops
    ds = crops.dataset(tmp_path)
    assert ds.classes == ["a", "b"] and len(ds[0][0]) == 5
    pytest.importorskip("nvidia.dali")
    loader = crops.dali_loader(tmp_path, 4, device="cpu", num_threads=1)
    assert loader._views == crops.views and loader.num_views == 5
    views, labels = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    loader.close()
