"""One checkpointer for every run: torch.distributed.checkpoint (DCP) directories, written
atomically, read safely.

The trainer hands :class:`Checkpointer` a dict of Stateful parts (``state_dict()`` /
``load_state_dict()``): student, teacher, optimizer, loss (center), train state (step, RNG, run
plan, data position)... Each part is saved under its name; a new piece of training state is one
more entry in that dict and nothing else.

Layout of ``<output_dir>/checkpoints/``:

- ``step-XXXXXXXX/``: DCP's ``.metadata`` plus one ``__<rank>_0.distcp`` per rank. One process
  or many (FSDP2 shards are written by their ranks, nobody gathers the model), and any run
  resumes from it whatever its world size (DCP reshards). The newest ``keep`` are kept.
- ``snapshot-epochNNNN/``: the same files hard-linked, kept for good (``saveckp_freq``).
- ``checkpoint-XXXXXXXX.pth``: the single-file format of earlier versions, read on resume by
  :mod:`dino_fast.checkpoint_legacy` (a one-way converter), never written.

Crash safety: every rank writes into ``step-XXXXXXXX.tmp/``; ``dcp.save`` returns once all
ranks' files and ``.metadata`` (written last) are on disk (fsynced); rank 0 then renames the
directory and fsyncs the parent; a barrier holds the other ranks until then. A directory with
the final name is always complete; ``.tmp`` leftovers are ignored and removed.

Safety: nothing read from a checkpoint can run code, and a damaged one is named
(:mod:`dino_fast.checkpoint_read`). The format, keys and shapes are checked before any state is
touched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from dino_fast.checkpoint_read import dcp_load, first_line, read_checkpoint_values, read_metadata, root_cause
from dino_fast.distributed import barrier, get_rank, is_distributed
from dino_fast.errors import CheckpointError, CheckpointSaveError

__all__ = ["Checkpointer", "Stateful", "FORMAT", "atomic_torch_save", "fsync_dir", "latest_checkpoint",
           "consolidate", "check_checkpoint_dir", "is_dcp_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = "dino_fast-dcp-2"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEGACY_FILE = re.compile(r"^checkpoint-(\d+)\.pth$")
RENAMED_PARTS = {"dino_loss": "loss"}  # part name -> its old name: checkpoints written before still resume


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------- files
def fsync_dir(path: str | Path) -> None:
    """Make renames/creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file beside ``path``, fsync, then rename over ``path`` (exports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A complete DCP directory (its ``.metadata`` is written last)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _listed(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete resumable checkpoints (DCP step directories and legacy files), oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file():
            found.append((int(m.group(1)), 1, p))
        elif m := _LEGACY_FILE.match(p.name):
            found.append((int(m.group(1)), 0, p))
    return [(step, p) for step, _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (temporary files never match)."""
    found = _listed(output_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- key checks
def _flat_tensors(obj: Any, prefix: str) -> dict[str, Any]:
    """DCP's flattened key -> tensor for the tensor leaves of a nested state dict."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_flat_tensors(v, f"{prefix}.{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def saved_part_name(name: str, saved: Any) -> str:
    """``name``, or its old name (:data:`RENAMED_PARTS`) in a checkpoint (keys ``saved``) written before."""
    old, holds = RENAMED_PARTS.get(name), lambda n: any(k.startswith(n + ".") for k in saved)
    return old if old and not holds(name) and holds(old) else name


def check_fits(targets: dict[str, Any], metadata: Any, strict: set[str], path: Path, hint: str = "") -> None:
    """Raise CheckpointError naming missing keys and shape mismatches before anything is loaded."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = metadata.state_dict_metadata
    problems = []
    for name, target in targets.items():
        for key, t in _flat_tensors(target, name).items():
            meta = saved.get(key)
            if meta is None:
                if name in strict:
                    problems.append(f"{key} missing")
            elif not isinstance(meta, TensorStorageMetadata):
                problems.append(f"{key} is not a tensor there")
            elif tuple(meta.size) != tuple(t.shape):
                problems.append(f"{key}: checkpoint {tuple(meta.size)}, this model {tuple(t.shape)}")
    for name in strict:
        ours = set(_flat_tensors(targets[name], name))
        extra = sorted(k for k in saved if k.startswith(name + ".") and k not in ours)
        problems += [f"{k} unexpected" for k in extra]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems[:4])}{more}{hint}")


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves and loads a dict of Stateful parts as DCP checkpoints in ``output_dir/checkpoints``.

    ``strict`` names the parts whose keys must match exactly (the models); the others load
    what the checkpoint has (e.g. no optimizer state for a parameter that never had a gradient).
    A part may define ``load_targets(saved_keys)`` to shape what it loads into.
    """

    def __init__(self, output_dir: str | Path, keep: int = 2, strict: tuple[str, ...] = ("student", "teacher"),
                 every: int = 0, snapshot_every: int = 0):
        self.folder = Path(output_dir) / "checkpoints"
        self.keep, self.strict = keep, set(strict)
        self.every, self.snapshot_every = every, snapshot_every

    # -- cadence: when the training loop saves ---------------------------------------------
    def should_save(self, step: int, force: bool = False) -> bool:
        """Every ``every`` steps, and whenever the loop forces it (epoch end, the end, a stop)."""
        return force or (self.every > 0 and step % self.every == 0)

    def snapshot_epoch(self, finished_epoch: int | None) -> int | None:
        """``finished_epoch`` when a numbered snapshot is kept for it (every ``snapshot_every``
        epochs, as main_dino.py's ``saveckp_freq``), else None."""
        if finished_epoch is None or not self.snapshot_every or finished_epoch % self.snapshot_every:
            return None
        return finished_epoch

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.folder.parent)

    def save(self, parts: dict[str, Stateful], step: int, snapshot: str | None = None) -> Path:
        """Collective: write every part into ``step-<step>/`` (via ``.tmp``); optionally hard-link it
        as ``snapshot-<snapshot>/`` too; prune old step directories. Returns the final path."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of this step
            tmp.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        state = {name: part.state_dict() for name, part in parts.items()}
        try:  # DCP gathers every rank's failure, so all ranks raise together
            if is_distributed():
                dcp.save(state, checkpoint_id=str(tmp))
            else:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        except (Exception, CheckpointException) as e:  # disk full, permission lost, I/O error
            if get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # the space it took is the user's again
            raise self._save_failed(final, e) from None
        if get_rank() == 0:
            if final.exists():  # re-saving a step (resumed from an older checkpoint): replace it
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(final.parent)
            if snapshot:
                self._link(final, self.folder / f"snapshot-{snapshot}")
            self._prune()
        barrier()  # nobody moves on (or reads the checkpoint) before the rename
        return final

    def _save_failed(self, final: Path, e: BaseException) -> CheckpointSaveError:
        """One line: which checkpoint, the error, the free space, and what is still there."""
        cause = root_cause(e)
        try:
            free = f"{shutil.disk_usage(self.folder).free / 2 ** 30:.2f} GiB free on {self.folder}"
        except OSError:
            free = f"free space of {self.folder} unknown"
        prev = self.latest()
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        return CheckpointSaveError(f"saving checkpoint {final} failed: {type(cause).__name__}: "
                                   f"{first_line(cause)[:200]} ({free}); {kept}; fix it and resume with "
                                   f"--resume auto")

    def candidates(self) -> list[Path]:
        """Complete checkpoints, newest first (what ``--resume auto`` tries, in order)."""
        return [p for _, p in reversed(_listed(self.folder.parent))]

    @staticmethod
    def _link(src: Path, dst: Path) -> None:
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in src.iterdir():
            try:
                os.link(f, tmp / f.name)  # same bytes, no copy
            except OSError:
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        fsync_dir(dst.parent)

    def _prune(self) -> None:
        steps = [p for _, p in _listed(self.folder.parent) if p.is_dir()]
        for p in steps[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)

    def load(self, path: str | Path, parts: dict[str, Stateful], hint: str = "") -> None:
        """Collective when distributed: check, then load the checkpoint directory ``path`` into
        ``parts``. ``hint`` is appended to a mismatch error (which flags differ)."""
        path = Path(path)
        check_checkpoint_dir(path)
        metadata = read_metadata(path)
        saved = metadata.state_dict_metadata
        if "train.format" not in saved:
            raise CheckpointError(f"{path} is a DCP checkpoint but not a dino_fast training checkpoint")
        fmt = read_checkpoint_values(path, {"train.format": ""})["train.format"]
        if fmt != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {fmt!r}, this version reads {FORMAT!r}")
        targets, stored = {}, {name: saved_part_name(name, saved) for name in parts}  # targets: by stored name
        for name, part in parts.items():
            keys = {k[len(stored[name]) + 1:] for k in saved if k.startswith(stored[name] + ".")}
            if not keys:
                raise CheckpointError(f"{path} holds no '{name}' state")
            targets[stored[name]] = part.load_targets(keys) if hasattr(part, "load_targets") else part.state_dict()
        check_fits(targets, metadata, self.strict & set(parts), path, hint)  # the strict models were never renamed
        dcp_load(targets, path, metadata)
        for name, part in parts.items():
            part.load_state_dict(targets[stored[name]])


def check_checkpoint_dir(path: Path) -> None:
    """One line for a path that is not a complete checkpoint directory: gone (rotation keeps the
    newest ``keep`` and may have deleted it since it was listed), a file, or an unfinished save."""
    if not path.exists():
        kept = sorted(p.name for _, p in _listed(path.parent.parent)) if path.parent.name == "checkpoints" else []
        now = f"; {path.parent} now holds {', '.join(kept)}" if kept else ""
        raise CheckpointError(f"checkpoint {path} does not exist (or no longer: a run keeps only its newest "
                              f"checkpoints and snapshots){now}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory (step-XXXXXXXX/ in "
                              f"<output_dir>/checkpoints)")
    if not is_dcp_checkpoint(path):
        raise CheckpointError(f"{path} is not a complete checkpoint directory (no .metadata: a save that did "
                              f"not finish?)")


def consolidate(path: str | Path) -> dict[str, Any]:
    """The full (unsharded) models of a checkpoint directory, read on one process into CPU memory:
    ``{"format": "dino_fast", "student", "teacher", "dino_loss", "step", "config"}`` (the official
    training checkpoint's keys, tagged as ours), so ``dino_fast.load_pretrained(consolidate(path))``
    gives the teacher.
    Optimizer state and RNG streams are not read."""
    import json

    path = Path(path)
    check_checkpoint_dir(path)
    saved = read_metadata(path).state_dict_metadata
    meta = read_checkpoint_values(path, {"train.format": "", "train.step": 0, "train.config": ""})
    if meta["train.format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta['train.format']!r}, this version reads {FORMAT!r}")
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    loss_name = saved_part_name("dino_loss", saved)
    targets: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}, loss_name: {}}
    for key, m in saved.items():
        name, _, rest = key.partition(".")
        if name in targets and isinstance(m, TensorStorageMetadata):
            targets[name][rest] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    dcp_load(targets, path)
    return {"format": "dino_fast", "student": targets["student"], "teacher": targets["teacher"],
            "dino_loss": targets[loss_name], "step": int(meta["train.step"]), "config": json.loads(meta["train.config"])}
