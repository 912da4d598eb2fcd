"""Up-front file checks of the DALI loader: what DALI's decoder would choke on, each image's size,
and PIL's decompression-bomb limit.

DALI's decoder stops the whole pipeline on a broken file and decodes any size it is given, so
every file is checked once, before the first epoch:

- ``"header"`` (default) reads the head and tail of each file. JPEG: the marker segments up to
  the first scan (the frame header gives the size) and an end-of-image marker after it, which
  catches truncation. PNG: signature, IHDR (the size) and the IEND chunk. Any other format is
  fully decoded by PIL.
- ``"full"`` decodes every file with PIL.
- ``"none"`` trusts the folder; sizes are then read from the bytes when a batch is fed.

The size serves twice: the crop windows are drawn from it (as torchvision draws them from the
PIL image), and it is held to the same pixel limit as the torchvision path, PIL's
``Image.MAX_IMAGE_PIXELS``: above twice the limit PIL refuses the file
(``DecompressionBombError``) and so do we; between once and twice it warns and decodes, and so
do we. A 20000 x 20000 PNG is refused from its 33-byte header instead of being decoded (3.2 GB).
"""
from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from dino_fast.data.listing import CorruptImageWarning
from dino_fast.errors import DataError

__all__ = ["inspect_image_file", "inspect_image_bytes", "inspect_image_stream", "validate_image_file", "pixel_limit",
           "bomb_problem", "validate_samples"]

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The "header" check reads the first _HEAD_BYTES and the last _TAIL_BYTES of a file
# (more only for unusual files), not the whole data set.
_HEAD_BYTES = 16384
_TAIL_BYTES = 4096
_MAX_WARNINGS = 20  # one warning per skipped file up to this many, then a summary

Size = tuple[int, int]  # (height, width)


def pixel_limit() -> int | None:
    """PIL's current ``Image.MAX_IMAGE_PIXELS`` (None: no limit), read at call time so a caller's
    change applies to both back-ends alike."""
    return Image.MAX_IMAGE_PIXELS


def bomb_problem(size: Size) -> str | None:
    """Why an image of ``size`` is refused (over twice PIL's limit, PIL's DecompressionBombError), or None."""
    limit = pixel_limit()
    pixels = max(1, size[0]) * max(1, size[1])
    if limit is not None and pixels > 2 * limit:
        return (f"decompression bomb: {size[1]}x{size[0]} = {pixels} pixels is over twice "
                f"PIL.Image.MAX_IMAGE_PIXELS ({limit})")
    return None


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


def _jpeg(w: _Window) -> tuple[str | None, Size | None]:
    """(why DALI's JPEG decoder would reject the file or None, (height, width)). Walks the marker
    segments up to the first scan (SOS) and requires an end-of-image marker (FFD9) after it:
    entropy-coded data byte-stuffs every 0xFF, so FFD9 there is a real EOI, and a truncated file
    has none. The tail is searched first; only files with trailing bytes after the EOI are
    searched whole."""
    pos, frame = 2, None
    while True:
        seg = w.at(pos, 9)  # marker (2), length (2), SOF precision/height/width (5)
        if len(seg) < 4:
            return "truncated in the header", frame
        if seg[0] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})", frame
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        if marker == 0xD9:
            return "end-of-image marker before any image data", frame
        length = (seg[2] << 8) | seg[3]
        if length < 2:
            return f"corrupt JPEG header (segment length {length} at byte {pos})", frame
        if marker in _JPEG_SOF:
            if len(seg) < 9:
                return "truncated in the frame header", frame
            frame = ((seg[5] << 8) | seg[6], (seg[7] << 8) | seg[8])
        if marker == 0xDA:  # start of scan
            break
        pos += 2 + length
    if frame is None:
        return "no JPEG frame header before the image data", None
    if frame[0] == 0 or frame[1] == 0:
        return f"JPEG frame of size {frame[1]}x{frame[0]}", frame
    problem = bomb_problem(frame)
    if problem:  # refused before the (possibly long) search for the end-of-image marker
        return problem, frame
    tail_start = max(pos, w.size - _TAIL_BYTES)
    if b"\xff\xd9" in w.at(tail_start, w.size - tail_start):
        return None, frame
    if tail_start > pos and b"\xff\xd9" in w.at(pos, w.size - pos):
        return None, frame
    return "truncated (no end-of-image marker after the image data)", frame


def _png(w: _Window) -> tuple[str | None, Size | None]:
    ihdr = w.at(8, 16)  # length (4), b"IHDR", width (4), height (4)
    if len(ihdr) < 16 or ihdr[4:8] != b"IHDR":
        return "corrupt PNG header (no IHDR chunk)", None
    size = (int.from_bytes(ihdr[12:16], "big"), int.from_bytes(ihdr[8:12], "big"))
    if size[0] == 0 or size[1] == 0:
        return f"PNG of size {size[1]}x{size[0]}", size
    problem = bomb_problem(size)
    if problem:
        return problem, size
    tail_start = max(8, w.size - _TAIL_BYTES)
    return (None if b"IEND" in w.at(tail_start, w.size - tail_start) else "truncated PNG (no IEND chunk)"), size


def _inspect(f: BinaryIO, size: int, mode: str) -> tuple[str | None, Size | None]:
    if size == 0:
        return "empty file", None
    w = _Window(f, size)
    if mode == "header" and w.head[:3] == b"\xff\xd8\xff":
        return _jpeg(w)
    if mode == "header" and w.head[:8] == _PNG_SIGNATURE:
        return _png(w)
    if mode == "header" and w.head[:2] == b"\xff\xd8":
        return "corrupt JPEG header", None
    data = w.head if len(w.head) == size else w.at(0, size)
    try:  # any other format (or mode="full"): a complete PIL decode, PIL's own bomb check included
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                return f"image of size {img.width}x{img.height}", None
            return None, (img.height, img.width)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"not decodable ({type(e).__name__}: {e})", None


def inspect_image_file(path: str, mode: str = "header") -> tuple[str | None, Size | None]:
    """(the reason ``path`` cannot be used or None, its (height, width) where known).

    ``mode="none"`` checks nothing and returns (None, None)."""
    if mode == "none":
        return None, None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _inspect(f, size, mode)
    except OSError as e:
        return f"unreadable: {e}", None


def inspect_image_bytes(data: bytes) -> tuple[str | None, Size | None]:
    """:func:`inspect_image_file` ``"header"`` on a file's bytes already in memory."""
    return _inspect(io.BytesIO(data), len(data), "header")


def inspect_image_stream(f: BinaryIO, size: int, mode: str = "header") -> tuple[str | None, Size | None]:
    """:func:`inspect_image_file` on an open binary stream of ``size`` bytes (``read``/``seek``), e.g. one
    member of a tar shard."""
    if mode == "none":
        return None, None
    return _inspect(f, size, mode)


def validate_image_file(path: str, mode: str = "header") -> str | None:
    """The reason ``path`` cannot be decoded, or None if it looks fine (see the module docstring)."""
    return inspect_image_file(path, mode)[0]


def validate_samples(dataset: Any, mode: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Check every sample of ``dataset`` (an image folder or shard dataset: ``samples``, ``inspect(k, mode)``,
    ``describe(k)``): (positions of the usable samples, their (height, width) (-1 where not read: mode
    'none'), [(name, reason)] of those skipped, each warned up to 20, then a count)."""
    n = len(dataset.samples)
    if mode == "none":
        return np.arange(n), np.full((n, 2), -1, np.int64), []
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(lambda k: dataset.inspect(k, mode), range(n)))
    good, sizes, large, skipped = [], [], [], []
    limit = pixel_limit()
    for k, (problem, size) in enumerate(results):
        if problem is None:
            good.append(k)
            sizes.append(size)
            if limit is not None and size[0] * size[1] > limit:
                large.append(f"{dataset.describe(k)} ({size[1]}x{size[0]})")
            continue
        skipped.append((dataset.samples[k][0], problem))
        if len(skipped) <= _MAX_WARNINGS:
            warnings.warn(f"skipping unreadable image {dataset.describe(k)}: {problem}", CorruptImageWarning,
                          stacklevel=3)
    if len(skipped) > _MAX_WARNINGS:
        warnings.warn(f"skipped {len(skipped)} unreadable images in {dataset.root} in all (the first "
                      f"{_MAX_WARNINGS} named above; see .skipped)", CorruptImageWarning, stacklevel=3)
    if large:  # PIL's DecompressionBombWarning range: decoded, as the torchvision path does, but said
        warnings.warn(f"{len(large)} images over PIL.Image.MAX_IMAGE_PIXELS ({limit}) pixels, decoded anyway "
                      f"(refused above twice that): {', '.join(large[:5])}", Image.DecompressionBombWarning,
                      stacklevel=3)
    if not good:
        raise DataError(f"no decodable image in {dataset.root}: all {n} files failed the check")
    return np.array(good, np.int64), np.array(sizes, np.int64).reshape(-1, 2), skipped
