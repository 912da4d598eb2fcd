"""Tar shards (dino-fast pack, dino_fast.data.shards): the WebDataset layout and the index; training data
from shards is the training data from the folder (same bytes, labels, views for a seed, both loaders);
resume mid-shard is bit-identical; a corrupt member is warned (shard and key) and skipped; pack errors
are one line."""
from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_fast.data.folder import CorruptImageWarning, ImageFolderDataset
from dino_fast.data.pack import pack, parse_size
from dino_fast.data.shards import INDEX_NAME, ShardDataset, ShardIndex, open_dataset
from dino_fast.errors import DataError
from tests.helpers import write_image_folder

N_CLASSES, PER_CLASS = 3, 7


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, shards): 21 PNGs of 3 classes (odd sizes), packed into shards of ~4 images."""
    base = tmp_path_factory.mktemp("shards")
    write_image_folder(base / "train", classes=N_CLASSES, per_class=PER_CLASS, size=(41, 35))
    size = (base / "train" / "class0" / "img0.png").stat().st_size
    pack(base / "train", base / "shards", shard_size=4 * (size + 2048))
    return base / "train", base / "shards"


def test_layout_is_webdataset_and_the_index_points_at_the_bytes(packed):
    folder, shards = packed
    meta = json.loads((shards / INDEX_NAME).read_text())
    ds = ImageFolderDataset(folder, use_index=False)
    assert meta["count"] == len(ds) and meta["classes"] == ds.classes
    assert len(meta["shards"]) >= 4, "the shard size was not applied"
    index = ShardIndex(shards)
    seen = 0
    for s, entry in enumerate(meta["shards"]):
        with tarfile.open(shards / entry["name"]) as tar:
            names = tar.getnames()
            assert len(names) == 2 * entry["members"]
            for k in range(seen, seen + entry["members"]):
                key = f"{k:09d}"
                assert names[2 * (k - seen): 2 * (k - seen) + 2] == [f"{key}.png", f"{key}.cls"]
                assert tar.extractfile(f"{key}.png").read() == Path(ds.samples[k][0]).read_bytes()
                assert tar.extractfile(f"{key}.cls").read() == str(ds.targets[k]).encode()
                assert index.shard[k] == s and index.read(k).tobytes() == Path(ds.samples[k][0]).read_bytes()
        seen += entry["members"]
    assert seen == len(ds)


def test_pack_is_deterministic(packed, tmp_path):
    folder, shards = packed
    size = (folder / "class0" / "img0.png").stat().st_size
    pack(folder, tmp_path / "again", shard_size=4 * (size + 2048))
    for f in sorted(shards.iterdir()):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name


def _cfg(path: Path, backend: str, **kw):
    from dino_fast.config import TrainConfig

    return TrainConfig.from_dict(dict(data_path=str(path), data_backend=backend, batch_size_per_gpu=4,
                                      local_crops_number=2, global_crops_size=32, local_crops_size=16, num_workers=0,
                                      arch="vit_tiny", patch_size=8, seed=5, **kw))


def _batches(path: Path, backend: str, epoch: int = 0, start: int = 0, **kw) -> list[list[torch.Tensor]]:
    from dino_fast.data.build import build_train_data

    data = build_train_data(_cfg(path, backend, **kw), torch.device("cpu"))
    return list(data.epoch(epoch, start))


def _assert_same(a, b) -> None:
    assert len(a) == len(b) > 0
    for k, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"batch {k} differs"


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_shards_give_the_folder_s_samples(packed, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    folder, shards = packed
    _assert_same(_batches(shards, backend), _batches(folder, backend))


def test_shards_give_the_folder_s_bytes_labels_and_draws_dali(packed):
    pytest.importorskip("nvidia.dali")
    from dino_fast.data.multicrop import DINOMultiCrop

    folder, shards = packed
    crops = DINOMultiCrop(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    kw = dict(device="cpu", num_threads=1, seed=1, return_params=True)
    a, b = crops.dali_loader(folder, 4, **kw), crops.dali_loader(shards, 4, **kw)
    assert [lab for _, lab in a.samples] == [lab for _, lab in b.samples]
    for (va, la, pa), (vb, lb, pb) in zip(a, b):
        assert torch.equal(la, lb) and all(torch.equal(pa[k], pb[k]) for k in pa)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    src_a, src_b = open_dataset(folder), open_dataset(shards)
    assert isinstance(src_b, ShardDataset)
    assert all(np.array_equal(src_a.read_bytes(k), src_b.read_bytes(k)) for k in range(len(src_a)))


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_resume_mid_shard_is_bit_identical(packed, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    _, shards = packed
    whole = _batches(shards, backend, epoch=1)
    index = ShardIndex(shards)
    assert len(set(index.shard.tolist())) > 1 and len(whole) == 5
    _assert_same(_batches(shards, backend, epoch=1, start=3), whole[3:])


def _corrupt_member(shards: Path, k: int) -> None:
    """Overwrite member k's PNG header in place (same shard size: the index still matches)."""
    index = ShardIndex(shards)
    with open(shards / index.shards[int(index.shard[k])], "r+b") as f:
        f.seek(int(index.offset[k]))
        f.write(b"\0" * 24)


def test_corrupt_member_is_warned_and_skipped(packed, tmp_path):
    pytest.importorskip("nvidia.dali")
    from dino_fast.data.dali import DALIMultiCropLoader

    folder, _ = packed
    shards = tmp_path / "shards"
    pack(folder, shards)
    _corrupt_member(shards, 4)
    name = f"shard {shards / 'shard-000000.tar'} key 000000004"
    with pytest.warns(CorruptImageWarning, match=name):
        loader = DALIMultiCropLoader(shards, 4, local_crops_number=0, global_crops_size=16, device="cpu",
                                     num_threads=1)
    assert loader.num_skipped == 1 and len(loader.samples) == N_CLASSES * PER_CLASS - 1
    assert sum(len(lab) for _, lab in loader) == 20
    ds = ShardDataset(shards)
    with pytest.warns(CorruptImageWarning, match=name):
        img, label = ds[4]
    assert label == ds.targets[5] and img.size == ds.decode(5).size


def test_cut_or_missing_shard_is_one_line(packed, tmp_path):
    folder, _ = packed
    shards = tmp_path / "s"
    pack(folder, shards, shard_size="20KB")
    last = sorted(shards.glob("shard-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:-1024])
    with pytest.raises(DataError, match="was cut or replaced"):
        ShardDataset(shards)
    last.unlink()
    with pytest.raises(DataError, match="is missing"):
        ShardDataset(shards)


@pytest.mark.parametrize("case,match", [
    ("missing", "data folder not found"),
    ("not_empty", "is not empty"),
    ("inside", "is inside --data_path"),
    ("is_file", "is a file"),
    ("shards_in", "is a shard folder already"),
    ("size", "is not a size"),
    ("tiny", "give at least"),
])
def test_pack_errors_are_one_line(packed, tmp_path, capsys, case, match):
    from dino_fast.cli import main

    folder, shards = packed
    out, size = tmp_path / "out", "1GB"
    data = folder
    if case == "missing":
        data = tmp_path / "nope"
    elif case == "not_empty":
        out.mkdir()
        (out / "x.tar.tmp").write_bytes(b"")
    elif case == "inside":
        out = folder / "shards"
    elif case == "is_file":
        out.write_bytes(b"")
    elif case == "shards_in":
        data = shards
    elif case == "size":
        size = "1XB"
    else:
        size = "12"
    rc = main(["pack", "--data_path", str(data), "--out", str(out), "--shard_size", size])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("dino-fast: error:"), err
    assert match in err
    assert not (folder / "shards").exists()


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size("1.5MB") == 1_500_000
    assert parse_size(65536) == 65536


def test_cli_pack_prints_where_to_train(packed, tmp_path, capsys):
    from dino_fast.cli import main

    folder, _ = packed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain folder: nothing to warn about
        assert main(["pack", "--data_path", str(folder), "--out", str(tmp_path / "o")]) == 0
    assert f"train with --data_path {tmp_path / 'o'}" in capsys.readouterr().out
    assert len(ShardDataset(tmp_path / "o")) == N_CLASSES * PER_CLASS
