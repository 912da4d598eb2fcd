"""DINO multi-crop loader on NVIDIA DALI: GPU JPEG decode + per-view augmentations.

One DALI pipeline decodes each image once (``mixed`` nvJPEG on the GPU, libjpeg-turbo
in CPU mode) and builds ``2 + local_crops_number`` views from it, each as in the
official recipe (``main_dino.py: DataAugmentationDINO``)::

    RandomResizedCrop (bicubic, antialiased) -> flip p=.5 -> ColorJitter(.4, .4, .2, .1) p=.8
    -> grayscale p=.2 -> GaussianBlur sigma~U(.1, 2) p = 1.0 | 0.1 | 0.5 (global 1 | global 2 | locals)
    -> solarize (threshold 128) p=.2 on global 2 only -> ImageNet mean/std -> CHW in the training dtype.

Every probability is drawn per SAMPLE (``fn.random.coin_flip``) and drives DALI
conditional execution (``if coin:``), so an op runs only on the samples that drew it.
``return_params=True`` also returns those very coins and factors.

How the DALI ops map to torchvision / PIL (differences stated, none hidden):

- Crop: ``fn.random_resized_crop`` with area fraction in ``scale`` and aspect ratio in
  (3/4, 4/3) as torchvision, ``INTERP_CUBIC`` with antialiasing (PIL's bicubic resize
  also widens its filter when downscaling).
- Flip: applied by ``crop_mirror_normalize`` at the end; everything between the crop
  and the end is per-pixel or a symmetric blur, so the result equals flipping first.
- Colour jitter + grayscale: torchvision draws brightness b, contrast c ~ U(.6, 1.4),
  saturation s ~ U(.8, 1.2), hue h ~ U(-.1, .1) (a fraction of the hue circle) and
  applies them in a random order, clamping to [0, 255] after each. Here the same
  four factors are drawn, and one per-pixel affine map is applied::

      out = b c (P0 + s R(h) (I - P0)) x + b (1 - c) mu

  where ``P0 = 1 w^T`` projects onto Rec.601 luma (w = .299, .587, .114, the weights
  of torchvision's ``rgb_to_grayscale`` and PIL's ``convert("L")``), ``mu`` is the
  crop's mean luma (torchvision's contrast centre) and ``R(h)`` rotates chroma in
  YIQ space by ``h * 360`` degrees. Brightness, contrast and saturation are exact
  torchvision blends; those three commute, so the order does not matter except for
  torchvision's intermediate clamping (here one clamp, at the end). Hue is the one
  approximation: a YIQ rotation (as DALI's own ``fn.hsv``/``fn.color_twist``) instead
  of a shift of the HSV hue. Grayscale multiplies the chroma term by 0, which gives
  exactly ``rgb_to_grayscale`` of the jittered image, equal in all three channels.
- Blur: ``fn.gaussian_blur`` with the drawn sigma (PIL's ``GaussianBlur(radius)``
  takes the same sigma; PIL approximates the Gaussian with box filters, DALI uses a
  true kernel of radius ceil(3 sigma)).
- Solarize: a uint8 lookup table, ``x >= 128 -> 255 - x`` (PIL ``ImageOps.solarize``).
- bfloat16: DALI has no bf16 type, so bf16 views are produced as float16 (normalized
  values lie within +-3, where fp16 holds 3 more mantissa bits than bf16) and cast.

Sample order is the one of :class:`~dino_fast.data.sampling.ResumableSampler`: epoch
``e`` is ``randperm(N)`` seeded with ``seed * 1_000_003 + e``, laid out as
(batches, shards, batch_size), shard ``k`` taking column ``k``. ``last_batch="drop"``
drops the tail that does not fill a global batch (the official behaviour); ``"pad"``
fills it by wrapping around the permutation, so every image is seen each epoch and a
few twice. Files are read in Python and fed through ``fn.external_source`` (rather
than ``fn.readers.file``, whose epoch shuffle is not seeded by the user seed), so the
order is a pure function of (seed, epoch) and ``set_epoch`` can start anywhere.
Augmentation draws are deterministic for a given seed, shard and starting point;
a run resumed with ``set_epoch`` sees the same images in the same order but not the
same crops as an uninterrupted run.

DALI's decoder stops the whole pipeline on a broken file, so files are checked up
front (``validate``): ``"header"`` (default) reads the head and tail of each file
(JPEG: the markers up to the scan and an end-of-image marker after it, which catches
truncation; PNG: signature and IEND chunk; other formats are fully decoded by PIL),
``"full"`` decodes every file with PIL, ``"none"`` trusts the folder. Bad files are
skipped with a warning naming each and counted in :attr:`num_skipped`.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dino_fast.data.folder import IMG_EXTENSIONS, CorruptImageWarning, DataError, ImageFolderDataset

try:  # DALI is optional: without it this module still imports and dali_available() is False.
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    _DALI_IMPORT_ERROR: Exception | None = None
except Exception as _e:  # ImportError, or OSError when a shared library is missing
    _DALI_IMPORT_ERROR = _e

__all__ = ["DALIMultiCropLoader", "build_dali_loader", "dali_available", "validate_image_file", "PARAM_NAMES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_FLIP_P, _JITTER_P, _GRAY_P = 0.5, 0.8, 0.2
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0.4, 0.4, 0.2, 0.1  # official ColorJitter arguments
_BLUR_SIGMA = (0.1, 2.0)
_SOLARIZE_THRESHOLD = 128
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# YIQ (NTSC): row 0 is luma; rows 1-2 (chroma) sum to 0, so gray (x = k 1) has no chroma.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)

# Columns of the per-view record returned with return_params=True, in order.
PARAM_NAMES = ("flip", "color_jitter", "grayscale", "blur", "solarize",
               "brightness", "contrast", "saturation", "hue", "blur_sigma")
_BOOL_PARAMS = PARAM_NAMES[:5]

_MAX_WARNINGS = 20  # one warning per skipped file up to this many, then a summary


def dali_available() -> bool:
    """True when ``nvidia.dali`` and its PyTorch plugin import."""
    return _DALI_IMPORT_ERROR is None


def _color_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P0 (luma projection 1 w^T), P1 = I - P0 (chroma) and P2 (chroma rotated 90 deg), float32.

    A chroma rotation by theta is ``cos(theta) P1 + sin(theta) P2``; P1 and P2 leave
    luma unchanged (w^T P1 = w^T P2 = 0), so the jitter's mean luma is b * mu.
    """
    yiq2rgb = np.linalg.inv(_RGB2YIQ)
    e0 = np.diag([1.0, 0.0, 0.0])
    rot90 = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p0 = yiq2rgb @ e0 @ _RGB2YIQ
    p1 = np.eye(3) - p0
    p2 = yiq2rgb @ rot90 @ _RGB2YIQ
    return p0.astype(np.float32), p1.astype(np.float32), p2.astype(np.float32)


# --- file checks --------------------------------------------------------------------------------------------

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The "header" check reads the first _HEAD_BYTES and the last _TAIL_BYTES of a file
# (more only for unusual files), not the whole data set.
_HEAD_BYTES = 16384
_TAIL_BYTES = 4096


class _Window:
    """Byte ranges of an open file, served from one initial read of its head when possible."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size
        self.head = f.read(min(size, _HEAD_BYTES))

    def at(self, pos: int, n: int) -> bytes:
        if pos + n <= len(self.head):
            return self.head[pos:pos + n]
        self.f.seek(pos)
        return self.f.read(n)


def _jpeg_problem(w: _Window) -> str | None:
    """Why DALI's JPEG decoder would reject the file, or None. Walks the marker
    segments up to the first scan (SOS) and requires an end-of-image marker (FFD9)
    after it: entropy-coded data byte-stuffs every 0xFF, so FFD9 there is a real
    EOI, and a truncated file has none. The tail is searched first; only files with
    trailing bytes after the EOI are searched whole."""
    pos, frame = 2, None
    while True:
        seg = w.at(pos, 9)  # marker (2), length (2), SOF precision/height/width (5)
        if len(seg) < 4:
            return "truncated in the header"
        if seg[0] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})"
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        if marker == 0xD9:
            return "end-of-image marker before any image data"
        length = (seg[2] << 8) | seg[3]
        if length < 2:
            return f"corrupt JPEG header (segment length {length} at byte {pos})"
        if marker in _JPEG_SOF:
            if len(seg) < 9:
                return "truncated in the frame header"
            frame = ((seg[5] << 8) | seg[6], (seg[7] << 8) | seg[8])
        if marker == 0xDA:  # start of scan
            break
        pos += 2 + length
    if frame is None:
        return "no JPEG frame header before the image data"
    if frame[0] == 0 or frame[1] == 0:
        return f"JPEG frame of size {frame[1]}x{frame[0]}"
    tail_start = max(pos, w.size - _TAIL_BYTES)
    if b"\xff\xd9" in w.at(tail_start, w.size - tail_start):
        return None
    if tail_start > pos and b"\xff\xd9" in w.at(pos, w.size - pos):
        return None
    return "truncated (no end-of-image marker after the image data)"


def validate_image_file(path: str, mode: str = "header") -> str | None:
    """The reason ``path`` cannot be decoded, or None if it looks fine (see module docstring)."""
    if mode == "none":
        return None
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            w = _Window(f, size)
            if mode == "header" and w.head[:3] == b"\xff\xd8\xff":
                return _jpeg_problem(w)
            if mode == "header" and w.head[:8] == _PNG_SIGNATURE:
                tail_start = max(8, size - _TAIL_BYTES)
                return None if b"IEND" in w.at(tail_start, size - tail_start) else "truncated PNG (no IEND chunk)"
            if mode == "header" and w.head[:2] == b"\xff\xd8":
                return "corrupt JPEG header"
            data = w.head if len(w.head) == size else w.at(0, size)
    except OSError as e:
        return f"unreadable: {e}"
    try:  # any other format (or mode="full"): a complete PIL decode
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                return f"image of size {img.width}x{img.height}"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"not decodable ({type(e).__name__}: {e})"
    return None


# --- the DALI graph -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def _augment_view(images: Any, spec: _ViewSpec, consts: dict[str, Any], out_dtype: Any) -> tuple[Any, Any]:
    """One view of every image in the batch and its (10,) record of draws (PARAM_NAMES)."""
    x = fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.scale),
                               random_aspect_ratio=list(_RATIO), interp_type=types.INTERP_CUBIC, antialias=True)
    flip = fn.random.coin_flip(probability=_FLIP_P, dtype=types.BOOL)
    jitter = fn.random.coin_flip(probability=_JITTER_P, dtype=types.BOOL)
    gray = fn.random.coin_flip(probability=_GRAY_P, dtype=types.BOOL)
    blur = fn.random.coin_flip(probability=spec.blur_p, dtype=types.BOOL)
    solarize = fn.random.coin_flip(probability=spec.solarize_p, dtype=types.BOOL)

    # Factors are drawn for every sample and set to identity where jitter is off, so
    # the record holds the values that were applied.
    j = fn.cast(jitter, dtype=types.FLOAT)
    b = 1.0 + j * (fn.random.uniform(range=[1.0 - _BRIGHTNESS, 1.0 + _BRIGHTNESS]) - 1.0)
    c = 1.0 + j * (fn.random.uniform(range=[1.0 - _CONTRAST, 1.0 + _CONTRAST]) - 1.0)
    s = 1.0 + j * (fn.random.uniform(range=[1.0 - _SATURATION, 1.0 + _SATURATION]) - 1.0)
    h = j * fn.random.uniform(range=[-_HUE, _HUE])
    chroma = (1.0 - fn.cast(gray, dtype=types.FLOAT)) * s  # 0 for grayscale
    theta = h * (-2.0 * math.pi)  # YIQ rotation by -theta shifts the HSV hue by +theta
    matrix = (b * c) * (consts["p0"] + chroma * (dmath.cos(theta) * consts["p1"] + dmath.sin(theta) * consts["p2"]))
    offset = b * (1.0 - c)
    if jitter | gray:
        # mu: mean luma of the crop, torchvision's contrast centre (computed where the pixels are).
        mu = fn.reductions.sum(fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT) * consts["luma"])
        x = fn.cast(fn.coord_transform(x, M=matrix, dtype=types.FLOAT) + mu * offset, dtype=types.UINT8)

    sigma = fn.random.uniform(range=list(_BLUR_SIGMA))
    if spec.blur_p >= 1.0:
        x = fn.gaussian_blur(x, sigma=sigma)
    elif spec.blur_p > 0.0:
        if blur:
            x = fn.gaussian_blur(x, sigma=sigma)
    if spec.solarize_p > 0.0:
        if solarize:
            x = fn.lookup_table(x, keys=consts["lut_keys"], values=consts["lut_values"], dtype=types.UINT8)

    x = fn.crop_mirror_normalize(x, mirror=fn.cast(flip, dtype=types.INT32), dtype=out_dtype, output_layout="CHW",
                                 mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * sd for sd in IMAGENET_STD])
    record = fn.stack(*[fn.cast(v, dtype=types.FLOAT) for v in (flip, jitter, gray, blur, solarize)],
                      b, c, s, h, sigma * fn.cast(blur, dtype=types.FLOAT))
    return x, record


def _multicrop_graph(source: Any, views: tuple[_ViewSpec, ...], on_gpu: bool, out_dtype: Any,
                     return_params: bool) -> tuple[Any, ...]:
    """Pipeline body: (view_0, ..., view_{V-1}, labels[, indices, records (V, 10)])."""
    n_in = 3 if return_params else 2  # (encoded, labels[, indices])
    encoded, labels, *indices = fn.external_source(source=source, num_outputs=n_in, batch=True,
                                                   dtype=[types.UINT8] + [types.INT64] * (n_in - 1),
                                                   ndim=[1] + [0] * (n_in - 1))
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    p0, p1, p2 = _color_matrices()
    # Constants are made inside the graph function: conditionals only accept nodes of this trace.
    consts = {"p0": types.Constant(p0), "p1": types.Constant(p1), "p2": types.Constant(p2),
              "luma": types.Constant(_LUMA),
              "lut_keys": list(range(256)),
              "lut_values": [float(255 - k if k >= _SOLARIZE_THRESHOLD else k) for k in range(256)]}
    outputs, records = [], []
    for spec in views:
        view, record = _augment_view(images, spec, consts, out_dtype)
        outputs.append(view)
        records.append(record)
    if on_gpu:
        labels = labels.gpu()
    if return_params:
        return (*outputs, labels, indices[0], fn.stack(*records))
    return (*outputs, labels)


# --- the loader ---------------------------------------------------------------------------------------------

def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (min, max), got {scale!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale!r}")
    return lo, hi


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT16"}


class DALIMultiCropLoader:
    """Iterable over ``(views, labels)`` of one epoch, like the torchvision loader.

    ``views`` is a list of ``2 + local_crops_number`` tensors ``(B, 3, size, size)`` in
    ``dtype`` (globals first), ``labels`` a ``(B,)`` int64 tensor; both on
    ``cuda:device_id`` in GPU mode, on the CPU in CPU mode. With ``return_params=True``
    a third element maps each name of :data:`PARAM_NAMES` to a CPU tensor ``(B, V)``
    (bool for the coins, float32 for the factors; hue as a fraction of the circle,
    blur_sigma 0 where no blur) plus ``"index"`` ``(B,)``, the position in
    :attr:`samples` of each image.

    Each ``iter()`` runs the epoch set by :meth:`set_epoch` (else the one after the
    last completed epoch, starting at 0). ``len()`` is the number of batches that
    iteration yields. Sharding: ``shard_id`` = rank, ``num_shards`` = world size;
    every shard gets the same number of batches.
    """

    def __init__(self, root: str | os.PathLike, batch_size: int,
                 global_crops_scale: Sequence[float] = (0.4, 1.0), local_crops_scale: Sequence[float] = (0.05, 0.4),
                 local_crops_number: int = 8, global_crops_size: int = 224, local_crops_size: int = 96, *,
                 device: str = "gpu", device_id: int | None = 0, num_threads: int = 4, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1, shuffle: bool = True,
                 dtype: torch.dtype = torch.float32, last_batch: str = "drop", return_params: bool = False,
                 validate: str = "header", prefetch_queue_depth: int = 2,
                 extensions: Sequence[str] = IMG_EXTENSIONS) -> None:
        if not dali_available():
            raise ImportError(f"nvidia.dali is not usable ({type(_DALI_IMPORT_ERROR).__name__}: "
                              f"{_DALI_IMPORT_ERROR}); install nvidia-dali-cuda130 or use the torchvision loader")
        device = {"cuda": "gpu"}.get(device, device)
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu":
            if not torch.cuda.is_available():
                raise ValueError("device='gpu' needs CUDA, which torch does not see; use device='cpu'")
            device_id = torch.cuda.current_device() if device_id is None else device_id
            _check_int("device_id", device_id, 0)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.local_crops_number = _check_int("local_crops_number", local_crops_number, 0)
        self.global_crops_size = _check_int("global_crops_size", global_crops_size, 1)
        self.local_crops_size = _check_int("local_crops_size", local_crops_size, 1)
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.num_shards = _check_int("num_shards", num_shards, 1)
        self.shard_id = _check_int("shard_id", shard_id, 0)
        if shard_id >= num_shards:
            raise ValueError(f"shard_id={shard_id} must be < num_shards={num_shards}")
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self.prefetch_queue_depth = _check_int("prefetch_queue_depth", prefetch_queue_depth, 1)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype!r}")
        if last_batch not in ("drop", "pad"):
            raise ValueError(f"last_batch must be 'drop' or 'pad', got {last_batch!r}")
        if validate not in ("header", "full", "none"):
            raise ValueError(f"validate must be 'header', 'full' or 'none', got {validate!r}")
        self.device, self.device_id, self.seed, self.shuffle = device, device_id, seed, bool(shuffle)
        self.dtype, self.last_batch, self.return_params = dtype, last_batch, bool(return_params)

        folder = ImageFolderDataset(root, extensions=extensions)  # DataError on a missing / empty folder
        self.root, self.classes, self.class_to_idx = folder.root, folder.classes, folder.class_to_idx
        self.skipped: list[tuple[str, str]] = []
        self.samples = self._validated(folder.samples, validate)
        n, global_batch = len(self.samples), self.batch_size * self.num_shards
        self.batches_per_epoch = n // global_batch if last_batch == "drop" else -(-n // global_batch)
        if self.batches_per_epoch == 0:
            raise DataError(f"{n} usable images in {self.root} is fewer than one global batch "
                            f"({self.batch_size} x {self.num_shards} shards) with last_batch='drop'")
        self._paths = [p for p, _ in self.samples]
        self._labels = np.array([label for _, label in self.samples], np.int64)

        self._views = ((_ViewSpec(global_crops_size, self.global_crops_scale, 1.0, 0.0),
                        _ViewSpec(global_crops_size, self.global_crops_scale, 0.1, 0.2))
                       + (_ViewSpec(local_crops_size, self.local_crops_scale, 0.5, 0.0),) * local_crops_number)
        self._io = ThreadPoolExecutor(max_workers=min(8, self.num_threads), thread_name_prefix="dali-read")
        self._epoch, self._start_batch = 0, 0
        self._pipe = self._iter = None
        self._stream_start = self._fed = self._delivered = 0
        self._order_cache: dict[int, np.ndarray] = {}

    # -- dataset facts ------------------------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return len(self._views)

    @property
    def num_skipped(self) -> int:
        """Files left out by the up-front check (see :attr:`skipped` for paths and reasons)."""
        return len(self.skipped)

    def __len__(self) -> int:
        return self.batches_per_epoch - self._start_batch

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, images={len(self.samples)}, "
                f"skipped={self.num_skipped}, batch_size={self.batch_size}, views={self.num_views}, "
                f"device={self.device!r}, shard={self.shard_id}/{self.num_shards})")

    def _validated(self, samples: list[tuple[str, int]], mode: str) -> list[tuple[str, int]]:
        if mode == "none":
            return list(samples)
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 2)) as pool:
            problems = list(pool.map(lambda s: validate_image_file(s[0], mode), samples))
        good = []
        for (path, label), problem in zip(samples, problems):
            if problem is None:
                good.append((path, label))
                continue
            self.skipped.append((path, problem))
            if len(self.skipped) <= _MAX_WARNINGS:
                warnings.warn(f"skipping unreadable image {path}: {problem}", CorruptImageWarning, stacklevel=3)
        if len(self.skipped) > _MAX_WARNINGS:
            warnings.warn(f"skipped {len(self.skipped)} unreadable images in {self.root} in all "
                          f"(the first {_MAX_WARNINGS} named above; see .skipped)", CorruptImageWarning, stacklevel=3)
        if not good:
            raise DataError(f"no decodable image in {self.root}: all {len(samples)} files failed the check")
        return good

    # -- order ------------------------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This shard's sample indices for ``epoch``, shape (batches_per_epoch, batch_size)."""
        if epoch not in self._order_cache:
            n, nb, b, k = len(self.samples), self.batches_per_epoch, self.batch_size, self.num_shards
            if self.shuffle:  # same permutation as ResumableSampler, so both backends see one order
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(n, generator=g).numpy()
            else:
                perm = np.arange(n)
            total = nb * b * k
            order = np.resize(perm, total)  # drop: truncates; pad: wraps around the permutation
            if len(self._order_cache) >= 2:
                self._order_cache.pop(min(self._order_cache))
            self._order_cache[epoch] = order.reshape(nb, k, b)[:, self.shard_id].copy()
        return self._order_cache[epoch]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` yields batches ``start_batch..`` of ``epoch``; a resume does not decode
        the batches it skips."""
        _check_int("epoch", epoch, 0)
        if not 0 <= start_batch < self.batches_per_epoch:
            raise ValueError(f"start_batch={start_batch} must be in [0, {self.batches_per_epoch})")
        self._epoch, self._start_batch = epoch, start_batch

    # -- the stream DALI pulls from ---------------------------------------------------------------------------
    def _next_input(self) -> tuple[list[np.ndarray], ...]:
        """external_source callback: batch ``_fed`` of the endless stream that starts at ``_stream_start``.

        The stream never ends (no StopIteration), so DALI's prefetching runs on across
        epoch boundaries without a bubble; ``__iter__`` counts batches per epoch."""
        g = self._stream_start + self._fed
        self._fed += 1
        epoch, b = divmod(g, self.batches_per_epoch)
        idx = self.epoch_indices(epoch)[b]
        data = list(self._io.map(lambda i: np.fromfile(self._paths[i], dtype=np.uint8), idx.tolist()))
        labels = [np.array(self._labels[i]) for i in idx]
        if self.return_params:
            return data, labels, [np.array(i, np.int64) for i in idx]
        return data, labels

    def _build(self, stream_start: int) -> None:
        self.close_pipeline()
        self._stream_start, self._fed, self._delivered = stream_start, 0, 0
        # Augmentation seed from (seed, shard, start): shards draw different crops, runs repeat exactly.
        pipe_seed = int(np.random.SeedSequence([self.seed, self.shard_id, stream_start]).generate_state(1)[0] >> 1)
        on_gpu = self.device == "gpu"
        out_dtype = getattr(types.DALIDataType, _DTYPES[self.dtype])
        make = pipeline_def(enable_conditionals=True)(_multicrop_graph)
        pipe = make(self._next_input, self._views, on_gpu, out_dtype, self.return_params,
                    batch_size=self.batch_size, num_threads=self.num_threads,
                    device_id=self.device_id if on_gpu else None, seed=pipe_seed,
                    prefetch_queue_depth=self.prefetch_queue_depth)
        names = [f"view{v}" for v in range(self.num_views)] + ["labels"]
        if self.return_params:
            names += ["index", "params"]
        try:
            pipe.build()
            self._iter = DALIGenericIterator(pipe, names, size=-1, auto_reset=False, prepare_first_batch=False)
        except RuntimeError as e:
            raise DataError(f"DALI could not start the pipeline on {self.root}: {e}") from e
        self._pipe, self._names = pipe, names

    def close_pipeline(self) -> None:
        """Release the DALI pipeline (and its GPU buffers); the next ``iter()`` builds a new one."""
        self._iter = self._pipe = None

    def close(self) -> None:
        """Release the pipeline and the file-reading threads; the loader cannot be iterated afterwards."""
        self.close_pipeline()
        self._io.shutdown(wait=False)

    def __iter__(self) -> Iterator[tuple]:
        target = self._epoch * self.batches_per_epoch + self._start_batch
        if self._pipe is None or self._stream_start + self._delivered != target:
            self._build(target)  # first epoch, resume, or a previous epoch left part-way
        for _ in range(self._start_batch, self.batches_per_epoch):
            try:
                out = next(self._iter)[0]
            except StopIteration:  # not expected: the stream is endless
                raise DataError("DALI pipeline ended early") from None
            except RuntimeError as e:
                self.close_pipeline()
                raise DataError(f"DALI failed on a batch from {self.root} ({e}); if a file is corrupt in a way the "
                                f"up-front check missed, rebuild the loader with validate='full'") from e
            self._delivered += 1
            yield self._convert(out)
        self._epoch, self._start_batch = self._epoch + 1, 0

    def _convert(self, out: dict[str, torch.Tensor]) -> tuple:
        views = [out[f"view{v}"] for v in range(self.num_views)]
        if self.dtype == torch.bfloat16:
            views = [v.to(torch.bfloat16) for v in views]
        labels = out["labels"].reshape(-1)
        if not self.return_params:
            return views, labels
        rec = out["params"].float()  # (B, V, len(PARAM_NAMES))
        params = {name: (rec[..., k] > 0.5 if name in _BOOL_PARAMS else rec[..., k].contiguous())
                  for k, name in enumerate(PARAM_NAMES)}
        params["index"] = out["index"].reshape(-1)
        return views, labels, params


def build_dali_loader(cfg: Any, root: str | os.PathLike | None = None, *, rank: int = 0, world_size: int = 1,
                      device: torch.device | str | None = None, **overrides: Any) -> DALIMultiCropLoader:
    """A :class:`DALIMultiCropLoader` from a config with the official names
    (``data_path``, ``batch_size_per_gpu``, ``global_crops_scale``, ``local_crops_scale``,
    ``local_crops_number``, ``global_crops_size``, ``local_crops_size``, ``num_workers``,
    ``seed``). GPU mode with bf16 views on CUDA, CPU mode with fp32 otherwise."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    kwargs: dict[str, Any] = dict(
        global_crops_scale=cfg.global_crops_scale, local_crops_scale=cfg.local_crops_scale,
        local_crops_number=cfg.local_crops_number,
        global_crops_size=getattr(cfg, "global_crops_size", 224), local_crops_size=getattr(cfg, "local_crops_size", 96),
        device="gpu" if on_gpu else "cpu", device_id=device.index if on_gpu else None,
        num_threads=max(1, int(getattr(cfg, "num_workers", 4))), seed=int(getattr(cfg, "seed", 0)),
        shard_id=rank, num_shards=world_size, dtype=torch.bfloat16 if on_gpu else torch.float32)
    kwargs.update(overrides)
    return DALIMultiCropLoader(root if root is not None else cfg.data_path, cfg.batch_size_per_gpu, **kwargs)
