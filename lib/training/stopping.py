"""Stopping on request: SIGINT/SIGTERM (Ctrl-C, cluster pre-emption) end a run between iterations.

The handlers only set a flag, which the loop reads after each iteration, so the checkpoint written
is always of a whole iteration; a second signal stops at once without one.
"""

from __future__ import annotations

import signal
from typing import Any

import torch

from lib.common import distributed

# Under DDP on CUDA, how often (in iterations) the ranks agree on a pending SIGINT/SIGTERM.
STOP_CHECK_EVERY = 10



class StopRequest:
    """SIGINT/SIGTERM only set a flag, read between iterations; a second signal aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second signal {signum}: stopping without a checkpoint")
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # SIGINT is set explicitly because a process started in the background inherits it ignored
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, it: int, dist_info: distributed.DistInfo) -> bool:
        """Whether to stop after iteration ``it``; under DDP every rank gets the same answer.

        Distributed, the flag is all-reduced (MAX) so that all ranks stop at the same iteration.
        On the CPU (gloo) that is cheap and done every iteration; on CUDA it would synchronise the
        host with the GPU every iteration, so it is done every STOP_CHECK_EVERY iterations.
        """
        if not dist_info.distributed:
            return bool(self.signum)
        if dist_info.device.type == "cuda" and it % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([float(bool(self.signum))], device=dist_info.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())



