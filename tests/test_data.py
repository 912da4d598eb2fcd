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

from dino_fast.data import DataAugmentationDINO, DataError, ImageFolderDataset, build_train_loader, \
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


def test_corrupt_images_do_not_kill_the_epoch(tmp_path):
    truncated, garbage = make_corrupt_folder(tmp_path)
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    ds = ImageFolderDataset(tmp_path, transform=aug)
    loader = build_train_loader(ds, batch_size=4, num_workers=0, seed=0, drop_last=False)
    torch.manual_seed(0)
    with pytest.warns(CorruptImageWarning) as record:
        batches = list(loader)
    msgs = " ".join(str(w.message) for w in record)
    assert truncated.name in msgs and garbage.name in msgs
    assert sum(len(labels) for _, labels in batches) == 9
    assert ds.num_corrupt == 2


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


def test_train_loader_batches_and_worker_determinism(tmp_path):
    for s, c in enumerate("abc"):
        write_images(tmp_path / c, 4, s)
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    ds = ImageFolderDataset(tmp_path, transform=aug)

    def epoch(seed):
        return list(build_train_loader(ds, batch_size=5, num_workers=2, seed=seed))

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == 2  # 12 samples, drop_last
    views, labels = a[0]
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 2
    assert labels.shape == (5,)
    same = all(torch.equal(x, y) for (va, la), (vb, lb) in zip(a, b) for x, y in zip(va + [la], vb + [lb]))
    assert same, "same seed gave different batches"
    assert not all(torch.equal(x, y) for (va, _), (vc, _) in zip(a, c) for x, y in zip(va, vc))


def test_train_loader_argument_errors(tmp_path):
    write_images(tmp_path / "a", 3, 0)
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="fewer than batch_size"):
        build_train_loader(ds, batch_size=4, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(ds, batch_size=0, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="num_workers"):
        build_train_loader(ds, batch_size=1, num_workers=-1, seed=0)


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
