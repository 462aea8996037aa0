"""The training data pipeline: decoded cache, worker count, prefetch, device-side normalisation.

``build_train_loader`` turns a training ``SegmentationDataset`` into the loader the trainer
iterates, with the choices logged:

* ``--data-cache``: the decoded-image cache (``lib/data/cache.py``), so that a worker only
  scales, crops, flips and jitters;
* ``--num-workers`` (default: the CPUs this process may use, divided by the processes of the
  node, minus one for the training process itself); pinned memory on CUDA; at least
  ``MIN_BATCHES_IN_FLIGHT`` batches prefetched in total;
* ``--device-normalise`` (default: on for CUDA): workers send uint8 crops (and uint8 labels), 4x
  (8x) fewer bytes through shared memory, pinned memory and the bus, and the device normalises
  them with the workers' arithmetic (bit-identical, ``lib.data.transforms.BatchNormaliser``).

``TrainPipeline.advice`` says which option would help a run that waits for its data.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from lib.data.cache import DecodedCache, attach_cache
from lib.data.dataset import SegmentationDataset, worker_init
from lib.data.transforms import BatchNormaliser
from lib.training.config import TrainConfig

logger = logging.getLogger("bisenet")

# prefetch at least this many batches over all workers (PyTorch's default is 2 per worker)
MIN_BATCHES_IN_FLIGHT = 4
# a run waiting for data longer than this fraction of its time is told what would help
SLOW_DATA_FRACTION = 0.2


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what taskset, cgroups or SLURM allow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS, Windows)
        return os.cpu_count() or 1


def processes_per_node() -> int:
    """Training processes sharing this node's CPUs (torchrun's LOCAL_WORLD_SIZE, else 1).

    SLURM without torchrun gives each task its own CPUs in its affinity mask already.
    """
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def auto_num_workers() -> tuple[int, str]:
    """Workers per process from the CPUs and the processes per node, and why."""
    cpus, local = usable_cpus(), processes_per_node()
    share = cpus // local
    workers = max(1, share - 1)
    return workers, (f"auto: {cpus} CPUs / {local} process(es) per node, minus one for the "
                     "training process")


@dataclass
class TrainPipeline:
    """The loader and how its batches reach the device; what was chosen, for the advice."""

    loader: DataLoader
    device: torch.device
    num_workers: int
    cache: DecodedCache | None
    normaliser: BatchNormaliser | None  # set when the device normalises

    def to_device(self, images: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the device, normalised float32 images and int64 labels."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.normaliser is not None:
            images, labels = self.normaliser(images), labels.long()
        return images, labels

    def advice(self, fraction: float) -> str:
        """What to change when the loop waited ``fraction`` of its time for batches."""
        options = []
        if self.cache is None:
            options.append("--data-cache auto (or shm, or a folder): decode each image once "
                           "instead of every time it is drawn")
        best = max(1, usable_cpus() // processes_per_node() - 1)
        if self.num_workers < best:
            options.append(f"--num-workers {best} (or leave it out: one worker per CPU this "
                           "process may use, less one)")
        if self.normaliser is None and self.device.type == "cuda":
            options.append("--device-normalise: send uint8 crops, normalise on the GPU")
        if not options:
            options.append("every data option is on, so the CPUs are the limit: more CPUs "
                           "per training process, or fewer processes per node")
        return (f"the training loop waited for data {fraction:.0%} of its time; what would "
                f"help: {'; '.join(options)}")


def build_train_loader(cfg: TrainConfig, dataset: SegmentationDataset, sampler: Sampler,
                       device: torch.device, world_size: int) -> TrainPipeline:
    """The training DataLoader of ``cfg`` over ``dataset`` (cache attached, transform set)."""
    cache = attach_cache(dataset, cfg.data_cache)
    device_normalise = (cfg.device_normalise if cfg.device_normalise is not None
                        else device.type == "cuda")
    dataset.transform.uint8_output = device_normalise
    if cfg.num_workers is None:
        workers, why = auto_num_workers()
    else:
        workers, why = cfg.num_workers, "--num-workers"
    prefetch = max(2, math.ceil(MIN_BATCHES_IN_FLIGHT / workers)) if workers else None
    # not persistent_workers: the sampler is infinite, so one iterator serves the whole run, and
    # a loader keeping it alive (what persistent workers do) left the process waiting for its
    # workers at exit
    loader = DataLoader(
        # --accumulate: each batch is one micro-batch of this process's share
        dataset, batch_size=cfg.batch_size // world_size // cfg.accumulate, sampler=sampler,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
        worker_init_fn=worker_init, prefetch_factor=prefetch,
    )
    logger.info(
        "data loading: %d worker(s) (%s)%s%s; decoded-image cache %s; normalisation on %s",
        workers, why, f", {prefetch} batches prefetched each" if workers else "",
        ", pinned memory" if loader.pin_memory else "",
        cache.folder if cache is not None else "off",
        f"the device ({device.type}, uint8 crops)" if device_normalise else "the workers")
    normaliser = (BatchNormaliser(cfg.data.mean, cfg.data.std, device) if device_normalise
                  else None)
    return TrainPipeline(loader, device, workers, cache, normaliser)
