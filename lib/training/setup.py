"""Setting a run up: its folder, the resume checks, the model with its optimizer, and the data.

Each function here runs once, before the first iteration; ``lib.training.trainer`` calls them in
order. Resuming rebuilds everything from the command line and then loads the checkpoint's state,
after checking that the command line still describes the same run (``lib.training.runs``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lib.common import distributed
from lib.common.log import interactive
from lib.data.dataset import (
    SegmentationDataset,
    build_dataset,
    dataset_info,
    prepare_dataset,
)
from lib.data.sampler import InfiniteShardedSampler
from lib.models.checkpoint import (
    CheckpointError,
    describe_checkpoint,
    load_checkpoint,
    load_finetune_weights,
)
from lib.models.pretrained import load_pretrained_backbone
from lib.models.zoo import build_model
from lib.training.class_weights import check_resumed_class_weights, class_weights_for_run
from lib.training.config import TrainConfig
from lib.training.ema import WeightEma
from lib.training.optim import build_optimizer
from lib.training.pipeline import TrainPipeline, build_train_loader
from lib.training.runs import (
    RunFinished,
    RunPlan,
    compare_resume_config,
    latest_usable_checkpoint,
    plan_run,
)
from lib.training.state import RunState, make_scheduler
from lib.training.step import (
    compile_for_training,
    describe_step,
    set_backend_defaults,
    to_memory_format,
    use_channels_last,
    use_compile,
)
from lib.training.sync_batchnorm import convert_sync_batchnorm

logger = logging.getLogger("bisenet")

Resume = tuple[Path, dict[str, Any]]


def plan_run_folder(cfg: TrainConfig, dist_info: distributed.DistInfo) -> RunPlan:
    """Rank 0 picks (and creates) the run folder; every rank gets the same answer or error."""
    result: RunPlan | ValueError | None = None
    if dist_info.is_main:
        try:
            result = plan_run(cfg.runs_root(), cfg.output_dir, cfg.resume)
        except ValueError as exc:
            result = exc
    result = distributed.broadcast_object(result)
    if isinstance(result, ValueError):
        raise result
    return result


def find_resume(cfg: TrainConfig, plan: RunPlan) -> Resume | None:
    """The checkpoint to continue from (``--resume``), or None for a new run."""
    if cfg.resume is None:
        return None
    if plan.resume_auto:
        found = latest_usable_checkpoint(plan.run_dir)
        if found is None:
            logger.info("--resume auto: no checkpoint in %s, the run starts at iteration 0",
                        plan.run_dir)
        return found
    return Path(cfg.resume), load_checkpoint(cfg.resume)


def check_resume(cfg: TrainConfig, path: Path, checkpoint: dict, run_dir: Path
                 ) -> list[tuple[str, Any, Any]]:
    """The checkpoint can continue this command line; returns the schedule options changed."""
    describe_checkpoint(checkpoint, path, cfg.model, cfg.data.n_classes)
    if "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} has no optimizer state: it cannot be resumed "
                              "(use --finetune-from to start a new run from its weights)")
    changes = compare_resume_config(checkpoint.get("config") or {}, cfg, path)
    done = int(checkpoint["iteration"])
    if done > cfg.max_iter:
        raise ValueError(f"{path} is at iteration {done}, beyond --max-iter {cfg.max_iter}: a run "
                         "cannot be shortened")
    if done == cfg.max_iter:
        raise RunFinished(f"run {run_dir} is finished at iteration {done} ({path.name}); nothing "
                          "to do (a larger --max-iter extends it)")
    return changes


def check_batch_split(batch_size: int, world: int, sync_bn: bool, accumulate: int = 1) -> None:
    """Refuse batch splits that cannot train; ``sync_bn``: batch statistics are over all ranks;
    ``accumulate``: each process's share runs as that many micro-batches."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes")
    if (batch_size // world) % accumulate:
        raise ValueError(f"--batch-size {batch_size} gives {batch_size // world} images per "
                         f"process, not divisible into --accumulate {accumulate} micro-batches")
    # BatchNorm (of the micro-batch) on the pooled 1x1 context features needs two samples: per
    # process, or in total when SyncBatchNorm computes the statistics over all processes.
    micro = batch_size // accumulate
    if micro // world < 2 and not (sync_bn and micro >= 2):
        what = (f"--batch-size {batch_size} gives {micro // world} image per process"
                + ("" if accumulate == 1 else f" and micro-batch (--accumulate {accumulate})"))
        raise ValueError(f"{what}; at least 2 are needed" + (
            "" if micro < 2 else " without SyncBatchNorm (with --sync-bn, 1 is allowed)"))


def uses_sync_bn(cfg: TrainConfig, dist_info: distributed.DistInfo) -> bool:
    """Synchronised BatchNorm: with several processes and --sync-bn, on CUDA and on the CPU."""
    return dist_info.distributed and dist_info.world_size > 1 and cfg.sync_bn


def build_train_model(cfg: TrainConfig, dist_info: distributed.DistInfo,
                      init_weights: bool) -> nn.Module:
    """The model on its device, initialised (unless resuming) and with SyncBatchNorm if used."""
    model = build_model(cfg.model, cfg.data.n_classes, aux_heads=True)
    # DDP copies rank 0's weights to every rank, so only rank 0 reads (or downloads) them.
    if init_weights and dist_info.is_main:
        if cfg.finetune_from:
            logger.info(load_finetune_weights(model, cfg.finetune_from, cfg.data.n_classes))
        else:
            logger.info(load_pretrained_backbone(model, cfg.pretrained, cfg.model))
    model.to(dist_info.device)
    if uses_sync_bn(cfg, dist_info):
        if dist_info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # nn.SyncBatchNorm is CUDA-only; ours all-reduces over gloo
            model = convert_sync_batchnorm(model)
    return to_memory_format(model, use_channels_last(cfg.channels_last, dist_info.device))


def training_set(cfg: TrainConfig, dist_info: distributed.DistInfo) -> SegmentationDataset:
    """The training split, generated first if it is a toy, its labels checked unless told not."""
    if dist_info.is_main:
        prepare_dataset(cfg.data)  # e.g. generates the toy dataset; once, before others read it
    distributed.barrier()
    if cfg.check_data and dist_info.is_main:
        logger.info("checking every label of the training split (--no-check-data skips it)")
    train_set = build_dataset(cfg.data, "train", cfg.train_transform(),
                              check_labels=cfg.check_data,
                              progress=dist_info.is_main and interactive())
    if dist_info.is_main:
        logger.info("training set: %d images from %s", len(train_set), cfg.data.data_root)
    return train_set


def build_state(cfg: TrainConfig, dist_info: distributed.DistInfo, run_dir: Path,
                resume: Resume | None, changes: list[tuple[str, Any, Any]]) -> RunState:
    """Model, optimizer, schedule, GradScaler and EMA, at the resumed iteration if resuming,
    wrapped for DDP and compiled as asked."""
    device = dist_info.device
    model = build_train_model(cfg, dist_info, init_weights=resume is None)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.head_lr_mult)
    use_scaler = cfg.fp16 and device.type == "cuda"
    info = dataset_info(cfg.data)
    class_weights = class_weights_for_run(cfg, dist_info.is_main, info.class_names)
    if resume is not None:  # checkpoints older than --class-weights had none
        check_resumed_class_weights(resume[1].get("class_weights"), class_weights, resume[0])
    state = RunState(cfg, info, run_dir, model, optimizer, make_scheduler(optimizer, cfg),
                     torch.amp.GradScaler(device.type, enabled=use_scaler),
                     class_weights=class_weights)
    if cfg.ema_decay:
        state.ema = WeightEma(model, cfg.ema_decay)
    if resume is not None:
        path, checkpoint = resume
        state.load(checkpoint)
        state.last_checkpoint = path
        if dist_info.is_main:
            logger.info("resumed from %s at iteration %d", path, state.iteration)
            for name, old, new in changes:
                if name == "max_iter":
                    logger.info("max_iter: extending %s -> %s", old, new)
                else:
                    logger.info("%s: %s -> %s from iteration %d", name, old, new, state.iteration)
    if dist_info.distributed:
        # gradients as views of the all-reduce buckets: no copy, and no stride mismatch with
        # channels-last weights
        state.ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    compiled = use_compile(cfg.compile, device, cfg.max_iter - state.iteration,
                           uses_sync_bn(cfg, dist_info))
    if compiled:
        state.compiled = compile_for_training(state.net, cfg.compile_mode)
    set_backend_defaults(device)  # cudnn.benchmark on CUDA: the crops have one fixed size
    if dist_info.is_main:
        logger.info(describe_step(device, use_channels_last(cfg.channels_last, device), compiled,
                                  cfg.fp16))
    return state


def build_loader(cfg: TrainConfig, train_set: SegmentationDataset,
                 dist_info: distributed.DistInfo, start_iter: int) -> TrainPipeline:
    """This rank's share of every global batch, from iteration ``start_iter`` on: the loader
    (decoded cache, workers, prefetch) and how its batches reach the device."""
    world = dist_info.world_size
    sampler = InfiniteShardedSampler(len(train_set), cfg.batch_size, dist_info.rank, world,
                                     seed=cfg.seed, start_iter=start_iter)
    return build_train_loader(cfg, train_set, sampler, dist_info.device, world)


def log_start(cfg: TrainConfig, dist_info: distributed.DistInfo, run_dir: Path) -> None:
    if dist_info.is_main:
        logger.info("run folder: %s", run_dir)
        logger.info("config: %s", cfg.as_flat_dict())
        logger.info("%d process(es) on %s, %d images per process per iteration%s",
                    dist_info.world_size, dist_info.device, cfg.batch_size // dist_info.world_size,
                    f" in {cfg.accumulate} micro-batches" if cfg.accumulate > 1 else "")


__all__ = ["plan_run_folder", "find_resume", "check_resume", "check_batch_split", "uses_sync_bn",
           "build_train_model", "training_set", "build_state", "build_loader", "log_start"]
