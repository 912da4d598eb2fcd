"""Reading a checkpoint directory safely, and saying exactly what is wrong with a damaged one.

DCP's own reader unpickles ``.metadata`` with plain ``pickle`` and non-tensor values with
``torch.load(weights_only=False)``: here the metadata goes through an unpickler that only builds
DCP's own metadata classes (:mod:`dino_fast.safe_load`), and non-tensor values through
``torch.load(weights_only=True)``. Before a byte is loaded, the shard files are checked against the
sizes the metadata records, so a truncated or missing file is named with an entry it holds; a value
that is not plain tensor data is refused with its entry and file. Every failure is an
:class:`~dino_fast.errors.UnreadableCheckpointError` (``--resume auto`` then tries the previous
checkpoint); DCP's ``CheckpointException`` is unwrapped to its root cause (:func:`root_cause`).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dino_fast.distributed import is_distributed
from dino_fast.errors import CheckpointError, UnreadableCheckpointError
from dino_fast.safe_load import MetadataUnpickler, torch_load_safe

__all__ = ["read_metadata", "dcp_load", "read_checkpoint_values", "safe_load_pth", "root_cause", "first_line"]


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        # weights_only: tensors, containers and numbers only; re-serialised, the base class can place it
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:
            info = self.metadata.storage_data.get(read_item.storage_index)
            where = f"{info.relative_path}, " if info is not None else ""
            raise UnreadableCheckpointError(
                f"entry '{read_item.dest_index.fqn}' ({where}refused: not plain tensor data: "
                f"{type(e).__name__}: {first_line(e)[:160]})") from None
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


def first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def root_cause(e: BaseException) -> BaseException:
    """The error behind DCP's wrapping: the first rank's failure of a ``CheckpointException``,
    then down its ``__cause__`` / ``__context__`` chain to the deepest ``OSError`` if there is one
    (a full disk shows as an enforce failure of the zip writer caused by ``OSError: No space left``)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    deepest, seen = e, set()
    while deepest is not None and id(deepest) not in seen:
        seen.add(id(deepest))
        if isinstance(deepest, (OSError, CheckpointError)):
            return deepest
        deepest = deepest.__cause__ or deepest.__context__
    return e


def read_metadata(path: Path) -> Any:
    try:
        return _SafeReader(str(path)).read_metadata()
    except Exception as e:  # random bytes, truncation, a crafted pickle
        raise UnreadableCheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _storage_problem(path: Path, metadata: Any, keys: set[str] | None = None) -> str | None:
    """A missing or truncated shard file holding one of ``keys`` (all when None), named with its
    entry, found from the sizes the metadata records (no byte is read)."""
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if keys is not None and not any(index.fqn == k or index.fqn.startswith(k + ".") for k in keys):
            continue
        if info.relative_path not in sizes:
            f = path / info.relative_path
            sizes[info.relative_path] = f.stat().st_size if f.is_file() else -1
        have, need = sizes[info.relative_path], info.offset + info.length
        if have < 0:
            return f"{info.relative_path} is missing (it holds entry '{index.fqn}')"
        if have < need:
            return (f"{info.relative_path} is truncated: {have} bytes, entry '{index.fqn}' ends at byte {need}")
    return None


def dcp_load(state: dict[str, Any], path: Path, metadata: Any = None) -> None:
    problem = _storage_problem(path, metadata or read_metadata(path), set(_flat_keys(state)))
    if problem:
        raise UnreadableCheckpointError(f"checkpoint {path}: {problem}")
    kw = dict(checkpoint_id=str(path), storage_reader=_SafeReader(str(path)), planner=_SafePlanner())
    try:
        if is_distributed():
            dcp.load(state, **kw)
            return
        with warnings.catch_warnings():  # DCP warns that it runs without a process group: the intent
            warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
            dcp.load(state, no_dist=True, **kw)
    except CheckpointError as e:
        raise UnreadableCheckpointError(f"checkpoint {path}: {e}") from None
    except (Exception, CheckpointException) as e:  # a corrupt shard, a value that is not plain data, ...
        cause = root_cause(e)
        if isinstance(cause, CheckpointError):
            raise UnreadableCheckpointError(f"checkpoint {path}: {cause}") from None
        raise UnreadableCheckpointError(f"checkpoint {path} could not be read ({type(cause).__name__}: "
                                        f"{first_line(cause)[:300]})") from None


def _flat_keys(obj: Any, prefix: str = "") -> list[str]:
    """DCP's flattened keys of a nested state dict (dicts and lists; leaves of any type)."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _flat_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(obj, list):
        return [k for i, v in enumerate(obj) for k in _flat_keys(v, f"{prefix}.{i}")]
    return [prefix]


def read_checkpoint_values(path: str | Path, keys: dict[str, Any]) -> dict[str, Any]:
    """Non-tensor values (``keys``: name -> placeholder) of a DCP checkpoint, read safely."""
    path = Path(path)
    present = read_metadata(path).state_dict_metadata
    missing = sorted(k for k in keys if k not in present)
    if missing:
        raise CheckpointError(f"{path} is not a dino_fast checkpoint (no {', '.join(missing[:3])})")
    out = dict(keys)
    dcp_load(out, path)
    return out


def safe_load_pth(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` of a single file, with numpy's RNG-state arrays allowed
    (old checkpoints hold ``np.random.get_state()``); one clear error for anything unreadable."""
    try:
        return torch_load_safe(path)  # the one allowlist (dino_fast.safe_load)
    except Exception as e:
        raise UnreadableCheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                                        f"{first_line(e)[:300]}); only tensors, containers and numbers are "
                                        f"loaded") from None
