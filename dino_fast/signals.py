"""Stop cleanly on SIGINT (Ctrl-C) and SIGTERM (what schedulers send before a kill).

Inside :class:`GracefulStop` the first signal only sets :attr:`GracefulStop.signum`; the trainer
finishes the current step, writes a checkpoint and raises :class:`Interrupted`, which the CLI
turns into one line and exit status 128 + signal (130 / 143). A second signal exits at once.
Outside the main thread (where Python cannot install handlers) it does nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from dino_fast.distributed import launch_rank

__all__ = ["GracefulStop", "Interrupted"]


class Interrupted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        saved = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint written"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; {saved}; "
                         f"resume with --resume auto")


class GracefulStop:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second one: no more waiting
            print(f"\ndino-fast: {signal.Signals(signum).name} again: exiting now without saving", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if launch_rank() == 0:  # under torchrun every rank gets the signal; one line per run
            print(f"\ndino-fast: {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  f"(send it again to exit now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
