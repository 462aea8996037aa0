"""The training loop shared by every model: one explicit loop, counted in iterations.

A run is defined by ``max_iter`` and the *global* batch size, so 1, 2 or N processes see the same
samples with the same augmentation and follow the same learning-rate curve. The per-model scripts
(``bisenetv2/train.py`` ...) only supply their recipe (a ``TrainConfig``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lib import distributed
from lib.checkpoint import (
    CHECKPOINT_PATTERN,
    CheckpointError,
    describe_checkpoint,
    latest_usable_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lib.config import TrainConfig
from lib.data import DatasetInfo, build_dataset, dataset_info, prepare_dataset, worker_init
from lib.deploy import to_inference_form
from lib.evaluator import evaluate, format_iou_table, iou_from_confusion
from lib.inference import save_example_prediction
from lib.logger import setup_logging
from lib.loss import OhemCrossEntropy
from lib.lr_scheduler import WarmupPolyLR
from lib.models import build_model
from lib.optim import build_optimizer
from lib.pretrained import PretrainedWeightsError, load_pretrained_backbone
from lib.sampler import InfiniteShardedSampler
from lib.sync_batchnorm import convert_sync_batchnorm

logger = logging.getLogger("bisenet")

# The GradScaler skips the optimizer step on overflow while the schedule still advances one
# iteration, which is intended; PyTorch warns about that order on the first skipped step.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")

# After this many consecutive steps skipped by the GradScaler, the run is not recovering by itself.
MAX_SKIPPED_STEPS = 100


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def autocast_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on the CPU (fp16 matmuls are slow or missing there)."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_checkpoint(
    cfg: TrainConfig, info: DatasetInfo, model: nn.Module, iteration: int,
    optimizer=None, scheduler=None, scaler=None,
) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {
        "model": cfg.model,
        "n_classes": cfg.n_classes,
        "state_dict": model.state_dict(),
        "class_names": list(info.class_names),
        "palette": info.palette.tolist(),
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "ignore_index": cfg.ignore_index,
        "iteration": iteration,
        "config": dataclasses.asdict(cfg),
    }
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict()
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def load_finetune_weights(model: nn.Module, path: str, n_classes: int) -> str:
    """Load weights from ``path``; class layers with another class count stay re-initialised."""
    checkpoint = load_checkpoint(path)
    describe_checkpoint(checkpoint, path, model_name=getattr(model, "model_name", None))
    own = model.state_dict()
    source = checkpoint["state_dict"]
    reinitialised, kept = [], {}
    for key, value in source.items():
        if key not in own:
            continue  # e.g. auxiliary heads missing from / added to the target
        if own[key].shape != value.shape:
            if value.shape[0] != own[key].shape[0] and own[key].shape[0] == n_classes:
                reinitialised.append(key)
                continue
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(own[key].shape)}"
            )
        kept[key] = value
    missing = [k for k in own if k not in kept and k not in reinitialised]
    model.load_state_dict(kept, strict=False)
    message = f"fine-tuning from {path}: {len(kept)} tensors loaded"
    if reinitialised:
        message += f"; class layers re-initialised for {n_classes} classes: {reinitialised}"
    if missing:
        message += f"; {len(missing)} tensors not in the file keep their initialisation"
    return message


def _resume_state(cfg: TrainConfig, out_dir: Path) -> tuple[Path, dict] | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = latest_usable_checkpoint(out_dir)
        if found is None:
            logger.info("--resume auto: no checkpoint in %s, starting a new run", out_dir)
        return found
    return Path(cfg.resume), load_checkpoint(cfg.resume)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate without the heads' multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


def _log_progress(it, cfg, optimizer, sums, names, count, elapsed):
    means = (sums / max(count, 1)).tolist()
    per_head = " ".join(f"{n}={v:.4f}" for n, v in zip(names, means[1:], strict=False))
    sec_per_it = elapsed / max(count, 1)
    eta = sec_per_it * (cfg.max_iter - it)
    logger.info(
        "iter %d/%d | lr %.6g | samples %d | loss %.4f (%s) | %.3f s/it | eta %s",
        it, cfg.max_iter, base_lr(optimizer), it * cfg.batch_size, means[0],
        per_head, sec_per_it,
        time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 3600:.1f} h",
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model``, evaluate it on the validation split, and return a summary."""
    dist_info = distributed.init_distributed(cfg.device)
    out_dir = Path(cfg.resolved_output_dir())
    setup_logging(out_dir / "train.log" if dist_info.is_main else None, dist_info.rank)
    try:
        return _train(cfg, dist_info, out_dir)
    finally:
        distributed.cleanup_distributed()


def _train(cfg: TrainConfig, dist_info: distributed.DistInfo, out_dir: Path) -> dict[str, Any]:
    device = dist_info.device
    world = dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.batch_size // world < 2:
        # BatchNorm on the pooled 1x1 context features needs two samples per process.
        raise ValueError(f"--batch-size {cfg.batch_size} gives {cfg.batch_size // world} image "
                         f"per process; at least 2 are needed")
    torch.manual_seed(cfg.seed)
    if dist_info.is_main:
        logger.info("config: %s", dataclasses.asdict(cfg))
        logger.info("%d process(es) on %s, %d images per process per iteration",
                    world, device, cfg.batch_size // world)

    if dist_info.is_main:
        prepare_dataset(cfg)  # e.g. generates the toy dataset; only once, before others read it
    distributed.barrier()
    info = dataset_info(cfg)
    train_set = build_dataset(cfg, "train", train=True, check_labels=cfg.check_data)
    if dist_info.is_main:
        logger.info("training set: %d images from %s", len(train_set), cfg.data_root)

    model = build_model(cfg.model, cfg.n_classes, aux_heads=True)
    resume = _resume_state(cfg, out_dir)
    start_iter = 0
    # DDP copies rank 0's weights to every rank, so only rank 0 reads (or downloads) them.
    if resume is None and dist_info.is_main:
        if cfg.finetune_from:
            logger.info(load_finetune_weights(model, cfg.finetune_from, cfg.n_classes))
        else:
            logger.info(load_pretrained_backbone(model, cfg.pretrained, cfg.model))
    model.to(device)
    if dist_info.distributed and device.type == "cuda" and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif dist_info.distributed and world > 1 and cfg.sync_bn:  # nn.SyncBatchNorm is CUDA-only
        model = convert_sync_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.head_lr_mult)
    scheduler = WarmupPolyLR(optimizer, cfg.max_iter, cfg.warmup_iter, cfg.warmup_ratio,
                             power=cfg.poly_power)
    use_scaler = cfg.fp16 and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    if resume is not None:
        path, checkpoint = resume
        describe_checkpoint(checkpoint, path, cfg.model, cfg.n_classes)
        if "optimizer" not in checkpoint:
            raise CheckpointError(f"{path} has no optimizer state: it cannot be resumed "
                                  "(use --finetune-from to start a new run from its weights)")
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_iter = int(checkpoint["iteration"])
        if dist_info.is_main:
            logger.info("resumed from %s at iteration %d", path, start_iter)
        del checkpoint

    ddp_model: nn.Module = model
    if dist_info.distributed:
        # gradients as views of the all-reduce buckets: no copy, and no stride mismatch with
        # channels-last weights
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )

    sampler = InfiniteShardedSampler(len(train_set), cfg.batch_size, dist_info.rank, world,
                                     seed=cfg.seed, start_iter=start_iter)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size // world, sampler=sampler,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        worker_init_fn=worker_init, persistent_workers=cfg.num_workers > 0,
    )
    criterion = OhemCrossEntropy(thresh=cfg.ohem_thresh, ignore_index=cfg.ignore_index)
    names = model.output_names

    summary = _train_loop(cfg, dist_info, out_dir, info, model, ddp_model, loader, criterion,
                          optimizer, scheduler, scaler, start_iter, names)
    final_path = out_dir / "model_final.pth"
    if dist_info.is_main:
        save_checkpoint(final_path, build_checkpoint(cfg, info, model, cfg.max_iter))
        logger.info("saved %s", final_path)
    summary["checkpoint"] = str(final_path)

    if cfg.eval_at_end:
        summary.update(_evaluate_at_end(cfg, dist_info, out_dir, info, model))
    return summary


def _train_loop(cfg, dist_info, out_dir, info, model, ddp_model, loader, criterion, optimizer,
                scheduler, scaler, start_iter, names) -> dict[str, Any]:
    device = dist_info.device
    ddp_model.train()
    sums = torch.zeros(len(names) + 1, device=device)
    count, skipped_in_a_row, last_checkpoint = 0, 0, None
    tic = time.perf_counter()
    batches = iter(loader)
    it = start_iter
    # Ctrl-C, and SIGTERM (cluster pre-emption, torchrun stopping the job), save a checkpoint;
    # SIGINT is set explicitly because a process started in the background inherits it ignored.
    previous_handlers = {sig: signal.signal(sig, _raise_keyboard_interrupt)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while it < cfg.max_iter:
            # Randomness inside the model (dropout) depends only on (seed, rank, iteration), so
            # that a resumed run continues exactly as an uninterrupted one would have.
            torch.manual_seed(iteration_seed(cfg.seed, dist_info.rank, it))
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, cfg.fp16):
                outputs = ddp_model(images)
            losses = torch.stack([criterion(out.float(), labels) for out in outputs])
            loss = losses[0] + cfg.aux_weight * losses[1:].sum()
            # With an active GradScaler, non-finite values are expected now and then: it skips them.
            if not scaler.is_enabled() and not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at iteration {it + 1} (per head: "
                    f"{dict(zip(names, losses.tolist(), strict=True))}); last good checkpoint: "
                    f"{last_checkpoint or 'none written yet'}. Check the labels "
                    "(tools/check_dataset.py) or lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            if scale_before is not None and scaler.get_scale() < scale_before:
                skipped_in_a_row += 1  # the scaler found inf/NaN gradients and skipped the step
                if skipped_in_a_row in (MAX_SKIPPED_STEPS, 10 * MAX_SKIPPED_STEPS):
                    logger.warning("%d optimizer steps in a row skipped by the fp16 GradScaler "
                                   "(non-finite gradients) up to iteration %d", skipped_in_a_row,
                                   it)
            else:
                skipped_in_a_row = 0

            sums[0] += loss.detach()
            sums[1:] += losses.detach()
            count += 1
            if it % cfg.log_every == 0 or it == cfg.max_iter:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - tic
                if dist_info.is_main:
                    _log_progress(it, cfg, optimizer, sums, names, count, elapsed)
                sums.zero_()
                count = 0
                tic = time.perf_counter()
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.max_iter:
                last_checkpoint = _save_periodic(cfg, dist_info, out_dir, info, model, it,
                                                 optimizer, scheduler, scaler)
    except KeyboardInterrupt:
        if dist_info.is_main:
            logger.warning("interrupted at iteration %d: saving a checkpoint", it)
        _save_periodic(cfg, dist_info, out_dir, info, model, it, optimizer, scheduler, scaler,
                       barrier=False)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return {"iterations": it, "final_lr": base_lr(optimizer)}


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + iteration) % (2**63)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _save_periodic(cfg, dist_info, out_dir, info, model, it, optimizer, scheduler, scaler,
                   barrier: bool = True) -> Path:
    path = out_dir / CHECKPOINT_PATTERN.format(it)
    if dist_info.is_main:
        save_checkpoint(path, build_checkpoint(cfg, info, model, it, optimizer, scheduler, scaler))
        prune_checkpoints(out_dir, cfg.keep_checkpoints)
        logger.info("saved %s", path)
    if barrier:
        distributed.barrier()
    return path


def _evaluate_at_end(cfg, dist_info, out_dir, info, model) -> dict[str, Any]:
    """The recipe's evaluation, on the model's inference form: the very computation that
    ``evaluate.py`` runs on the saved ``model_final.pth``, so both print the same numbers."""
    val_set = build_dataset(cfg, "val", train=False)
    options = cfg.eval_options()
    inference_model = to_inference_form(model)
    results = evaluate(inference_model, val_set, cfg.n_classes, options, device=dist_info.device,
                       ignore_index=cfg.ignore_index, progress=dist_info.is_main)
    summary: dict[str, Any] = {}
    if dist_info.is_main:
        logger.info("validation (%d images; %s):\n%s", len(val_set), options.describe(),
                    format_iou_table(results, info.class_names))
        for mode, conf in results.items():
            summary[f"miou_{mode}"] = iou_from_confusion(conf)[1]
        example = save_example_prediction(inference_model, val_set, 0,
                                          out_dir / "example_prediction.png", info.palette,
                                          dist_info.device)
        logger.info("colourised prediction of %s written to %s", val_set.pairs[0][0], example)
    return summary


@record  # under torchrun, a failing rank's traceback is shown in the launcher's summary
def main(recipe: TrainConfig, argv=None, description: str = "",
         presets: dict[str, TrainConfig] | None = None) -> dict[str, Any]:
    """Entry point of the per-model ``train.py`` scripts."""
    from lib.config import parse_config

    try:
        cfg = parse_config(recipe, argv, description, presets)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    os.makedirs(cfg.resolved_output_dir(), exist_ok=True)
    try:
        return train(cfg)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (TrainingDiverged, CheckpointError, PretrainedWeightsError, ValueError,
            FileNotFoundError) as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None


__all__ = ["train", "main", "TrainingDiverged", "autocast_context", "build_checkpoint",
           "load_finetune_weights"]
