"""Process-group set-up that works the same for every way a script can be launched.

* ``python train.py``: one process, on the first GPU if there is one, else the CPU.
* ``torchrun --nproc_per_node=N train.py`` (also multi-node): rank and world size come from the
  environment variables torchrun sets.
* ``python -m torch.distributed.launch --nproc_per_node=N train.py``: the legacy launcher sets the
  same variables and additionally passes ``--local-rank`` (or ``--local_rank``) on the command line;
  the scripts accept and ignore that option, the environment is authoritative.
* ``srun python train.py`` (one SLURM task per GPU, no torchrun): rank, world size and local rank
  come from SLURM's task variables, the master address from the first host of the step's node
  list, the port from the job id. torchrun and the legacy launcher take precedence: a torchrun
  started by ``srun`` (one per node) sets ``RANK`` and is obeyed. A single task, or the batch
  script itself (no ``srun`` step), runs like ``python train.py``.

NCCL is used on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as its launcher describes it."""

    launcher: str  # "none" (python script.py), "torchrun" (also the legacy launcher) or "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None  # set for SLURM only: torchrun exports its own
    master_port: int | None = None


_SLURM_TASK_VARS = ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def slurm_master_port(job_id: int) -> int:
    """A port every task of a job derives alike, spread over 10000-59999 so jobs sharing a node
    rarely collide (``MASTER_PORT`` overrides it)."""
    return 10000 + job_id % 50000


def resolve_launch(environ: Mapping[str, str]) -> Launch:
    """Read the launcher's variables: torchrun's ``RANK`` first, then an ``srun`` task's.

    ``SLURM_STEP_ID`` is required besides the task variables: the batch script also carries
    ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` (of the whole allocation) but is a single process,
    which would otherwise wait forever for the other ranks.
    """
    if "RANK" in environ:
        return Launch("torchrun", int(environ["RANK"]), int(environ.get("WORLD_SIZE", "1")),
                      int(environ.get("LOCAL_RANK", "0")))
    if not all(name in environ for name in _SLURM_TASK_VARS):
        return Launch("none")
    master_addr = environ.get("MASTER_ADDR")
    if not master_addr:
        # rank 0 runs on the first node of its step (the job's, unless the step uses a part)
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise RuntimeError("SLURM task without SLURM_JOB_NODELIST: set MASTER_ADDR")
        master_addr = expand_hostlist(nodelist)[0]
    port = environ.get("MASTER_PORT")
    if not port:
        if "SLURM_JOB_ID" not in environ:
            raise RuntimeError("SLURM task without SLURM_JOB_ID: set MASTER_PORT")
        port = slurm_master_port(int(environ["SLURM_JOB_ID"]))
    return Launch("slurm", int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                  int(environ["SLURM_LOCALID"]),
                  master_addr=master_addr, master_port=int(port))


_HOST_PATTERN = re.compile(r"([^\[\],]*)(?:\[([^\[\]]*)\])?")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``"node[01-03,07],gpu5"`` -> node01 node02 node03
    node07 gpu5. A range keeps the zero padding of its first bound; several bracket groups in one
    name expand to every combination (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2)."""
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        expanded = [""]
        for match in _HOST_PATTERN.finditer(name):
            prefix, ranges = match.groups()
            suffixes = [""] if ranges is None else _expand_ranges(ranges, hostlist)
            expanded = [done + prefix + s for done in expanded for s in suffixes]
        hosts.extend(expanded)
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"empty host name in host list {hostlist!r}")
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split at the commas outside brackets; brackets must balance and not nest."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
        if char == "," and depth == 0:
            names.append(hostlist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
    names.append(hostlist[start:])
    return [n.strip() for n in names]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in host list {hostlist!r}")
        high = high or low
        if int(high) < int(low):
            raise ValueError(f"decreasing range {part!r} in host list {hostlist!r}")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return out


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun, the legacy launcher or
    ``srun``."""
    launch = resolve_launch(os.environ)
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    if launch.launcher == "slurm" and world_size > 1:
        # hand SLURM's answer to the env:// rendezvous, as torchrun would have exported it
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_RANK=str(local_rank), MASTER_ADDR=launch.master_addr,
                          MASTER_PORT=str(launch.master_port))
    torch_device = select_device(device, _gpu_index(launch))
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


def _gpu_index(launch: Launch) -> int:
    """The local rank, except when SLURM binds one GPU to each task (``--gpus-per-task=1``): then
    each task sees its own GPU as the only one, index 0."""
    if launch.launcher == "slurm" and torch.cuda.is_available() and torch.cuda.device_count() == 1:
        return 0
    return launch.local_rank


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
