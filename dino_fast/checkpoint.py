"""Checkpoints written atomically: a crash mid-save never leaves a torn file behind.

Single-process checkpoints are one ``torch.save`` file per save,
``<output_dir>/checkpoints/checkpoint-<step>.pth``; the payload is written to a temporary
file in the same folder, flushed and fsynced, then renamed over the final name (rename is
atomic on POSIX), so a file with the final name is always complete. ``latest_checkpoint``
returns the newest such file.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "checkpoint_path", "latest_checkpoint", "prune_checkpoints", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "dino_fast"
_NAME = re.compile(r"^checkpoint-(\d+)\.pth$")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step:08d}.pth"


def _listed(output_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (temp files are never matched)."""
    found = _listed(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, p in _listed(output_dir)[:-keep]:
        p.unlink(missing_ok=True)
