"""Training data from tar shards written by ``dino-fast pack`` (:mod:`dino_fast.data.pack`).

A shard folder holds ``shard-NNNNNN.tar`` files in the WebDataset layout (member ``<key>.jpg``, the
encoded image exactly as it was in the folder, then ``<key>.cls``, its label as ASCII digits; keys
are the sample's position, nine digits) and ``shards.json``, the index: the class list, the count,
each shard's name and size, and per member its shard, the byte offset and size of the image in that
shard, its label and the path it was packed from. The index is written last and atomically, so a
folder with an index is complete.

Reading goes through the index, one ``pread`` per image (no tar parsing, no sequential scan): sample
``k`` of the shards is sample ``k`` of the folder it was packed from, so the sampler, the draws and
the resume position (the sampler's batch) are the ones of the folder loader, and both give the same
views for the same seed. Corrupt members are skipped with a warning naming the shard and the key,
as files are for a folder.

Why not DALI's ``fn.readers.webdataset``: it streams members in shard order and shuffles with a
buffer seeded by DALI's own seed, so its order is not the folder loader's ``(seed, epoch)``
permutation and a resume mid-shard would have to replay the buffer; reading members by
``(shard, offset, size)`` inside the loader's ``fn.external_source`` keeps the order a pure function
of ``(seed, epoch)`` and the resume exact at any batch. The cost is one random read per image
instead of a sequential stream (fine on local NVMe and page cache; on network storage, readahead
per shard is what the streaming reader would add).
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from dino_fast.data.folder import ImageFolderDataset
from dino_fast.data.listing import IMG_EXTENSIONS
from dino_fast.errors import DataError

__all__ = ["INDEX_NAME", "ShardIndex", "ShardDataset", "is_shard_folder", "open_dataset", "encode_array"]

INDEX_NAME = "shards.json"
FORMAT, VERSION = "dino_fast.shards", 1
_COLUMNS = {"shard": "<i4", "offset": "<i8", "size": "<i8", "label": "<i4"}


def encode_array(a: np.ndarray, dtype: str) -> dict[str, str]:
    """A column of the index: little-endian bytes in base64 (a JSON list of 1.28 M ints parses 10x slower)."""
    return {"dtype": dtype, "base64": base64.b64encode(np.ascontiguousarray(a, dtype).tobytes()).decode()}


def _decode_array(col: dict[str, str], n: int) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(col["base64"]), np.dtype(col["dtype"]))
    if len(a) != n:
        raise ValueError(f"a column has {len(a)} entries for {n} members")
    return a


def is_shard_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a shard index (``shards.json``)."""
    return (Path(path).expanduser() / INDEX_NAME).is_file()


class ShardIndex:
    """The index of a shard folder: ``classes``, ``count``, ``shards`` (names), per member ``shard``,
    ``offset``, ``size``, ``label`` (arrays) and ``paths`` (where it was packed from). Reads members
    with ``pread`` on descriptors opened once (position-free: safe across threads and forked workers)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        path = self.root / INDEX_NAME
        try:
            meta = json.loads(path.read_text())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, "
                                 f"expected {FORMAT!r} version {VERSION}")
            self.count = int(meta["count"])
            self.classes = list(meta["classes"])
            self.shards = [s["name"] for s in meta["shards"]]
            cols = {name: _decode_array(meta["members"][name], self.count) for name in _COLUMNS}
            self.paths = list(meta["paths"])
            self.keys = [f"{k:09d}" for k in range(self.count)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"shard index {path} is unreadable ({type(e).__name__}: {e}); pack the folder again")
        self.shard, self.offset, self.size, self.label = cols["shard"], cols["offset"], cols["size"], cols["label"]
        for s in meta["shards"]:  # a missing or cut shard is said at start, not as a failed read later
            f = self.root / s["name"]
            if not f.is_file():
                raise DataError(f"shard {f} listed in {path} is missing")
            if f.stat().st_size != s["bytes"]:
                raise DataError(f"shard {f} has {f.stat().st_size} bytes, the index says {s['bytes']}: "
                                f"it was cut or replaced; pack the folder again")
        if len(self.paths) != self.count or (self.count and int(self.label.max()) >= len(self.classes)):
            raise DataError(f"shard index {path} is inconsistent (paths or labels do not fit {self.count} members "
                            f"and {len(self.classes)} classes); pack the folder again")
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) open their own descriptors
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:  # DALI's reading threads may race here: one descriptor is kept, the other closed
            opened = os.open(self.root / self.shards[shard], os.O_RDONLY)
            fd = self._fds.setdefault(shard, opened)
            if fd != opened:
                os.close(opened)
        return fd

    def read_at(self, k: int, pos: int, n: int) -> bytes:
        """``n`` bytes of member ``k``'s image from its byte ``pos`` (fewer at its end)."""
        n = max(0, min(n, int(self.size[k]) - pos))
        return os.pread(self._fd(int(self.shard[k])), n, int(self.offset[k]) + pos)

    def read(self, k: int) -> np.ndarray:
        """Member ``k``'s image bytes, read straight into a new uint8 array."""
        buf = np.empty(int(self.size[k]), np.uint8)
        got = os.preadv(self._fd(int(self.shard[k])), [buf], int(self.offset[k])) if len(buf) else 0
        if got != len(buf):
            raise DataError(f"{self.describe(k)}: read {got} of {len(buf)} bytes (the shard was cut)")
        return buf

    def describe(self, k: int) -> str:
        return f"shard {self.root / self.shards[int(self.shard[k])]} key {self.keys[k]} (packed from {self.paths[k]})"


class _Member:
    """A member's image as a read-only file (``read``/``seek``/``tell``): the header check reads its head
    and tail without reading the whole image."""

    def __init__(self, index: ShardIndex, k: int) -> None:
        self.index, self.k, self.pos = index, k, 0

    def read(self, n: int = -1) -> bytes:
        n = int(self.index.size[self.k]) - self.pos if n is None or n < 0 else n
        data = self.index.read_at(self.k, self.pos, n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else int(self.index.size[self.k]) + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


class ShardDataset(ImageFolderDataset):
    """:class:`ImageFolderDataset` over a shard folder: the same attributes (``classes``, ``samples`` as
    ``("<root>/<shard>:<key>", label)``, ``targets``) and the same corrupt-image skipping."""

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.extensions = IMG_EXTENSIONS
        self.index = ShardIndex(self.root)
        if self.index.count == 0:
            raise DataError(f"shard folder {self.root} holds no images")
        self.classes = self.index.classes
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        self.skipped_links: list[str] = []
        names, keys = [os.path.join(self.root, n) for n in self.index.shards], self.index.keys
        self.samples = [(f"{names[s]}:{keys[k]}", int(lab))
                        for k, (s, lab) in enumerate(zip(self.index.shard.tolist(), self.index.label.tolist()))]
        self.targets = [label for _, label in self.samples]
        self._corrupt: set[str] = set()

    def decode(self, k: int) -> Image.Image:
        import io

        with Image.open(io.BytesIO(self.index.read(k).tobytes())) as img:
            return img.convert("RGB")

    def read_bytes(self, k: int) -> np.ndarray:
        return self.index.read(k)

    def describe(self, k: int) -> str:
        return self.index.describe(k)

    def inspect(self, k: int, mode: str = "header") -> tuple[str | None, tuple[int, int] | None]:
        from dino_fast.data.dali_validate import inspect_image_stream

        try:
            return inspect_image_stream(_Member(self.index, k), int(self.index.size[k]), mode)
        except OSError as e:
            return f"unreadable: {e}", None


def open_dataset(path: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageFolderDataset:
    """The training images at ``path``: a :class:`ShardDataset` when it holds a shard index, else an
    :class:`ImageFolderDataset` (both: ``classes``, ``samples``, ``decode``/``read_bytes``/``inspect``)."""
    if is_shard_folder(path):
        return ShardDataset(path, transform)
    return ImageFolderDataset(path, transform, extensions)
