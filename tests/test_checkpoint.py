"""The checkpointer: atomic DCP directories, pruning and snapshots, safe loading (no code runs,
format/keys/shapes checked before anything is touched), the one-way converter of old single
files; and the resumable, seeded sample order."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import dino_fast.checkpoint as ckpt
from dino_fast.checkpoint import Checkpointer, consolidate, latest_checkpoint
from dino_fast.data.sampling import ResumableSampler
from dino_fast.errors import CheckpointError, CheckpointSaveError, UnreadableCheckpointError
from dino_fast.train import Trainer
from tests.helpers import legacy_checkpoint
from tests.test_train import _params, tiny_cfg


class Part:
    """A Stateful part holding one tensor and one number."""

    def __init__(self, n: int = 3, value: float = 0.0) -> None:
        self.t, self.x = torch.full((n,), value), value

    def state_dict(self):
        return {"t": self.t, "x": self.x}

    def load_state_dict(self, sd):
        self.t, self.x = sd["t"], sd["x"]


def _train_part(step: int):
    from dino_fast.plan import RunPlan
    from dino_fast.state import TrainState

    plan = RunPlan(niter_per_epoch=5, epochs=2, warmup_epochs=0, warmup_teacher_temp_epochs=0, base_lr=1e-3,
                   min_lr=0.0, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996,
                   warmup_teacher_temp=0.04, teacher_temp=0.04, stop_step=10)
    state = TrainState({"seed": 0}, plan, seed=0)
    state.step = step
    return state


def test_save_is_atomic_latest_prunes_and_snapshots(tmp_path):
    c = Checkpointer(tmp_path, keep=2)
    for step in (5, 10, 20):
        c.save({"model": Part(value=step), "train": _train_part(step)}, step, snapshot="epoch0001" if step == 5 else None)
    (tmp_path / "checkpoints" / "step-00000030.tmp").mkdir()  # a crashed save
    assert latest_checkpoint(tmp_path).name == "step-00000020"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["snapshot-epoch0001", "step-00000010", "step-00000020", "step-00000030.tmp"]
    part, train = Part(), _train_part(0)
    c.load(tmp_path / "checkpoints" / "snapshot-epoch0001", {"model": part, "train": train})
    assert part.x == 5 and torch.equal(part.t, torch.full((3,), 5.0)) and train.step == 5


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    c = Checkpointer(tmp_path)
    c.save({"model": Part(value=1.0), "train": _train_part(1)}, 1)

    def dies(state, **kw):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(ckpt.dcp, "save", dies)
    with pytest.raises(CheckpointSaveError, match="step-00000002 failed: RuntimeError: killed while writing.*"
                                                  "step-00000001 is intact"):
        c.save({"model": Part(value=2.0), "train": _train_part(2)}, 2)
    assert not (tmp_path / "checkpoints" / "step-00000002.tmp").exists()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    part = Part()
    c.load(latest_checkpoint(tmp_path), {"model": part, "train": _train_part(0)})
    assert part.x == 1.0


class _Payload:
    """Unpickling this writes a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_crafted_metadata_runs_no_code(tmp_path):
    c = Checkpointer(tmp_path)
    path = c.save({"model": Part(), "train": _train_part(1)}, 1)
    marker = tmp_path / "marker"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*refers to pathlib.Path.write_text"):
        c.load(path, {"model": Part(), "train": _train_part(0)})
    assert not marker.exists()


def test_crafted_value_runs_no_code(tmp_path):
    """A non-tensor value that unpickles into a call (DCP's own reader would run it: it loads
    values with torch.load(weights_only=False))."""
    marker = tmp_path / "marker"

    class Evil:
        def state_dict(self):
            return {**_train_part(1).state_dict(), "step": _Payload(marker)}

    c = Checkpointer(tmp_path)
    path = c.save({"model": Part(), "train": Evil()}, 1)
    with pytest.raises(UnreadableCheckpointError, match=r"entry 'train.step' \(__0_0.distcp, refused: not plain "
                                                        r"tensor data"):
        c.load(path, {"model": Part(), "train": _train_part(0)})
    assert not marker.exists()


def test_legacy_single_file_resumes_exactly(demo_root, tmp_path):
    """A checkpoint-XXXXXXXX.pth of earlier versions (weights_only load, numpy RNG state allowed)
    resumes into the same run as an uninterrupted one; the new run then writes directories."""
    straight = Trainer(tiny_cfg(demo_root, tmp_path / "a", max_steps=6))
    straight.fit()
    first = Trainer(tiny_cfg(demo_root, tmp_path / "b", max_steps=3))
    first.fit()
    old = tmp_path / "b" / "checkpoints" / "checkpoint-00000003.pth"
    torch.save(legacy_checkpoint(first), old)
    for p in (tmp_path / "b" / "checkpoints").glob("step-*"):
        import shutil

        shutil.rmtree(p)
    resumed = Trainer(tiny_cfg(demo_root, tmp_path / "b", max_steps=6, resume="auto"))
    resumed.fit()
    assert resumed.step == 6
    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming an old single file"
    assert (tmp_path / "b" / "checkpoints" / "step-00000006" / ".metadata").is_file()


def test_legacy_file_with_code_runs_no_code(demo_root, tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "checkpoint-00000001.pth"
    torch.save({"format": "dino_fast", "student": _Payload(marker)}, bad)
    trainer = Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=1))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        trainer.resume(str(bad))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, os.urandom(4096)], ids=["empty", "zeros", "random"])
def test_unreadable_file_is_one_clear_error(demo_root, tmp_path, content):
    bad = tmp_path / "checkpoint-00000001.pth"
    bad.write_bytes(content)
    trainer = Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=1))
    with pytest.raises(CheckpointError, match=str(bad)):
        trainer.resume(str(bad))


def test_truncated_checkpoint_directory(demo_root, tmp_path):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=2))
    path = Path(trainer.fit()["checkpoint"])
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    other = Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=1))
    with pytest.raises(UnreadableCheckpointError, match=rf"{path}: __0_0.distcp is truncated: 1000 bytes, entry "
                                                        r"'[\w.]+' ends at byte \d+"):
        other.resume(str(path))


def test_other_architecture_names_keys_and_flags(demo_root, tmp_path):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=2))
    path = trainer.fit()["checkpoint"]
    other = Trainer(tiny_cfg(demo_root, tmp_path / "o", depth=3, head_bottleneck_dim=16))
    before = {k: v.clone() for k, v in _params(other).items()}
    with pytest.raises(CheckpointError, match=r"does not fit this model: .*--depth 2 --head_bottleneck_dim 32; "
                                              r"this run has --depth 3 --head_bottleneck_dim 16"):
        other.resume(path)
    after = _params(other)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was touched


def test_consolidate_gives_full_models(demo_root, tmp_path):
    trainer = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=2))
    full = consolidate(trainer.fit()["checkpoint"])
    assert full["step"] == 2 and full["config"]["depth"] == 2
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(full["teacher"][k], v), k


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


def test_disk_full_during_save_is_one_line_and_keeps_the_previous(demo_root, tmp_path, monkeypatch, capsys):
    """Issue 29 row 2: a full disk at the second save: one line naming the checkpoint, the error and
    the free space; the first checkpoint intact and resumable; the metrics files' own close error
    (a full disk fails their flush too) does not replace it."""
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    from dino_fast.cli import main
    from dino_fast.metrics import MetricsWriter
    from tests.test_cli import _tiny_flags

    real_write, saves = fs._write_item, {"n": 0}

    def full_disk(*args, **kw):
        if (tmp_path / "o" / "checkpoints" / "step-00000002").exists():  # the first save is through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kw)

    class FailingClose:  # metrics.csv whose final flush meets the full disk
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device (flushing metrics.csv)")

    real_init = MetricsWriter.__init__

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.file = FailingClose(self.file)

    monkeypatch.setattr(fs, "_write_item", full_disk)
    monkeypatch.setattr(MetricsWriter, "__init__", init)
    argv = _tiny_flags(demo_root, tmp_path / "o", "--max_steps", "4", "--checkpoint_every", "2", "--log_every", "1")
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dino-fast")]
    assert len(err) == 1, err
    assert "saving checkpoint" in err[0] and "step-00000004 failed: OSError: [Errno 28] No space left" in err[0]
    assert "GiB free on" in err[0] and "step-00000002 is intact" in err[0]
    assert not (tmp_path / "o" / "checkpoints" / "step-00000004.tmp").exists()
    monkeypatch.undo()
    assert main(_tiny_flags(demo_root, tmp_path / "o", "--max_steps", "3", "--resume", "auto")) == 0
    assert latest_checkpoint(tmp_path / "o").name == "step-00000003"


def test_resume_auto_falls_back_past_a_damaged_newest(demo_root, tmp_path, caplog):
    """Issue 29 row 9: the newest checkpoint unreadable -> the one before it, named in the log."""
    first = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=4, checkpoint_every=2))
    first.fit()
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "step-00000004"
    data = newest / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:500])
    import shutil

    damaged = Path(shutil.copytree(newest, tmp_path / "damaged" / newest.name))
    resumed = Trainer(tiny_cfg(demo_root, tmp_path, max_steps=5, checkpoint_every=2, resume="auto"))
    with caplog.at_level("WARNING", logger="dino_fast"):
        resumed.fit()
    assert resumed.step == 5
    assert any("skipping step-00000004" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    explicit = Trainer(tiny_cfg(demo_root, tmp_path / "x", max_steps=5))
    with pytest.raises(UnreadableCheckpointError, match="truncated"):  # a named checkpoint is never swapped
        explicit.resume(str(damaged))


def test_export_of_a_rotated_checkpoint_says_it_no_longer_exists(demo_root, tmp_path):
    """Issue 29 row 7: it said "is not a checkpoint directory"."""
    from dino_fast.export import export_checkpoint

    Trainer(tiny_cfg(demo_root, tmp_path, max_steps=4, checkpoint_every=1)).fit()
    gone = tmp_path / "checkpoints" / "step-00000001"
    assert not gone.exists()  # rotation keeps the newest two
    with pytest.raises(CheckpointError, match=r"step-00000001 does not exist \(or no longer.*now holds "
                                              r"step-00000003, step-00000004"):
        export_checkpoint(gone, "official", tmp_path / "x.pth")


def test_plain_pickle_and_our_checkpoint_described_as_they_are(demo_root, tmp_path, capsys, caplog):
    """Issue 29 row 10: a plain-pickle .pth printed torch's UserWarning before the one-line error,
    and eval logs called a dino_fast checkpoint an "official DINO training checkpoint"."""
    from dino_fast.cli import main
    from dino_fast.pretrained import load_pretrained

    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"teacher": {"w": [1.0, 2.0]}}, protocol=4))
    assert main(["knn", "--pretrained_weights", str(plain), "--data_path", str(demo_root)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("dino-fast: error:") and str(plain) in err[0], err
    path = Trainer(tiny_cfg(demo_root, tmp_path / "o", max_steps=1)).fit()["checkpoint"]
    with caplog.at_level("INFO"):
        load_pretrained(path)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "dino_fast checkpoint" in text and "official DINO training checkpoint" not in text, text
