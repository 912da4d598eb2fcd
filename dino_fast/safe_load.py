"""The one allowlist of what reading a checkpoint may build besides tensors and plain containers.

Every file dino_fast reads goes through here, so that nothing read from disk can run code:

- single ``.pth`` files (old dino_fast checkpoints, official DINO checkpoints, released weights):
  ``torch.load(weights_only=True)`` with :data:`TORCH_LOAD_GLOBALS` allowed
  (:func:`torch_load_safe`);
- the ``.metadata`` pickle of a torch.distributed.checkpoint (DCP) directory, which DCP itself
  reads with plain ``pickle``: :class:`MetadataUnpickler` builds DCP's metadata classes and a few
  torch / pathlib pieces, nothing else.

Callers turn the exceptions into their own one-line errors (CheckpointError, PretrainedError).
"""
from __future__ import annotations

import argparse
import os
import pickle
import warnings
from typing import IO, Any

import torch

__all__ = ["TORCH_LOAD_GLOBALS", "torch_load_safe", "MetadataUnpickler"]


def _numpy_globals() -> list[Any]:
    """What a pickled numpy array needs (``np.random.get_state()`` in dino_fast checkpoints)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        return []
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# argparse.Namespace: the ``args`` entry of an official main_dino.py checkpoint (a plain bag of
# attributes); the numpy pieces: a saved numpy RNG state. Nothing else is ever unpickled.
TORCH_LOAD_GLOBALS: tuple[Any, ...] = (argparse.Namespace, *_numpy_globals())


def torch_load_safe(path: str | os.PathLike | IO[bytes]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with :data:`TORCH_LOAD_GLOBALS`
    allowed. Raises what torch.load raises (``pickle.UnpicklingError`` for a refused global)."""
    with torch.serialization.safe_globals(list(TORCH_LOAD_GLOBALS)), warnings.catch_warnings():
        # a plain pickle (not torch.save's zip) makes torch warn about its protocol before it
        # fails: the caller's one-line error says what the file is
        warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file: DCP's metadata classes, torch sizes/dtypes/layouts and
    paths; anything else raises ``pickle.UnpicklingError`` naming it."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _OTHERS = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES and not name.startswith("__"):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type):
                return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in self._OTHERS:
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never needs")
