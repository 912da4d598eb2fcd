"""The one image lister: train (both loaders), ``pack``, k-NN and linear list a folder through
:func:`list_folder`, which cannot loop or relabel, and reuse a cached index while the folder is unchanged.

Layout ``root/<class>/**/<image>``; class names sorted -> labels 0..C-1 (torchvision's ImageFolder);
inside a class, a folder's own files (sorted) come before its subfolders (sorted), hidden entries
(``.name``) are skipped.

Symbolic links (every skip is a warning naming the link):

- a link to a directory already on the walk or already listed (a loop ``a/loop -> ..``, two links to
  one folder, a link to a folder of the same class) is not entered: each real directory, keyed by
  ``(st_dev, st_ino)``, is listed once;
- a link (to a directory or a file) whose target lies inside the data root but outside the class
  folder holding it (``a/b -> ../b``) is skipped: following it would list class ``b``'s images a
  second time, labelled ``a``;
- a class folder that is, or lies inside, another class folder (``c -> a``, ``c -> a/sub``), or that
  holds the data root, is a :class:`DataError`: its images would carry two labels;
- links pointing outside the data root are followed (a folder built from links to class folders
  elsewhere is common), under the same rules; a broken link is skipped.

The cached index (classes, files, the warnings above) is written after a scan under
``$DINO_FAST_CACHE/index`` or ``~/.cache/dino_fast/index``, named after the data root's real path
(never beside the data: it may be read-only, shared or someone else's). It is reused while every directory
the scan entered has the same (device, inode, mtime): adding, removing or renaming a file or a
folder anywhere in the tree changes the mtime of the directory holding it. What it cannot see:
a file's contents rewritten in place (the listing is still right; a broken file is then found as
usual, when it is read), and a tree whose directory mtimes were set back to their old values
(``rsync -a`` / ``tar x`` over the same inodes). Force a rescan with ``DINO_FAST_RESCAN=1``
(or delete the index file). A directory modified in the 2 s before the scan is not trusted (a
file system with coarse timestamps could hide a later change): no index is written then.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dino_fast.errors import DataError

__all__ = ["FolderListing", "ListingWarning", "CorruptImageWarning", "list_folder", "index_path", "IMG_EXTENSIONS",
           "normalize_extensions"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_INDEX_FORMAT, _INDEX_VERSION = "dino_fast.folder_index", 1
_RACY_NS = 2_000_000_000  # mtimes this close to the scan are not trusted (coarse file-system clocks)


class ListingWarning(UserWarning):
    """A link in the data folder was not followed (loop, duplicate, another class, broken)."""


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was replaced by another sample (or left out)."""


def normalize_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str) or not extensions or not all(isinstance(e, str) and e for e in extensions):
        raise TypeError(f"extensions must be a non-empty sequence of strings like ('.jpg', '.png'), got {extensions!r}")
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


@dataclass
class FolderListing:
    """``classes`` (sorted names), ``files[k]``: paths relative to the root of class ``k``'s images,
    ``skipped``: one line per link not followed, ``dirs``: (path, dev, inode, mtime_ns) of every
    directory entered (the index's check), ``from_index``: True when read from the cached index."""

    root: Path
    classes: list[str]
    files: list[list[str]]
    skipped: list[str] = field(default_factory=list)
    dirs: list[tuple[str, int, int, int]] = field(default_factory=list)
    from_index: bool = False

    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` in listing order: class by class, paths joined to the root as given."""
        root = str(self.root)
        return [(os.path.join(root, rel), k) for k, rels in enumerate(self.files) for rel in rels]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walk:
    """One scan: pass 1 reads the real tree (links not followed) so that every directory listed at its
    own path is known before any link is judged; pass 2 emits the files, following links by the rules."""

    def __init__(self, root: Path, extensions: tuple[str, ...]) -> None:
        self.root, self.extensions = root, extensions
        self.real_root = os.path.realpath(root)
        self.tree: dict[str, tuple[list[str], list[tuple[str, bool]], list[str]]] = {}
        self.dirs: list[tuple[str, int, int, int]] = []
        self.seen: dict[tuple[int, int], str] = {}  # directory id -> where it is listed
        self.skipped: list[str] = []
        self.real_classes: dict[str, str] = {}

    def _read(self, path: str) -> tuple[list[str], list[tuple[str, bool]], list[str]]:
        """(image files, [(subdir, is_link)], file links) of one directory, sorted; recorded for the index."""
        if path not in self.tree:
            st = os.stat(path)
            self.dirs.append((os.path.abspath(path), st.st_dev, st.st_ino, st.st_mtime_ns))  # cwd-proof check
            files, subdirs, links = [], [], []
            with os.scandir(path) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():  # follows links: a link to a directory is a subdir, judged in pass 2
                        subdirs.append((e.name, e.is_symlink()))
                    elif e.is_symlink():
                        links.append(e.name)  # a link to a file, or a broken link
                    elif os.path.splitext(e.name)[1].lower() in self.extensions:
                        files.append(e.name)
            self.tree[path] = (sorted(files), sorted(subdirs), sorted(links))
        return self.tree[path]

    def _mark_real(self, path: str) -> None:
        """Pass 1: every real directory under ``path`` (links not followed) is listed at its own path."""
        st = os.stat(path)
        self.seen.setdefault((st.st_dev, st.st_ino), path)
        for name, is_link in self._read(path)[1]:
            if not is_link:
                self._mark_real(os.path.join(path, name))

    def _skip(self, link: str, why: str) -> None:
        line = f"{link}: {why}"
        self.skipped.append(line)
        warnings.warn(f"not following the link {line}", ListingWarning, stacklevel=4)

    def _judge(self, link: str, cls: str, real_cls: str, stack: list[tuple[int, int]]) -> str | None:
        """Why the link ``link`` in class ``cls`` is not followed, or None."""
        if not os.path.exists(link):
            return f"broken link (-> {os.readlink(link)})"
        target = os.path.realpath(link)
        key = None
        if os.path.isdir(target):
            st = os.stat(target)
            key = (st.st_dev, st.st_ino)
            if key in stack:
                return f"symlink loop (-> {target}, a folder it is inside)"
        if _inside(target, self.real_root) and not _inside(target, real_cls):
            other = next((f"class '{c}'" for c, rp in self.real_classes.items() if _inside(target, rp)),
                         "the data folder")
            return f"-> {target}, inside {other}, not class '{cls}' (its images would be labelled '{cls}')"
        if key in self.seen:
            return f"-> {target}, already listed as {self.seen[key]}"
        if key is None and _inside(target, self.real_root):
            return f"-> {target}, already listed at its own path"
        return None

    def _emit(self, path: str, rel: str, cls: str, real_cls: str, stack: list[tuple[int, int]], out: list[str]) -> None:
        files, subdirs, links = self._read(path)
        out.extend(os.path.join(rel, f) if rel else f for f in files)
        for name in links:
            link = os.path.join(path, name)
            if os.path.splitext(name)[1].lower() not in self.extensions and os.path.exists(link):
                continue  # a link to a non-image file: ignored like any other such file (a broken one is said)
            why = self._judge(link, cls, real_cls, stack)
            if why:
                self._skip(link, why)
            else:
                out.append(os.path.join(rel, name) if rel else name)
        for name, is_link in subdirs:
            sub = os.path.join(path, name)
            if is_link:
                why = self._judge(sub, cls, real_cls, stack)
                if why:
                    self._skip(sub, why)
                    continue
            st = os.stat(sub)
            key = (st.st_dev, st.st_ino)
            self.seen.setdefault(key, sub)
            self._emit(sub, os.path.join(rel, name) if rel else name, cls, real_cls, stack + [key], out)

    def run(self) -> FolderListing:
        root = str(self.root)
        self._read(root)
        classes = sorted(name for name, _ in self.tree[root][1])
        if not classes:
            raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>)")
        real = self.real_classes = {c: os.path.realpath(os.path.join(root, c)) for c in classes}
        for c in (c for c in classes if os.path.islink(os.path.join(root, c))):  # real siblings cannot nest
            link = f"class folder '{c}' ({os.path.join(root, c)} -> {real[c]})"
            if _inside(self.real_root, real[c]):
                raise DataError(f"{link} holds the data folder itself (a loop); remove the link")
            for other in classes:
                if other != c and (_inside(real[c], real[other]) or _inside(real[other], real[c])):
                    where = "is inside" if _inside(real[c], real[other]) else "holds"
                    raise DataError(f"{link} {where} class folder '{other}': its images would carry two labels; "
                                    f"remove the link")
        root_st = os.stat(root)
        self.seen[(root_st.st_dev, root_st.st_ino)] = root
        for c in classes:
            self._mark_real(os.path.join(root, c))
        files = []
        for c in classes:
            out: list[str] = []
            st = os.stat(os.path.join(root, c))
            self._emit(os.path.join(root, c), c, c, real[c], [(root_st.st_dev, root_st.st_ino), (st.st_dev, st.st_ino)],
                       out)
            files.append(out)
        return FolderListing(self.root, classes, files, self.skipped, self.dirs)


# --- the cached index ---------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    return Path(os.environ.get("DINO_FAST_CACHE") or Path.home() / ".cache" / "dino_fast").expanduser() / "index"


def index_path(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> Path:
    """Where the index of ``root`` lives: in the cache folder, named after its real path."""
    key = json.dumps([os.path.realpath(os.path.abspath(root)), list(normalize_extensions(extensions))])
    return _cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _stale(data: dict, real_root: str, extensions: tuple[str, ...]) -> str | None:
    """Why a parsed index does not describe the folder now, or None."""
    if data.get("format") != _INDEX_FORMAT or data.get("version") != _INDEX_VERSION:
        return "written by another version"
    if data["root"] != real_root or tuple(data["extensions"]) != extensions:
        return "made for another folder or other extensions"
    for path, dev, ino, mtime in data["dirs"]:
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is gone"
        if (st.st_dev, st.st_ino, st.st_mtime_ns) != (dev, ino, mtime):
            return f"{path} changed"
    return None


def _load_index(root: Path, extensions: tuple[str, ...]) -> FolderListing | None:
    real_root = os.path.realpath(root)
    for path in (index_path(root, extensions),):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            why = _stale(data, real_root, extensions)
            listing = FolderListing(root, list(data["classes"]), [list(f) for f in data["files"]],
                                    list(data["skipped"]), [tuple(d) for d in data["dirs"]], from_index=True)
            if len(listing.files) != len(listing.classes):
                raise ValueError("classes and files differ in length")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("file index %s is unreadable (%s: %s): rescanning %s", path, type(e).__name__, e, root)
            continue
        if why:
            log.info("file index %s is stale (%s): rescanning %s", path, why, root)
            continue
        for line in listing.skipped:  # nothing silent on a cached start either
            warnings.warn(f"not following the link {line}", ListingWarning, stacklevel=3)
        return listing
    return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_index(listing: FolderListing, extensions: tuple[str, ...], scan_start_ns: int) -> Path | None:
    if any(mtime > scan_start_ns - _RACY_NS for _, _, _, mtime in listing.dirs):
        log.debug("not writing a file index for %s: a folder changed in the last 2 s", listing.root)
        return None
    text = json.dumps({"format": _INDEX_FORMAT, "version": _INDEX_VERSION, "root": os.path.realpath(listing.root),
                       "extensions": list(extensions), "dirs": listing.dirs, "classes": listing.classes,
                       "files": listing.files, "skipped": listing.skipped})
    path = index_path(listing.root, extensions)
    try:
        _write_atomic(path, text)
        return path
    except OSError as e:
        log.info("could not write a file index for %s in %s (%s): the next start scans again", listing.root,
                 path.parent, e)
        return None


def list_folder(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS, *, use_index: bool = True,
                rescan: bool = False) -> FolderListing:
    """The classes and image files of ``root`` (see the module docstring); from the cached index when it is
    current (``use_index``, unless ``rescan`` or ``DINO_FAST_RESCAN=1``), else scanned (and the index written)."""
    root = Path(root).expanduser()
    extensions = normalize_extensions(extensions)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a directory: {root}")
    rescan = rescan or os.environ.get("DINO_FAST_RESCAN", "") not in ("", "0")
    if use_index and not rescan:
        listing = _load_index(root, extensions)
        if listing is not None:
            return listing
    start = time.time_ns()
    listing = _Walk(root, extensions).run()
    if use_index:
        _save_index(listing, extensions, start)
    return listing
