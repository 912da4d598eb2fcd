"""Process-group set-up from the torchrun environment and small rank helpers."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_distributed", "get_rank", "launch_rank", "get_world_size", "is_main_process",
           "all_reduce_mean", "barrier", "cleanup"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (``RANK``; 0 without torchrun), usable before the
    process group exists, e.g. to configure logging."""
    return get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed() -> torch.device:
    """Initialise the default process group when launched by torchrun (RANK/WORLD_SIZE set):
    nccl on CUDA, gloo on CPU. Returns this process's device. A plain ``python`` launch stays
    single-process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (identity when single-process). Returns a new tensor."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t)
        t /= get_world_size()
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
