"""The one image lister (dino_fast.data.listing): symlink loops and links to sibling classes are not
followed (each warned with its path), for train (both loaders), pack, k-NN and linear; the cached
file index is reused while the folder is unchanged and rebuilt when stale or corrupt."""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import pytest

from dino_fast.data.folder import ImageFolderDataset
from dino_fast.data.listing import ListingWarning, index_path, list_folder
from dino_fast.errors import DataError
from tests.helpers import write_image_folder

PER_CLASS = 4


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's index cache."""
    monkeypatch.setenv("DINO_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DINO_FAST_RESCAN", raising=False)


def _linked_tree(root: Path) -> Path:
    """classes a, b, c of PER_CLASS images; a/loop -> .. (the root), a/sib -> ../b, a/sub/up -> .. (a)."""
    write_image_folder(root, names=["a", "b", "c"], per_class=PER_CLASS, size=(20, 16))
    (root / "a" / "sub").mkdir()
    (root / "a" / "loop").symlink_to("..")
    (root / "a" / "sib").symlink_to("../b")
    (root / "a" / "sub" / "up").symlink_to("..")
    (root / "c" / "twin.png").symlink_to("../b/img0.png")  # a file of another class
    return root


def _listed(root: Path, **kw) -> tuple[ImageFolderDataset, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(root, **kw)
    return ds, [str(w.message) for w in caught if issubclass(w.category, ListingWarning)]


def _labels_by_class(samples, classes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in classes}
    for path, label in samples:
        out[classes[label]].append(path)
    return out


def test_loop_and_sibling_links_are_skipped_and_warned(tmp_path):
    root = _linked_tree(tmp_path / "train")
    ds, said = _listed(root, use_index=False)
    assert len(ds) == 3 * PER_CLASS, f"{len(ds)} samples: links followed ({[p for p, _ in ds.samples][:8]}...)"
    by_class = _labels_by_class(ds.samples, ds.classes)
    for c in "abc":  # every image under its own class folder, none reached through a link
        assert sorted(Path(p).relative_to(root).parts[0] for p in by_class[c]) == [c] * PER_CLASS
        assert all(len(Path(p).relative_to(root).parts) == 2 for p in by_class[c])
    for link, why in (("a/loop", "symlink loop"), ("a/sub/up", "symlink loop"), ("a/sib", "inside class 'b'"),
                      ("c/twin.png", "inside class 'b'")):
        assert any(str(root / link) in m and why in m for m in said), f"no warning for {link}: {said}"
    assert len(ds.skipped_links) == 4


def test_links_outside_the_root_are_followed_once(tmp_path):
    root = tmp_path / "train"
    write_image_folder(root, names=["a", "b"], per_class=2)
    write_image_folder(tmp_path / "extra", names=["more"], per_class=3)
    (root / "a" / "ext").symlink_to(tmp_path / "extra" / "more")
    (root / "b" / "ext").symlink_to(tmp_path / "extra" / "more")  # the same folder again: another label
    (root / "a" / "z_again").symlink_to(tmp_path / "extra" / "more")  # after a/ext in walk order
    (root / "a" / "gone").symlink_to(tmp_path / "nowhere")
    ds, said = _listed(root, use_index=False)
    by_class = _labels_by_class(ds.samples, ds.classes)
    assert len(by_class["a"]) == 2 + 3 and len(by_class["b"]) == 2
    assert all("/a/z_again/" not in p for p in by_class["a"])
    assert any(str(root / "b" / "ext") in m and "already listed as" in m for m in said)
    assert any(str(root / "a" / "z_again") in m for m in said)
    assert any(str(root / "a" / "gone") in m and "broken link" in m for m in said)


@pytest.mark.parametrize("target,match", [("a", "'z' .* is inside class folder 'a'"),
                                          ("a/sub", "'z' .* is inside class folder 'a'"),
                                          ("..", "'z' .* holds the data folder")])
def test_class_folder_links_that_would_relabel_are_errors(tmp_path, target, match):
    root = tmp_path / "train"
    write_image_folder(root, names=["a", "b"], per_class=2)
    (root / "a" / "sub").mkdir()
    (root / "z").symlink_to(target)
    with pytest.raises(DataError, match=match):
        ImageFolderDataset(root, use_index=False)


def test_knn_and_linear_list_through_the_same_lister(tmp_path):
    from dino_fast.eval.knn import knn_datasets

    for split in ("train", "val"):
        _linked_tree(tmp_path / split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ListingWarning)
        train, val = knn_datasets(tmp_path / "train", tmp_path / "val", image_size=16)
    assert len(train) == len(val) == 3 * PER_CLASS


def test_nothing_else_walks_a_folder():
    """One lister: no module but dino_fast/data/listing.py walks directories itself (linear, visualize and
    every loader go through ImageFolderDataset / list_folder)."""
    import ast

    pkg = Path(__file__).resolve().parents[1] / "dino_fast"
    walkers = {"walk", "scandir", "listdir", "rglob", "iglob"}
    found = []
    for f in pkg.rglob("*.py"):
        if f.name == "listing.py" and f.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in walkers:
                found.append(f"{f.relative_to(pkg)}:{node.lineno} {node.func.attr}")
    assert not found, f"directory walks outside the lister: {found}"


def test_torchvision_train_data_counts_and_labels(tmp_path):
    from dino_fast.config import TrainConfig
    from dino_fast.data.build import build_train_data

    import torch
    root = _linked_tree(tmp_path / "train")
    cfg = TrainConfig.from_dict(dict(data_path=str(root), data_backend="torchvision", batch_size_per_gpu=4,
                                     local_crops_number=0, global_crops_size=16, local_crops_size=8, num_workers=0,
                                     arch="vit_tiny", patch_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ListingWarning)
        data = build_train_data(cfg, torch.device("cpu"))
    assert len(data.dataset) == 3 * PER_CLASS and data.num_batches == 3
    assert data.dataset.targets == [0] * PER_CLASS + [1] * PER_CLASS + [2] * PER_CLASS


def test_dali_loader_counts_and_labels(tmp_path):
    pytest.importorskip("nvidia.dali")
    from dino_fast.data.dali import DALIMultiCropLoader

    root = _linked_tree(tmp_path / "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ListingWarning)
        loader = DALIMultiCropLoader(root, 4, local_crops_number=0, global_crops_size=16, device="cpu",
                                     num_threads=1, shuffle=False)
    assert len(loader.samples) == 3 * PER_CLASS
    labels = [int(x) for _, lab in loader for x in lab]
    assert labels == [0] * PER_CLASS + [1] * PER_CLASS + [2] * PER_CLASS
    loader.close()


# --- the cached index ----------------------------------------------------------------------------------------

def _age(root: Path, seconds: float = 60.0) -> None:
    """Set every directory's mtime in the past: a fresh folder is not trusted by the index (2 s rule)."""
    t = time.time_ns() - int(seconds * 1e9)
    for d, _, _ in os.walk(root):
        os.utime(d, ns=(t, t))


def test_index_is_written_in_the_cache_and_reused(tmp_path, monkeypatch):
    """Never beside the data (read-only, shared or someone else's): in $DINO_FAST_CACHE/index."""
    root = _linked_tree(tmp_path / "train")
    _age(root)
    first, said = _listed(root)
    assert index_path(root).parent == tmp_path / "cache" / "index" and index_path(root).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    import dino_fast.data.listing as listing

    def no_scan(*a, **k):
        raise AssertionError("scanned although the index is current")

    monkeypatch.setattr(listing._Walk, "run", no_scan)
    second, said_again = _listed(root)
    assert second.samples == first.samples and second.classes == first.classes
    assert sorted(said_again) == sorted(said), "a cached start must repeat the link warnings"
    monkeypatch.setenv("DINO_FAST_RESCAN", "1")
    with pytest.raises(AssertionError, match="scanned"):
        ImageFolderDataset(root)


@pytest.mark.parametrize("change", ["add_file", "remove_file", "add_class", "nested_add"])
def test_stale_index_is_rebuilt_with_a_log_line(tmp_path, caplog, change):
    root = tmp_path / "train"
    write_image_folder(root, names=["a", "b"], per_class=3)
    (root / "a" / "deep").mkdir()
    write_image_folder(root / "a" / "deep", names=["x"], per_class=1)
    _age(root)
    before = ImageFolderDataset(root)
    if change == "add_file":
        (root / "b" / "img0.png").rename(root / "b" / "new.png")
    elif change == "remove_file":
        (root / "b" / "img0.png").unlink()
    elif change == "add_class":
        write_image_folder(root, names=["c"], per_class=1)
    else:
        (root / "a" / "deep" / "x" / "img0.png").rename(root / "a" / "deep" / "x" / "moved.png")
    with caplog.at_level(logging.INFO, logger="dino_fast.data.listing"):
        after = ImageFolderDataset(root)
    assert after.samples == ImageFolderDataset(root, use_index=False).samples != before.samples
    assert any("is stale" in r.message and str(root) in r.message for r in caplog.records)


def test_corrupt_index_is_rebuilt_with_a_log_line(tmp_path, caplog):
    root = tmp_path / "train"
    write_image_folder(root, names=["a", "b"], per_class=2)
    _age(root)
    good = ImageFolderDataset(root).samples
    text = index_path(root).read_text()
    for broken in (text[: len(text) // 2], json.dumps({**json.loads(text), "files": 3})):
        index_path(root).write_text(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dino_fast.data.listing"):
            assert ImageFolderDataset(root).samples == good
        assert any("unreadable" in r.message for r in caplog.records)


def test_unwritable_cache_scans_again_with_a_log_line(tmp_path, monkeypatch, caplog):
    import dino_fast.data.listing as listing

    root = tmp_path / "train"
    write_image_folder(root, names=["a", "b"], per_class=2)
    _age(root)

    def read_only(path, text):  # as on a read-only home (the tests may run as root, who writes anyway)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(listing, "_write_atomic", read_only)
    with caplog.at_level(logging.INFO, logger="dino_fast.data.listing"):
        assert len(ImageFolderDataset(root)) == 4
    assert not index_path(root).exists()
    assert any("could not write a file index" in r.message for r in caplog.records)


def test_fresh_folders_are_not_indexed(tmp_path):
    root = tmp_path / "train"
    write_image_folder(root, names=["a"], per_class=1)
    ImageFolderDataset(root)  # modified just now: a coarse clock could hide a change made in the same tick
    assert not index_path(root).exists()
