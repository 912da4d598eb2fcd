"""One run per output folder: a lock taken before anything is written there, and the clean-up
of temp files that killed saves left behind.

:class:`RunLock` holds ``fcntl.flock`` on ``<output_dir>/.dino_fast.lock`` for the life of the
run and writes the holder (host, pid, start time, command) inside. The kernel drops a flock
when its process dies, however it dies (SIGKILL, OOM killer, power loss of the node), so a
stale lock cannot exist on a local filesystem; a second run that tries the folder gets a
:class:`~dino_fast.errors.RunLockError` naming the holder. The file itself is never deleted:
unlinking a lock file while another process waits on the old inode would let two runs hold
"the" lock. (On NFS, Linux maps flock onto the server's byte-range locks; it works while the
server's lock manager does. POSIX only: ``fcntl`` does not exist on Windows.)

Under torchrun only rank 0 takes the lock, before any rank writes, and tells the other ranks
whether it got it (see :class:`RunLock`). DataLoader workers forked while the lock is held
share it; they exit with their parent, so the lock goes at most a few seconds later.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from dino_fast.errors import ConfigError, RunLockError

__all__ = ["LOCK_NAME", "RunLock", "check_output_dir", "ensure_output_dir", "clean_orphans"]

log = logging.getLogger(__name__)

LOCK_NAME = ".dino_fast.lock"

# Temp names of the checkpoint writers: single files via atomic_torch_save (mkstemp with prefix
# "checkpoint-XXXXXXXX.pth.tmp"), DCP saves built in "step-XXXXXXXX.tmp/", kept snapshots
# hard-linked in "snapshot-<name>.tmp/" (dino_fast.checkpoint).
_TMP_FILE = re.compile(r"^checkpoint-\d+\.pth\.tmp.*$")
_TMP_DIR = re.compile(r"^(step-\d+|snapshot-.+)\.tmp$")

# Folders (resolved) whose lock this process holds: clean_orphans refuses any other.
_HELD: dict[Path, "RunLock"] = {}


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Validate ``output_dir`` without creating anything: it must be a folder or not exist yet,
    and no existing part of its path may be a file. Raises :class:`ConfigError` naming the
    path (the folder comes from the config / ``--output_dir``, so that is what to change)."""
    if str(output_dir) == "":
        raise ConfigError("output_dir is empty: give a folder")
    path = Path(output_dir).expanduser()
    try:
        return _check_output_dir(path)
    except OSError as e:  # e.g. a parent without search permission
        raise ConfigError(f"cannot use output_dir {path}: {e.strerror or e}") from None


def _check_output_dir(path: Path) -> Path:
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"output_dir {path} is a file, not a folder: choose another output_dir or move the file")
        return path
    for parent in path.absolute().parents:  # nearest existing ancestor decides
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir {path} lies under {parent}, which is a file, not a folder: "
                                  f"choose another output_dir")
            break
    return path


def ensure_output_dir(output_dir: str | os.PathLike) -> Path:
    """:func:`check_output_dir`, then create the folder (and its parents). Raises
    :class:`ConfigError` naming the path when it cannot be created (permissions, read-only
    filesystem)."""
    path = check_output_dir(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output_dir {path}: {e.strerror or e}") from None
    return path


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "a run that has not written its details yet"
    since = info.get("started", "?")
    cmd = info.get("command")
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {since}"
            + (f" ({cmd})" if cmd else ""))


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 65536, 0)
    except OSError:
        return None
    if not raw.strip():
        return None
    try:
        info = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class RunLock:
    """Exclusive use of ``output_dir`` by one run (one process; rank 0 under torchrun).

    ``with RunLock(out):`` or ``lock = RunLock(out).acquire()`` ... ``lock.release()``.
    :meth:`acquire` validates and creates the folder (:func:`ensure_output_dir`), then takes
    the lock without waiting; if another run holds it, :class:`RunLockError` names the holder
    (host, pid, since when, command) and the folder. When the previous holder died without
    releasing (killed), its details are in :attr:`previous` and a warning says so.

    Under torchrun: rank 0 calls :meth:`acquire` before any rank writes to the folder, then
    the ranks agree on the outcome with one collective (e.g. a broadcast of a 0/1 flag), so
    that every rank stops when rank 0 could not take the lock instead of waiting for it in the
    next collective."""

    def __init__(self, output_dir: str | os.PathLike, command: str | None = None) -> None:
        self.output_dir = Path(output_dir).expanduser()
        self.path = self.output_dir / LOCK_NAME
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def info(self) -> dict[str, Any]:
        """What is written into the lock file: host, pid, start time, command."""
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started_unix": time.time(),
                "command": self.command}

    def acquire(self) -> "RunLock":
        """Take the lock (no waiting) and record this process in it; returns ``self``."""
        if self._fd is not None:
            raise RunLockError(f"{self.output_dir}: this RunLock is already held")
        ensure_output_dir(self.output_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise ConfigError(f"cannot lock output_dir {self.output_dir}: {self.path} is a folder; remove it") from None
        except OSError as e:
            raise ConfigError(f"cannot lock output_dir {self.output_dir}: {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = None
            for _ in range(20):  # the holder writes its details right after locking
                holder = _read_info(fd)
                if holder:
                    break
                time.sleep(0.025)
            os.close(fd)
            raise RunLockError(f"output_dir {self.output_dir} is in use by another run: {_describe(holder)}; "
                               f"wait for it to finish or choose another output_dir") from None
        except OSError as e:  # e.g. ENOLCK: a network filesystem without a lock manager
            os.close(fd)
            raise RunLockError(f"cannot lock output_dir {self.output_dir}: {self.path}: {e.strerror or e} "
                               f"(a filesystem without file locks?)") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            # Details left by a holder that died without release(): a killed run.
            self.previous = _read_info(fd)
            if self.previous:
                log.warning("output_dir %s: the previous run (%s) ended without releasing its lock (killed?); "
                            "taking over", self.output_dir, _describe(self.previous))
            data = (json.dumps(self.info()) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the flock too
            raise
        self._fd = fd
        _HELD[self.output_dir.resolve()] = self
        return self

    def release(self) -> None:
        """Clear the recorded details and drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(self.output_dir.resolve(), None)
        try:
            os.ftruncate(fd, 0)  # an empty file means "released cleanly"
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def clean_orphans(self) -> list[Path]:
        """:func:`clean_orphans` of this lock's folder."""
        return clean_orphans(self.output_dir)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten release(): the fd would otherwise leak
        if getattr(self, "_fd", None) is not None:
            self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.output_dir)!r}, held={self.held})"


def clean_orphans(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what killed saves left in ``output_dir/checkpoints``: ``checkpoint-*.pth.tmp*``
    files (single-file saves), ``step-*.tmp/`` folders (DCP saves) and ``snapshot-*.tmp/``
    folders (kept snapshots being linked). Nothing else is touched: not complete checkpoints,
    not a file with a folder's temp name or the reverse, not other files. Returns the removed
    paths, sorted.

    Only while this process holds the folder's :class:`RunLock` (another run's save in flight
    looks exactly like an orphan); raises :class:`RunLockError` otherwise."""
    folder = Path(output_dir).expanduser()
    lock = _HELD.get(folder.resolve())
    if lock is None or not lock.held:
        raise RunLockError(f"clean_orphans({folder}): take the RunLock of this output_dir first (another run's "
                           f"save in progress would look like an orphan)")
    ckpt = folder / "checkpoints"
    removed: list[Path] = []
    if not ckpt.is_dir():
        return removed
    for p in sorted(ckpt.iterdir()):
        if _TMP_FILE.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
        elif _TMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            continue
        removed.append(p)
    if removed:
        log.warning("removed %d temp file(s) of interrupted saves in %s: %s", len(removed), ckpt,
                    ", ".join(p.name for p in removed))
    return removed
