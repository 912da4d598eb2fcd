"""``dino-fast pack``: an image folder written as tar shards (WebDataset layout) with an index.

    dino-fast pack --data_path imagenet/train --out shards/ --shard_size 1GB
    dino-fast train --data_path shards/ ...          # both loaders read the shards through the index

The folder is listed by the one lister (:func:`dino_fast.data.listing.list_folder`: symlink-safe,
the same order as the folder loader), and every image is copied byte for byte (not decoded: a
broken file becomes a member the loaders skip with a warning, as they skip the file). Members are
``<key>.<ext>`` then ``<key>.cls``; a shard is closed before it would pass ``--shard_size``. Each
shard is written as ``.tmp`` and renamed when complete; the index (:mod:`dino_fast.data.shards`)
is written last, atomically: a folder without ``shards.json`` is an interrupted pack. The output
is a pure function of the folder (fixed member headers: mtime 0, owner root, mode 0644).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from dino_fast.data.listing import IMG_EXTENSIONS, list_folder
from dino_fast.data.shards import FORMAT, INDEX_NAME, VERSION, encode_array, is_shard_folder
from dino_fast.errors import DataError

__all__ = ["pack", "parse_size", "main"]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MIN_SHARD = 4096


def parse_size(text: str | int) -> int:
    """Bytes from ``1GB`` (10^9), ``512MiB`` (2^29), ``1.5GB`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise DataError(f"--shard_size {text!r} is not a size: give bytes or a number with a unit "
                        f"(500MB, 1GB, 4GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < _MIN_SHARD:
        raise DataError(f"--shard_size {text!r} is {size} bytes; give at least {_MIN_SHARD} (1GB is usual)")
    return size


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "root", "root"
    return info


def _check_out(data: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        hint = " (a pack that was interrupted leaves .tmp files: remove them)" if any(out.glob("*.tmp")) else ""
        raise DataError(f"--out {out} is not empty; pack writes into a new or empty folder{hint}")
    real_data, real_out = os.path.realpath(data), os.path.realpath(out)
    if real_out == real_data or real_out.startswith(real_data.rstrip(os.sep) + os.sep):
        raise DataError(f"--out {out} is inside --data_path {data}: the shards would become a class folder; "
                        f"write them elsewhere")


class _ShardWriter:
    """Appends members to ``shard-NNNNNN.tar``, starting a new shard before one would pass ``limit`` bytes."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.shards: list[dict] = []
        self.file: BinaryIO | None = None
        self.tar: tarfile.TarFile | None = None

    def _close(self) -> None:
        if self.tar is None or self.file is None:
            return
        self.tar.close()  # end-of-archive blocks; the file stays open (we passed it in)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tar = self.file = None
        name = self.shards[-1]["name"]
        os.replace(self.out / (name + ".tmp"), self.out / name)
        self.shards[-1]["bytes"] = (self.out / name).stat().st_size

    def add(self, key: str, ext: str, data: bytes, label: int) -> tuple[int, int]:
        """(shard number, byte offset of the image in it) of the member written."""
        cls = str(label).encode()
        need = 2 * 512 + len(data) + 511 + len(cls) + 511  # two headers and the padded data
        if self.tar is not None and self.tar.offset + need + tarfile.RECORDSIZE > self.limit \
                and self.shards[-1]["members"]:
            self._close()
        if self.tar is None:
            self.shards.append({"name": f"shard-{len(self.shards):06d}.tar", "members": 0})
            self.file = open(self.out / (self.shards[-1]["name"] + ".tmp"), "wb")
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        offset = self.tar.offset - -(-len(data) // 512) * 512  # the data ends where its padding does
        self.tar.addfile(_member(f"{key}.cls", len(cls)), io.BytesIO(cls))
        self.shards[-1]["members"] += 1
        return len(self.shards) - 1, offset

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def pack(data_path: str | os.PathLike, out: str | os.PathLike, shard_size: int | str = "1GB",
         extensions: Sequence[str] = IMG_EXTENSIONS, log_every: int = 50_000) -> Path:
    """Write the image folder ``data_path`` as shards into ``out`` (new or empty); returns the index path."""
    data, out = Path(data_path).expanduser(), Path(out).expanduser()
    limit = parse_size(shard_size)
    if is_shard_folder(data):
        raise DataError(f"--data_path {data} is a shard folder already (it holds {INDEX_NAME})")
    if not data.is_dir():
        raise DataError(f"data folder not found: {data}" if not data.exists() else f"--data_path {data} is a file")
    _check_out(data, out)  # before the listing, which may take minutes on a large folder
    listing = list_folder(data, extensions)  # DataError on an empty folder, ListingWarning per link not followed
    samples = listing.samples()
    if not samples:
        raise DataError(f"no images under {data}")
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, limit)
    n = len(samples)
    shard, offset, size, label = (np.empty(n, np.int64) for _ in range(4))
    for k, (path, lab) in enumerate(samples):
        with open(path, "rb") as f:
            blob = f.read()
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        shard[k], offset[k] = writer.add(f"{k:09d}", "jpg" if ext == "jpeg" else ext, blob, lab)
        size[k], label[k] = len(blob), lab
        if log_every and (k + 1) % log_every == 0:
            log.info("packed %d / %d images into %d shards", k + 1, n, shard[k] + 1)
    shards = writer.finish()
    root = str(listing.root)
    index = {"format": FORMAT, "version": VERSION, "classes": listing.classes, "count": n, "shards": shards,
             "members": {"shard": encode_array(shard, "<i4"), "offset": encode_array(offset, "<i8"),
                         "size": encode_array(size, "<i8"), "label": encode_array(label, "<i4")},
             "paths": [os.path.relpath(p, root) for p, _ in samples], "source": os.path.realpath(root)}
    fd, tmp = tempfile.mkstemp(prefix=INDEX_NAME + ".", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / INDEX_NAME)
    log.info("packed %d images of %d classes from %s into %d shards in %s", n, len(listing.classes), data,
             len(shards), out)
    return out / INDEX_NAME


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dino-fast pack``."""
    p = argparse.ArgumentParser(prog="dino-fast pack", description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True, help="image folder (<class>/**/<image>) to pack")
    p.add_argument("--out", required=True, help="new or empty folder for the shards and shards.json")
    p.add_argument("--shard_size", default="1GB", help="largest shard (bytes, or 500MB, 1GB, 4GiB; default 1GB)")
    args = p.parse_args(argv)
    index = pack(args.data_path, args.out, args.shard_size)
    meta = json.loads(index.read_text())
    n = len(meta["shards"])
    print(f"packed {meta['count']} images ({len(meta['classes'])} classes) into {n} shard{'s' * (n != 1)}: "
          f"train with --data_path {index.parent}")
    return 0
