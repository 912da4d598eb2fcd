"""A built-in labeled demo dataset: 10 classes of shapes and textures as JPEGs.

Each class is a shape (circle, square, triangle, star, cross, ring; 2-4 per image) or a texture
(horizontal stripes, vertical stripes, checkerboard, dots) in a colour typical of the class
(its own hue +-15 degrees, random saturation and brightness), on a weakly coloured background
of random brightness that changes across the image. Position, scale, rotation, stripe period
and phase are random. Mild Gaussian noise is added and the images are written as JPEGs, so the
real decode path runs.

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``, readable by
:class:`~dino_fast.data.folder.ImageFolderDataset`.
"""
from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from dino_fast.data.folder import DataError

__all__ = ["DEMO_CLASSES", "make_demo_dataset", "demo_cache_dir"]

# Bump when the generator changes, so cached copies are not reused.
_GENERATOR_VERSION = 5
_OWNER = ".dino_fast_demo"  # written first: this folder is ours to rewrite
_COMPLETE = ".complete"  # written last: generation finished
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges
_NOISE_STD = 6.0  # uint8 units
_JPEG_QUALITY = 90

DEMO_CLASSES = ("checkerboard", "circle", "cross", "dots", "horizontal_stripes", "ring", "square", "star",
                "triangle", "vertical_stripes")


def demo_cache_dir() -> Path:
    """``$DINO_FAST_CACHE`` if set, else ``~/.cache/dino_fast``."""
    return Path(os.environ.get("DINO_FAST_CACHE") or Path.home() / ".cache" / "dino_fast").expanduser()


# --- drawing: each returns a float mask in [0, 1] of shape (S, S), S = size * _SUPERSAMPLE ------------------

def _polygon_mask(s: int, points: np.ndarray) -> np.ndarray:
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _place(rng: np.random.Generator, s: int) -> tuple[float, float, float, float]:
    """Random centre, radius (scale) and rotation of an object that stays inside the image."""
    r = rng.uniform(0.13, 0.24) * s
    cx, cy = rng.uniform(r, s - r, size=2)
    return cx, cy, r, rng.uniform(0.0, 2.0 * math.pi)


def _regular(rng: np.random.Generator, s: int, radii: list[float], n: int) -> np.ndarray:
    """Star-shaped polygon: ``n`` repeats of the given vertex radii (fractions of r), rotated."""
    cx, cy, r, theta = _place(rng, s)
    k = len(radii)
    ang = theta + 2.0 * math.pi * np.arange(n * k) / (n * k)
    rad = r * np.tile(np.asarray(radii), n)
    return _polygon_mask(s, np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1))


def _circle(rng, s):
    cx, cy, r, _ = _place(rng, s)
    y, x = np.mgrid[0:s, 0:s] + 0.5
    return ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).astype(np.float32)


def _ring(rng, s):
    cx, cy, r, _ = _place(rng, s)
    y, x = np.mgrid[0:s, 0:s] + 0.5
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    inner = r * rng.uniform(0.5, 0.7)
    return ((d2 <= r * r) & (d2 >= inner * inner)).astype(np.float32)


def _square(rng, s):
    return _regular(rng, s, [1.0], 4)


def _triangle(rng, s):
    return _regular(rng, s, [1.0], 3)


def _star(rng, s):
    return _regular(rng, s, [1.0, 0.42], 5)


def _cross(rng, s):
    cx, cy, r, theta = _place(rng, s)
    a = rng.uniform(0.28, 0.4)  # half arm width, fraction of r
    pts = np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a),
                    (-a, a), (-a, 1)], dtype=np.float64) * r
    c, sn = math.cos(theta), math.sin(theta)
    rot = pts @ np.array([[c, sn], [-sn, c]])
    return _polygon_mask(s, rot + np.array([cx, cy]))


def _texture_coords(rng: np.random.Generator, s: int, angle: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel coordinates rotated by ``angle`` (+ up to 10 degrees of jitter) and a random period."""
    a = angle + math.radians(rng.uniform(-10.0, 10.0))
    y, x = np.mgrid[0:s, 0:s] + 0.5
    u = x * math.cos(a) + y * math.sin(a)
    v = -x * math.sin(a) + y * math.cos(a)
    period = rng.uniform(0.14, 0.3) * s
    return u + rng.uniform(0, period), v + rng.uniform(0, period), period


def _horizontal_stripes(rng, s):
    u, v, p = _texture_coords(rng, s, 0.0)
    return ((v / p) % 1.0 < 0.5).astype(np.float32)  # bands of constant y


def _vertical_stripes(rng, s):
    u, v, p = _texture_coords(rng, s, 0.0)
    return ((u / p) % 1.0 < 0.5).astype(np.float32)  # bands of constant x


def _checkerboard(rng, s):
    u, v, p = _texture_coords(rng, s, 0.0)
    p *= 0.5  # cells of the same size as a stripe band
    return ((np.floor(u / p) + np.floor(v / p)) % 2 == 0).astype(np.float32)


def _dots(rng, s):
    u, v, p = _texture_coords(rng, s, 0.0)
    fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
    return (fu * fu + fv * fv <= rng.uniform(0.2, 0.3) ** 2).astype(np.float32)


_TEXTURES = ("checkerboard", "dots", "horizontal_stripes", "vertical_stripes")
_DRAW: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "checkerboard": _checkerboard, "circle": _circle, "cross": _cross, "dots": _dots,
    "horizontal_stripes": _horizontal_stripes, "ring": _ring, "square": _square, "star": _star,
    "triangle": _triangle, "vertical_stripes": _vertical_stripes,
}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, weakly coloured random field (size, size, 3): a 3 x 3 grid of random colours of low
    saturation and random brightness, bicubically upsampled, so crops of one image differ."""
    hue, sat, val = rng.random((3, 3)), rng.uniform(0, 0.35, (3, 3)), rng.uniform(0.1, 0.9, (3, 3))
    grid = 255.0 * np.array([[colorsys.hsv_to_rgb(*hsv) for hsv in zip(*rows)] for rows in zip(hue, sat, val)])
    img = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), mode="RGB")
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32)


def render_demo_image(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB ``size`` x ``size`` image of class ``cls`` drawn with ``rng``.

    Shapes appear 2-4 times, textures fill the image. Like object categories in photos, each class
    has a typical colour (a hue of its own, +-15 degrees; random saturation and brightness), but the
    background is a weakly coloured random field of random brightness that changes across the
    image: nuisance that a random network's features follow and that crops of one image do not
    fully share."""
    s = size * _SUPERSAMPLE
    draw = _DRAW[cls]
    if cls in _TEXTURES:
        mask = draw(rng, s)
    else:
        mask = np.zeros((s, s), dtype=np.float32)
        for _ in range(int(rng.integers(2, 5))):
            mask = np.maximum(mask, draw(rng, s))
    alpha = mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # (size, size, 1)
    hue = (DEMO_CLASSES.index(cls) / len(DEMO_CLASSES) + rng.uniform(-0.04, 0.04)) % 1.0
    fg = 255.0 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)))
    bg = _background(rng, size)
    img = alpha * fg + (1.0 - alpha) * bg + rng.normal(0.0, _NOISE_STD, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


# --- generation ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent ranks generate once (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_demo_dataset(root: str | os.PathLike | None = None, n_train_per_class: int = 160,
                      n_val_per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """Generate (once) the demo dataset and return its root folder.

    ``root`` defaults to ``demo_cache_dir() / "demo-<hash of the parameters>"``.
    The output is a pure function of the parameters (per-image seeds). A marker
    file is written last; a folder without it (interrupted run, or marker deleted)
    is regenerated. A folder holding ``train/`` or ``val/`` that this function did
    not create is never overwritten.
    """
    for name, value, low in (("n_train_per_class", n_train_per_class, 1), ("n_val_per_class", n_val_per_class, 1),
                             ("size", size, 8), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    params = dict(version=_GENERATOR_VERSION, n_train_per_class=n_train_per_class,
                  n_val_per_class=n_val_per_class, size=size, seed=seed, classes=list(DEMO_CLASSES))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root).expanduser() if root is not None else demo_cache_dir() / f"demo-{digest}"
    if root.exists() and not root.is_dir():
        raise DataError(f"demo dataset root is not a directory: {root}")
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".lock"):
        complete = root / _COMPLETE
        if complete.is_file() and json.loads(complete.read_text() or "{}") == params:
            return root
        owner = root / _OWNER
        splits = [root / "train", root / "val"]
        if not owner.is_file() and any(p.exists() for p in splits):
            raise DataError(f"refusing to overwrite {root}: it has train/ or val/ but is not a dino_fast demo "
                            f"dataset; pass another root")
        complete.unlink(missing_ok=True)
        owner.write_text(json.dumps(params))
        for p in splits:
            shutil.rmtree(p, ignore_errors=True)
        for split_id, (split, n) in enumerate((("train", n_train_per_class), ("val", n_val_per_class))):
            for cls_id, cls in enumerate(DEMO_CLASSES):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(n):
                    # Per-image stream: any one image is reproducible on its own.
                    rng = np.random.default_rng([seed, split_id, cls_id, k])
                    render_demo_image(cls, size, rng).save(folder / f"{cls}_{k:05d}.jpg", quality=_JPEG_QUALITY)
        complete.write_text(json.dumps(params))  # last: marks the folder as finished
    return root
