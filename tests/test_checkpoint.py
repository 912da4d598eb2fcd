"""Atomic checkpoint writes and the resumable, seeded sample order."""
import os

import pytest
import torch

from dino_fast.checkpoint import atomic_torch_save, checkpoint_path, latest_checkpoint, prune_checkpoints
from dino_fast.data.sampling import ResumableSampler


def test_atomic_save_and_latest(tmp_path):
    for step in (5, 10, 20):
        atomic_torch_save({"step": step}, checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoints" / "checkpoint-00000030.pth.tmpabc").write_bytes(b"torn")  # a crashed save
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-00000020.pth" and torch.load(latest)["step"] == 20
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pth")) == [
        "checkpoint-00000010.pth", "checkpoint-00000020.pth"]


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 1)
    atomic_torch_save({"v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("crash while pickling")

    with pytest.raises(RuntimeError, match="crash while pickling"):
        atomic_torch_save({"v": Boom()}, path)
    assert torch.load(path)["v"] == 1
    assert os.listdir(path.parent) == [path.name]  # the temp file is gone


def test_sampler_resume_and_shards():
    s = ResumableSampler(50, batch_size=4, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=5)
    assert list(s) == full[20:]
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]
    shards = [ResumableSampler(50, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for sh in shards:
        sh.set_epoch(0)
    idx = [[i for i, _ in sh] for sh in shards]
    assert len(idx[0]) == len(idx[1]) == 24 and not set(idx[0]) & set(idx[1])
    seeds = [sd for sh in shards for _, sd in sh]
    assert len(set(seeds)) == 48


def test_sampler_too_small():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, batch_size=4)
