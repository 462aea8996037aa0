"""Process-group set-up that works the same for every way a script can be launched.

* ``python train.py``: one process, on the first GPU if there is one, else the CPU.
* ``torchrun --nproc_per_node=N train.py`` (also multi-node): rank and world size come from the
  environment variables torchrun sets.
* ``python -m torch.distributed.launch --nproc_per_node=N train.py``: the legacy launcher sets the
  same variables and additionally passes ``--local-rank`` (or ``--local_rank``) on the command line;
  the scripts accept and ignore that option, the environment is authoritative.

NCCL is used on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def select_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks ``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                "use fewer processes per node or set CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}: use auto, cuda or cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun or the legacy launcher."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = select_device(device, local_rank)
    # A launcher (torchrun, torch.distributed.launch) sets RANK; then a process group is made even
    # for one process, so that the DDP/SyncBN/NCCL code paths run exactly as they do with many.
    if "RANK" in os.environ and not dist.is_initialized():
        kwargs = _restart_store()
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
            dist.init_process_group("nccl", device_id=torch_device, **kwargs)
        else:
            dist.init_process_group("gloo", **kwargs)
    return DistInfo(rank, world_size, local_rank, torch_device)


def _restart_store() -> dict:
    """After a ``torchrun --max-restarts`` restart, a store namespace of this restart only.

    The launcher's store outlives a failed attempt, and the process group's keys (each rank's
    address) are the same names in every attempt: a restarted rank could read the address of a
    dead worker of the previous attempt and fail to connect. A prefix per restart avoids that.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return {}
    store, rank, world_size = next(dist.rendezvous("env://"))
    return {"store": dist.PrefixStore(f"restart{restart}/", store), "rank": rank,
            "world_size": world_size}


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
