"""The errors a user can fix. The CLI catches :class:`DinoFastError` and prints one line
(``dino-fast: error: ...``, exit status 2); anything else is a bug and keeps its traceback."""
from __future__ import annotations

__all__ = ["DinoFastError", "ConfigError", "DataError", "CheckpointError", "UnreadableCheckpointError",
           "CheckpointSaveError", "PretrainedError", "NonFiniteLossError", "RunLockError"]


class DinoFastError(Exception):
    """Base of every error whose message tells the user what to change."""


class ConfigError(DinoFastError, ValueError):
    """A bad config key or value."""


class DataError(DinoFastError, ValueError):
    """The data folder cannot be used as given; the message says why and where."""


class CheckpointError(DinoFastError, ValueError):
    """A checkpoint cannot be read or does not fit this run (format, keys, shapes)."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are damaged: not readable, truncated, missing, or holding a value that
    is not plain tensor data (``--resume auto`` then falls back to the previous checkpoint)."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, permission, I/O); the previous one is intact."""


class PretrainedError(DinoFastError, ValueError):
    """Pretrained weights cannot be read or matched to an architecture."""


class NonFiniteLossError(DinoFastError, RuntimeError):
    """The loss became NaN or Inf; nothing was saved after the last finite check."""


class RunLockError(DinoFastError, RuntimeError):
    """Another run holds the output folder."""
