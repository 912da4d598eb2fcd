"""``dino-fast launch``: torchrun, with the exit status and the one line a signal deserves.

    dino-fast launch --nproc_per_node 8 train --config my.yaml      # = torchrun --nproc_per_node 8 -m dino_fast train ...

Everything before the dino-fast command (``train`` or ``demo``) is torchrun's own arguments; the
rest is the dino-fast command line the workers run.

Why not plain torchrun: on SIGINT / SIGTERM torch's launcher forwards the signal to the workers
(which finish their step, save a checkpoint and exit 130 / 143 with one line from rank 0), then
re-raises the signal as ``SignalException`` from its own ``launch_agent``: the user sees exit status
1 and the launcher's traceback. That part of torchrun cannot be changed from the workers. This
wrapper runs the same launcher code (``torch.distributed.run``) in-process and maps its outcome:
a signal -> 128 + the signal number and one line; a worker failure -> that worker's exit status
and one line naming it (its own message is above). Plain ``torchrun`` still works; it only keeps
torch's exit status and traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

__all__ = ["main", "split_argv"]

COMMANDS = ("train", "demo")

log = logging.getLogger("dino_fast")


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, the dino-fast command line): split at the first ``train`` / ``demo``."""
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if at is None:
        from dino_fast.errors import ConfigError

        raise ConfigError(f"dino-fast launch needs a command to run ({' or '.join(COMMANDS)}), e.g. `dino-fast "
                          "launch --nproc_per_node 8 train --config my.yaml`")
    return argv[:at], argv[at:]


def main(argv: Sequence[str] | None = None) -> int:
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher_args, command = split_argv(sys.argv[1:] if argv is None else argv)
    if "-h" in launcher_args or "--help" in launcher_args:
        print(__doc__)
        return 0
    args = torchrun.parse_args([*launcher_args, "-m", "dino_fast", *command])
    try:
        torchrun.run(args)
        return 0
    except SignalException as e:
        name = getattr(e.sigval, "name", str(e.sigval))
        print(f"dino-fast launch: stopped by {name}; the workers finished their step and saved (their line is "
              f"above); resume with --resume auto", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        code = failure.exitcode if 0 < failure.exitcode < 256 else 1  # a negative code: killed by a signal
        if code not in (130, 143):
            print(f"dino-fast launch: rank {rank} exited with status {failure.exitcode} (its error is above)",
                  file=sys.stderr)
        return code
