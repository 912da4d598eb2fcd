"""The loader runs ahead of the step (dino_fast.data.feeder, issue 28): batches made in the feeder thread are
bit-identical to inline ones for a seed, across a resume mid-epoch; the thread stops when the iterator is
closed, garbage-collected or left part-way; an exception in the feeder reaches the consumer."""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest
import torch

from dino_fast.data.feeder import Feeder
from tests.helpers import requires_cuda, write_image_folder

FEEDER = "dino-fast-dali-feeder"


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def _wait_gone(prefix: str, timeout_s: float = 5.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout_s
    while _threads(prefix) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads(prefix)


# --- the Feeder on plain iterators ------------------------------------------------------------------------

def test_items_in_order_and_at_most_depth_ahead():
    made = []

    def produce():
        for k in range(10):
            made.append(k)
            yield k

    f = Feeder(produce(), depth=2, name="t-order")
    assert next(f) == 0
    time.sleep(0.3)  # the producer fills the queue, then waits
    assert len(made) <= 1 + 2 + 1, f"produced {len(made)} items ahead of one consumed (depth 2)"
    assert [0] + list(f) == list(range(10))
    assert not _wait_gone("t-order")


def test_exception_in_the_feeder_reaches_the_consumer():
    def produce():
        yield 1
        raise ValueError("member 7 of shard 3 is bad")

    f = Feeder(produce(), depth=2, name="t-error")
    assert next(f) == 1
    with pytest.raises(ValueError, match="member 7 of shard 3 is bad"):
        next(f)
    assert not _wait_gone("t-error")
    with pytest.raises(StopIteration):
        next(f)


@pytest.mark.parametrize("how", ["close", "garbage"])
def test_thread_stops_when_closed_or_dropped(how):
    cleaned = []

    def endless():
        try:
            k = 0
            while True:
                yield k
                k += 1
        finally:
            cleaned.append(threading.current_thread().name)

    f = Feeder(endless(), depth=2, name=f"t-{how}")
    assert [next(f), next(f)] == [0, 1]
    if how == "close":
        f.close()
        with pytest.raises(RuntimeError, match="stopped"):
            next(f)
    else:
        del f
        gc.collect()
    assert not _wait_gone(f"t-{how}")
    assert cleaned == [f"t-{how}"], "the producer must be closed in its own thread"


# --- the DALI loader threaded vs inline --------------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("feeder") / "train"
    write_image_folder(r, classes=3, per_class=6, size=(40, 34))
    return r


def _loader(root: Path, prefetch: int, **kw):
    pytest.importorskip("nvidia.dali")
    from dino_fast.data.dali import DALIMultiCropLoader

    kw.setdefault("device", "cpu")
    return DALIMultiCropLoader(root, 4, local_crops_number=2, global_crops_size=32, local_crops_size=16,
                               num_threads=1, seed=3, return_params=True, prefetch_batches=prefetch, **kw)


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for k, ((va, la, pa), (vb, lb, pb)) in enumerate(zip(a, b)):
        assert torch.equal(la, lb) and all(torch.equal(pa[n], pb[n]) for n in pa), f"batch {k}: labels or draws"
        for v, (x, y) in enumerate(zip(va, vb)):
            assert torch.equal(x, y), f"batch {k} view {v}: max |diff| {(x - y).abs().max().item()}"


def test_threaded_batches_equal_inline_across_a_resume(root):
    inline = _loader(root, 0)
    ref = [list(inline) for _ in range(2)]  # epochs 0 and 1
    threaded = _loader(root, 2)
    assert threaded.prefetch_batches == 2
    _same(list(threaded), ref[0])
    resumed = _loader(root, 3)
    resumed.set_epoch(1, start_batch=2)  # mid-epoch: the batches before are not decoded
    _same(list(resumed), ref[1][2:])
    _same(list(resumed), _epoch(inline, 2))  # and on into the next epoch
    for loader in (inline, threaded, resumed):
        loader.close()
    assert not _wait_gone(FEEDER)


def _epoch(loader, epoch: int) -> list[tuple]:
    loader.set_epoch(epoch)
    return list(loader)


def test_the_loader_runs_ahead_of_its_consumer(root):
    loader = _loader(root, 2)
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 30.0  # a liveness wait, not a timing verdict
    while loader._delivered < 1 + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loader._delivered >= 3, "the feeder did not prepare the next batches while the consumer was away"
    it.close()
    loader.close()


@pytest.mark.parametrize("how", ["close", "garbage", "abandon", "loader_close"])
def test_feeder_thread_stops(root, how):
    loader = _loader(root, 2)
    it = iter(loader)
    next(it)
    assert len(_threads(FEEDER)) == 1
    if how == "close":
        it.close()
    elif how == "garbage":
        del it
        gc.collect()
    elif how == "abandon":  # a new epoch started without closing the old iterator
        loader.set_epoch(0)
        again = list(loader)
        assert len(again) == len(loader)
        with pytest.raises(RuntimeError, match="stopped"):
            next(it)
    else:
        loader.close()
    assert not _wait_gone(FEEDER), f"feeder thread left after {how}"
    loader.close()


def test_exception_in_the_loader_feeder_reaches_the_consumer(root, monkeypatch):
    loader = _loader(root, 2)
    calls = []

    def broken(out, meta):
        calls.append(threading.current_thread().name)
        raise OSError("disk went away while converting batch 0")

    monkeypatch.setattr(loader, "_convert", broken)
    with pytest.raises(OSError, match="disk went away while converting batch 0"):
        list(loader)
    assert calls == [FEEDER], "the conversion must run in the feeder thread"
    assert not _wait_gone(FEEDER)
    loader.close()


@requires_cuda
def test_gpu_side_stream_batches_equal_inline(root):
    """GPU mode: the photometric ops on the feeder's side stream, the consumer's stream waiting on its event."""
    inline = _loader(root, 0, device="gpu")
    ref = [list(inline) for _ in range(2)]
    threaded = _loader(root, 2, device="gpu")
    for epoch in range(2):
        got = list(threaded)
        assert all(v.is_cuda for b in got for v in b[0])
        _same([([v.cpu() for v in b[0]], b[1].cpu(), b[2]) for b in got],
              [([v.cpu() for v in b[0]], b[1].cpu(), b[2]) for b in ref[epoch]])
    for loader in (inline, threaded):
        loader.close()
    assert not _wait_gone(FEEDER)


def test_a_dropped_loader_is_freed_at_once(root):
    """No reference cycle through DALI's callback: a forked DataLoader worker would otherwise collect the
    pipeline and run DALI's shutdown on threads that do not exist there (a segfault, seen in bench_data)."""
    import weakref

    loader = _loader(root, 2)
    it = iter(loader)
    next(it)
    del it
    refs = weakref.ref(loader), weakref.ref(loader._pipe)
    gc.disable()
    try:
        del loader
        assert [r() for r in refs] == [None, None], "the loader or its pipeline waits for the cyclic GC"
    finally:
        gc.enable()
    assert not _wait_gone(FEEDER)
