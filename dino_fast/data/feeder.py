"""Run a batch iterator ahead of its consumer in a feeder thread: the loader's host work (file reads,
draws, crop windows, DALI's outputs and the photometric ops) overlaps the training step.

:class:`Feeder` drives an iterator in a daemon thread and keeps up to ``depth`` finished items in a
queue. The items are the ones the iterator yields inline, in the same order (the loader's draws
are a pure function of (seed, epoch, batch, shard), not of which thread computes them). Stopping:

- the consumer's iterator closed, garbage-collected or left part-way: :meth:`Feeder.close` (the
  loader calls it from its generator's ``finally``) sets a flag the thread checks between items and
  while it waits on a full queue, then joins it; the producing iterator is closed in its own thread;
- an exception in the producer reaches the consumer, raised from ``next()`` (same object, same
  message), after which the thread has ended.

CUDA (the part only a GPU exercises): with ``device`` a CUDA device the thread makes its
items on a side stream; after each item it records an event, and the consumer's ``next()`` makes
the consumer's current stream wait on that event (``wait_event``: the GPU waits, the host does not)
and marks every CUDA tensor of the item as used on that stream (``record_stream``), so the caching
allocator does not hand their memory back to the side stream while the step still reads it.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import torch

__all__ = ["Feeder"]

_ITEM, _DONE, _ERROR = 0, 1, 2
_POLL_S = 0.05  # how often a blocked feeder looks at the stop flag


def _cuda_tensors(item: Any) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        if item.is_cuda:
            yield item
    elif isinstance(item, (list, tuple)):
        for x in item:
            yield from _cuda_tensors(x)
    elif isinstance(item, dict):
        for x in item.values():
            yield from _cuda_tensors(x)


def _put(q: queue.Queue, stop: threading.Event, entry: tuple) -> bool:
    """Queue ``entry`` unless stopped first; True when queued."""
    while not stop.is_set():
        try:
            q.put(entry, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _run(items: Iterator[Any], q: queue.Queue, stop: threading.Event, device: torch.device | None) -> None:
    """The thread's body; it holds no reference to its Feeder, so a dropped Feeder is collected and stops it."""
    stream = None
    try:
        if device is not None:  # the side stream: the consumer's stream only waits on events
            torch.cuda.set_device(device)
            stream = torch.cuda.Stream(device)
            torch.cuda.set_stream(stream)
        for item in items:
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
            if not _put(q, stop, (_ITEM, item, event)):
                return
        _put(q, stop, (_DONE, None, None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
        _put(q, stop, (_ERROR, e, None))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # the producer's own cleanup runs in the thread that ran it


class Feeder:
    """Iterates ``items`` in a thread named ``name``, ``depth`` items ahead of ``next()``."""

    def __init__(self, items: Iterator[Any], depth: int = 2, name: str = "dino-fast-feeder",
                 device: torch.device | None = None) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._device = device if device is not None and device.type == "cuda" else None
        self._finished = self._closed = False
        self._thread = threading.Thread(target=_run, args=(items, self._queue, self._stop, self._device), name=name,
                                        daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __iter__(self) -> "Feeder":
        return self

    def __next__(self) -> Any:
        if self._closed and not self._finished:
            raise RuntimeError("this loader iterator was stopped (the loader started another iteration or was "
                               "closed); call iter() again")
        if self._finished:
            raise StopIteration
        while True:
            try:
                kind, value, event = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True
                    raise RuntimeError("the loader's feeder thread stopped without a result") from None
        if kind != _ITEM:
            self._finished = True
            self._thread.join()
            if kind == _ERROR:
                raise value
            raise StopIteration
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for t in _cuda_tensors(value):
                t.record_stream(current)
        return value

    def close(self) -> None:
        """Stop the thread and wait for it (returns at once when called from the thread itself, e.g. by the
        garbage collector running there)."""
        self._stop.set()
        self._closed = True
        if threading.current_thread() is self._thread:
            return
        while self._thread.is_alive():
            try:  # free a producer blocked on a full queue
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()
