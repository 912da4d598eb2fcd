"""Checkpoints written atomically: a crash mid-save never leaves a torn checkpoint behind.

Two formats live side by side in ``<output_dir>/checkpoints/``:

- single-process runs write one ``torch.save`` file per save, ``checkpoint-<step>.pth``; the
  payload goes to a temporary file in the same folder, flushed and fsynced, then renamed over
  the final name (rename is atomic on POSIX), so a file with the final name is always complete;
- sharded (FSDP) runs write a torch.distributed.checkpoint directory ``step-<step>/``
  (``dino_fast.dist_checkpoint``), built as ``step-<step>.tmp/`` and renamed once every rank
  has written its shards; only directories holding DCP's ``.metadata`` count as complete.

``latest_checkpoint`` returns the newest complete checkpoint of either format and
``prune_checkpoints`` keeps the newest few of both; any run can resume from either.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_torch_save", "checkpoint_path", "latest_checkpoint", "prune_checkpoints", "fsync_dir",
           "rng_state", "set_rng_state", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "dino_fast"
_NAME = re.compile(r"^checkpoint-(\d+)\.pth$")
_DIR_NAME = re.compile(r"^step-(\d+)$")
_TMP_DIR_NAME = re.compile(r"^step-(\d+)\.tmp$")


def fsync_dir(path: str | Path) -> None:
    """Make renames/creations inside ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
        fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step:08d}.pth"


def _listed(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of both formats, oldest first (a DCP directory sorts after a file
    of the same step)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if m := _NAME.match(p.name):
            found.append((int(m.group(1)), 0, p))
        elif (m := _DIR_NAME.match(p.name)) and (p / ".metadata").is_file():
            found.append((int(m.group(1)), 1, p))
    return [(step, p) for step, _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, file or DCP directory (temp files and
    ``.tmp`` directories are never matched)."""
    found = _listed(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int = 2) -> None:
    """Delete all but the newest ``keep`` checkpoints, and ``step-*.tmp`` directories left by
    crashed sharded saves (call only when no save is in flight)."""
    for _, p in _listed(output_dir)[:-keep]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    folder = Path(output_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if _TMP_DIR_NAME.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states (saved with every checkpoint)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
