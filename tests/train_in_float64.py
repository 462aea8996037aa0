"""Run a training script with the model built in float64, optionally with a bug planted on purpose.

    python tests/train_in_float64.py [--plant BUG] SCRIPT [ARGS...]
    torchrun --nproc_per_node=2 tests/train_in_float64.py [--plant BUG] SCRIPT [ARGS...]

The launcher of tests/test_training.py's 1-vs-2-process equivalence test. With float64 weights
(``torch.set_default_dtype``; the training step casts each batch to the weights' dtype) the two
runs differ only by float64 rounding, whatever kernels the CPU selects, instead of float32 rounding
amplified by training. ``--plant`` patches the trainer, in this process only, with one of the bugs
the equivalence test must catch:

* ``sampler``: every rank draws the stream of a single process with its own batch size (no
  sharding), so both ranks train on the same samples;
* ``batchnorm``: BatchNorm is not synchronised, each rank normalises with its own half batch;
* ``gradients``: DDP's averaged gradients are divided by the world size once more.
"""

import argparse
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lib.training.setup
from lib.data.sampler import InfiniteShardedSampler

PLANTED_BUGS = ("sampler", "batchnorm", "gradients")


def _unsharded_sampler(dataset_len: int, global_batch_size: int, rank: int = 0,
                       world_size: int = 1, **kwargs) -> InfiniteShardedSampler:
    """The sampler of a single process whose batch is this rank's share: rank is ignored."""
    return InfiniteShardedSampler(dataset_len, global_batch_size // world_size, **kwargs)


def _averaged_twice(process_group, bucket: dist.GradBucket
                    ) -> torch.futures.Future[torch.Tensor]:
    """DDP's own all-reduce (sum / world size), then a second division by the world size."""
    averaged = allreduce_hook(process_group, bucket)
    return averaged.then(lambda future: future.value().div_(dist.get_world_size()))


class _DdpAveragingTwice(lib.training.setup.DistributedDataParallel):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, _averaged_twice)


def plant(bug: str) -> None:
    """Patch ``lib.training.setup``'s names in this process (looked up at run time)."""
    if bug == "sampler":
        lib.training.setup.InfiniteShardedSampler = _unsharded_sampler
    elif bug == "batchnorm":
        lib.training.setup.convert_sync_batchnorm = lambda model: model
    elif bug == "gradients":
        lib.training.setup.DistributedDataParallel = _DdpAveragingTwice
    else:
        raise ValueError(f"unknown bug {bug!r}: one of {PLANTED_BUGS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plant", choices=PLANTED_BUGS)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    if options.plant:
        plant(options.plant)
    sys.argv = [options.script, *options.args]
    runpy.run_path(options.script, run_name="__main__")


if __name__ == "__main__":
    main()
