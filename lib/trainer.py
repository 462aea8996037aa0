"""The training loop shared by every model: one explicit loop, counted in iterations.

A run is defined by ``max_iter`` and the *global* batch size, so 1, 2 or N processes see the same
samples with the same augmentation and follow the same learning-rate curve. The per-model scripts
(``bisenetv2/train.py`` ...) only supply their recipe (a ``TrainConfig``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from lib import distributed
from lib.checkpoint import (
    CHECKPOINT_PATTERN,
    FINAL_NAME,
    CheckpointError,
    describe_checkpoint,
    latest_usable_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from lib.class_weights import check_resumed_class_weights, class_weights_for_run
from lib.config import TrainConfig
from lib.curves import write_training_curves
from lib.data import DatasetInfo, build_dataset, dataset_info, prepare_dataset, worker_init
from lib.deploy import to_inference_form
from lib.ema import WeightEma
from lib.evaluator import evaluate, format_iou_table, segmentation_metrics
from lib.inference import save_example_prediction
from lib.logger import setup_logging
from lib.loss import OhemCrossEntropy
from lib.lr_scheduler import WarmupPolyLR
from lib.models import build_model
from lib.monitor import EventLog, TrainingHistory, interactive, progress_bar
from lib.optim import build_optimizer
from lib.pretrained import PretrainedWeightsError, load_pretrained_backbone
from lib.runs import RunFinished, RunPlan, compare_resume_config, plan_run
from lib.sampler import InfiniteShardedSampler
from lib.sync_batchnorm import convert_sync_batchnorm
from lib.train_step import compile_for_training, step_losses, to_memory_format, use_channels_last
from lib.validation import BestModel, validate

logger = logging.getLogger("bisenet")

# The GradScaler skips the optimizer step on overflow while the schedule still advances one
# iteration, which is intended; PyTorch warns about that order on the first skipped step.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")

# After this many consecutive steps skipped by the GradScaler, the run is not recovering by itself.
MAX_SKIPPED_STEPS = 100
# A GradScaler scale below the smallest normal fp16 number: the gradients overflow fp16 even when
# shrunk 16384 times, which no healthy run does.
MIN_SCALE = 2.0**-14
# Under DDP on CUDA, how often (in iterations) the ranks agree on a pending SIGINT/SIGTERM.
STOP_CHECK_EVERY = 10
# Written next to model_final.pth: the EMA weights (--ema-decay) and the training curves.
FINAL_EMA_NAME = "model_final_ema.pth"
CURVES_NAME = "curves.png"


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite, or the fp16 GradScaler keeps skipping."""


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
    """Load weights from ``path`` (a file, or published weights by name: ``bisenetv2-city``);
    class layers with another class count stay re-initialised."""
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
    message = f"fine-tuning from {checkpoint['file']}: {len(kept)} tensors loaded"
    if reinitialised:
        message += f"; class layers re-initialised for {n_classes} classes: {reinitialised}"
    if missing:
        message += f"; {len(missing)} tensors not in the file keep their initialisation"
    return message


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate without the heads' multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   iteration: int = 0) -> WarmupPolyLR:
    """The LR schedule of ``cfg`` positioned at ``iteration``.

    The schedule is a function of the config and the iteration only, so a resumed run rebuilds it
    from the command line: a new ``--max-iter``/``--lr``/warm-up applies from the resumed iteration.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr * group.get("lr_mult", 1.0)
    return WarmupPolyLR(optimizer, cfg.max_iter, cfg.warmup_iter, cfg.warmup_ratio,
                        power=cfg.poly_power, last_epoch=iteration - 1)


@dataclass
class RunState:
    """Everything a run is made of; ``checkpoint()`` and ``load()`` write and read the same dict."""

    cfg: TrainConfig
    info: DatasetInfo
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupPolyLR
    scaler: torch.amp.GradScaler
    ddp_model: nn.Module | None = None  # the DistributedDataParallel wrapper, when distributed
    compiled: nn.Module | None = None  # torch.compile of ``net`` (--compile); never saved
    iteration: int = 0
    last_checkpoint: Path | None = None
    ema: WeightEma | None = None  # --ema-decay
    best: BestModel = field(default_factory=BestModel)  # --eval-every
    history: TrainingHistory = field(default_factory=TrainingHistory)  # behind curves.png
    class_weights: tuple[float, ...] | None = None  # --class-weights, resolved

    @property
    def net(self) -> nn.Module:
        """The module to call for training steps (compiled, then the DDP wrapper, if any)."""
        if self.compiled is not None:
            return self.compiled
        return self.ddp_model if self.ddp_model is not None else self.model

    def checkpoint(self) -> dict[str, Any]:
        checkpoint = build_checkpoint(self.cfg, self.info, self.model, self.iteration,
                                      self.optimizer, self.scheduler, self.scaler)
        checkpoint["best"] = self.best.as_dict()
        checkpoint["history"] = self.history.as_dict()
        # the resolved weights (the config holds only 'auto' or the file): compared on resume
        checkpoint["class_weights"] = (None if self.class_weights is None
                                       else list(self.class_weights))
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        return checkpoint

    def model_checkpoint(self, module: nn.Module) -> dict[str, Any]:
        """A model file (no optimizer state) of ``module``'s weights at this iteration."""
        return build_checkpoint(self.cfg, self.info, module, self.iteration)

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration = int(checkpoint["iteration"])
        self.scheduler = make_scheduler(self.optimizer, self.cfg, self.iteration)
        self.best = BestModel.from_dict(checkpoint.get("best"))
        self.history = TrainingHistory.from_dict(checkpoint.get("history"), self.iteration)
        if self.ema is not None:
            if checkpoint.get("ema"):
                self.ema.load_state_dict(checkpoint["ema"])
            else:  # EMA switched on for a resumed run: it starts from the resumed weights
                logger.info("EMA of the weights starts at iteration %d", self.iteration)

    def ensure_finite(self) -> None:
        """Refuse to go on from non-finite weights (checked before every checkpoint)."""
        if not weights_finite(self.model):
            raise diverged(self, "the weights are not finite")

    def save(self, path: Path) -> Path:
        """Write the full state to ``path``, never from non-finite weights."""
        self.ensure_finite()
        save_checkpoint(path, self.checkpoint())
        return path


def weights_finite(model: nn.Module) -> bool:
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def diverged(state: RunState, reason: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged at iteration {state.iteration}: {reason}; last good checkpoint: "
        f"{state.last_checkpoint or 'none written yet'}. Check the labels "
        "(tools/check_dataset.py) or lower --lr"
    )


def count_skipped_steps(run: torch.Tensor, longest: torch.Tensor, scale_before: torch.Tensor,
                        scale_after: torch.Tensor) -> None:
    """Update, on the device, the current and the longest run of steps the GradScaler skipped.

    The scaler lowers its scale exactly when it skips a step (inf/NaN gradients); comparing the
    scale tensors needs no host-device synchronisation.
    """
    skipped = (scale_after < scale_before).to(run.dtype)
    run.add_(1).mul_(skipped)
    torch.maximum(longest, run, out=longest)


def fp16_divergence(longest_skipped: int, scale: float) -> str | None:
    """Why the GradScaler's history means the run diverged, or None if it is healthy."""
    if longest_skipped >= MAX_SKIPPED_STEPS:
        return (f"{longest_skipped} optimizer steps in a row skipped by the fp16 GradScaler "
                "(non-finite gradients)")
    if scale < MIN_SCALE:
        return (f"the fp16 GradScaler's scale collapsed to {scale:.3g} (gradients overflow fp16 "
                "even scaled down)")
    return None


def check_batch_split(batch_size: int, world: int, sync_bn: bool) -> None:
    """Refuse batch splits that cannot train; ``sync_bn``: batch statistics are over all ranks."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes")
    # BatchNorm on the pooled 1x1 context features needs two samples: per process, or in total
    # when SyncBatchNorm computes the statistics over all processes.
    if batch_size // world < 2 and not (sync_bn and batch_size >= 2):
        raise ValueError(
            f"--batch-size {batch_size} gives {batch_size // world} image per process; at least "
            "2 are needed" + ("" if batch_size < 2 else
                              " without SyncBatchNorm (with --sync-bn, 1 is allowed)"))


def uses_sync_bn(cfg: TrainConfig, dist_info: distributed.DistInfo) -> bool:
    """Synchronised BatchNorm: with several processes and --sync-bn, on CUDA and on the CPU."""
    return dist_info.distributed and dist_info.world_size > 1 and cfg.sync_bn


def build_train_model(cfg: TrainConfig, dist_info: distributed.DistInfo,
                      init_weights: bool) -> nn.Module:
    """The model on its device, initialised (unless resuming) and with SyncBatchNorm if used."""
    model = build_model(cfg.model, cfg.n_classes, aux_heads=True)
    # DDP copies rank 0's weights to every rank, so only rank 0 reads (or downloads) them.
    if init_weights and dist_info.is_main:
        if cfg.finetune_from:
            logger.info(load_finetune_weights(model, cfg.finetune_from, cfg.n_classes))
        else:
            logger.info(load_pretrained_backbone(model, cfg.pretrained, cfg.model))
    model.to(dist_info.device)
    if uses_sync_bn(cfg, dist_info):
        if dist_info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # nn.SyncBatchNorm is CUDA-only; ours all-reduces over gloo
            model = convert_sync_batchnorm(model)
    return to_memory_format(model, use_channels_last(cfg.channels_last, dist_info.device))


def _log_progress(it, cfg, optimizer, sums, names, count, elapsed):
    """Log the means of the last ``count`` iterations; returns them (total, then per head)."""
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
    return means


def record_progress(state: RunState, events: EventLog, means: list[float], count: int,
                     elapsed: float) -> None:
    """The logged values into the history (curves.png) and TensorBoard; already on the host."""
    it, lr = state.iteration, base_lr(state.optimizer)
    state.history.add_training(it, means[0], lr)
    values = {"train/loss": means[0], "train/lr": lr,
              "train/images_per_s": count * state.cfg.batch_size / max(elapsed, 1e-9)}
    values.update({f"train/loss_{name}": v
                   for name, v in zip(state.model.output_names, means[1:], strict=True)})
    if state.scaler.is_enabled():
        values["train/grad_scale"] = state.scaler.get_scale()
    events.scalars(it, values)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model``, evaluate it on the validation split, and return a summary."""
    dist_info = distributed.init_distributed(cfg.device)
    setup_logging(None, dist_info.rank)
    try:
        plan = _plan_run(cfg, dist_info)
        setup_logging(plan.run_dir / "train.log" if dist_info.is_main else None, dist_info.rank)
        return _train(cfg, dist_info, plan)
    finally:
        distributed.cleanup_distributed()


def _plan_run(cfg: TrainConfig, dist_info: distributed.DistInfo) -> RunPlan:
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


def _find_resume(cfg: TrainConfig, plan: RunPlan) -> tuple[Path, dict] | None:
    if cfg.resume is None:
        return None
    if plan.resume_auto:
        found = latest_usable_checkpoint(plan.run_dir)
        if found is None:
            logger.info("--resume auto: no checkpoint in %s, the run starts at iteration 0",
                        plan.run_dir)
        return found
    return Path(cfg.resume), load_checkpoint(cfg.resume)


def _check_resume(cfg: TrainConfig, path: Path, checkpoint: dict, run_dir: Path
                  ) -> list[tuple[str, Any, Any]]:
    """The checkpoint can continue this command line; returns the schedule options changed."""
    describe_checkpoint(checkpoint, path, cfg.model, cfg.n_classes)
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


def _train(cfg: TrainConfig, dist_info: distributed.DistInfo, plan: RunPlan) -> dict[str, Any]:
    device = dist_info.device
    world = dist_info.world_size
    out_dir = plan.run_dir
    check_batch_split(cfg.batch_size, world, uses_sync_bn(cfg, dist_info))
    resume = _find_resume(cfg, plan)
    changes = _check_resume(cfg, *resume, out_dir) if resume is not None else []
    torch.manual_seed(cfg.seed)
    if dist_info.is_main:
        logger.info("run folder: %s", out_dir)
        logger.info("config: %s", dataclasses.asdict(cfg))
        logger.info("%d process(es) on %s, %d images per process per iteration",
                    world, device, cfg.batch_size // world)

    if dist_info.is_main:
        prepare_dataset(cfg)  # e.g. generates the toy dataset; only once, before others read it
    distributed.barrier()
    info = dataset_info(cfg)
    if cfg.check_data and dist_info.is_main:
        logger.info("checking every label of the training split (--no-check-data skips it)")
    train_set = build_dataset(cfg, "train", train=True, check_labels=cfg.check_data,
                              progress=dist_info.is_main and interactive())
    if dist_info.is_main:
        logger.info("training set: %d images from %s", len(train_set), cfg.data_root)
    class_weights = class_weights_for_run(cfg, dist_info.is_main, info.class_names)
    if resume is not None:  # checkpoints older than --class-weights had none
        check_resumed_class_weights(resume[1].get("class_weights"), class_weights, resume[0])

    model = build_train_model(cfg, dist_info, init_weights=resume is None)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.head_lr_mult)
    use_scaler = cfg.fp16 and device.type == "cuda"
    state = RunState(cfg, info, out_dir, model, optimizer, make_scheduler(optimizer, cfg),
                     torch.amp.GradScaler(device.type, enabled=use_scaler),
                     class_weights=class_weights)
    if cfg.ema_decay:
        state.ema = WeightEma(model, cfg.ema_decay)
    if resume is not None:
        path, checkpoint = resume
        state.load(checkpoint)
        state.last_checkpoint = path
        del checkpoint
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

    if cfg.compile:
        state.compiled = compile_for_training(state.net, cfg.compile_mode)

    sampler = InfiniteShardedSampler(len(train_set), cfg.batch_size, dist_info.rank, world,
                                     seed=cfg.seed, start_iter=state.iteration)
    loader = DataLoader(
        train_set, batch_size=cfg.batch_size // world, sampler=sampler,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        worker_init_fn=worker_init, persistent_workers=cfg.num_workers > 0,
    )
    criterion = OhemCrossEntropy(thresh=cfg.ohem_thresh, ignore_index=cfg.ignore_index,
                                 class_weights=class_weights).to(device)

    val_set = build_dataset(cfg, "val", train=False) if cfg.eval_every else None
    events = EventLog(out_dir if dist_info.is_main and cfg.tensorboard else None,
                      purge_step=state.iteration)
    try:
        summary = _train_loop(state, loader, criterion, dist_info, val_set, events)
        final_path = out_dir / FINAL_NAME
        state.ensure_finite()
        if dist_info.is_main:
            # the full state: a larger --max-iter with --resume extends a finished run
            state.save(final_path)
            logger.info("saved %s", final_path)
            if state.ema is not None:
                save_checkpoint(out_dir / FINAL_EMA_NAME, state.model_checkpoint(state.ema.module))
                logger.info("saved %s (EMA of the weights, decay %g)", out_dir / FINAL_EMA_NAME,
                            state.ema.decay)
            write_curves(state, out_dir / CURVES_NAME)
        summary["checkpoint"] = str(final_path)
        summary["run_dir"] = str(out_dir)

        if cfg.eval_at_end:
            summary.update(_evaluate_at_end(cfg, dist_info, out_dir, info, model, state.ema,
                                            events))
    finally:
        events.close()
    return summary


def write_curves(state: RunState, path: Path) -> Path | None:
    """``curves.png``: loss, learning rate and validation mIoU over the iterations logged
    (matplotlib; without it, skipped with one log line saying so)."""
    h = state.history
    try:
        write_training_curves(path, h.iterations, h.loss, h.lr, h.val_iterations, h.val_miou,
                              state.cfg.max_iter)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "matplotlib":
            raise
        logger.info("%s skipped: matplotlib cannot be imported (%s); pip install matplotlib "
                    "to get it (the same values are in TensorBoard and the log)", path.name, exc)
        return None
    logger.info("training curves written to %s", path)
    return path


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


def _train_loop(state: RunState, loader: DataLoader, criterion: nn.Module,
                dist_info: distributed.DistInfo, val_set=None,
                events: EventLog | None = None) -> dict[str, Any]:
    cfg, device = state.cfg, dist_info.device
    events = events or EventLog(None)
    bar = progress_bar(cfg.max_iter, state.iteration, dist_info.is_main and interactive())
    start_time, validation_seconds = time.perf_counter(), 0.0
    names = state.model.output_names
    state.net.train()
    sums = torch.zeros(len(names) + 1, device=device)
    scaler = state.scaler
    # runs of skipped steps, counted on the device (see count_skipped_steps)
    skip_run = torch.zeros((), device=device)
    skip_longest = torch.zeros((), device=device)
    count = 0
    channels_last = use_channels_last(cfg.channels_last, device)
    tic = time.perf_counter()
    batches = iter(loader)
    # with a progress bar, log lines are printed above it
    with StopRequest() as stop, logging_redirect_tqdm() if bar is not None else nullcontext():
        while state.iteration < cfg.max_iter:
            it = state.iteration
            # Randomness inside the model (dropout) depends only on (seed, rank, iteration), so
            # that a resumed run continues exactly as an uninterrupted one would have.
            torch.manual_seed(iteration_seed(cfg.seed, dist_info.rank, it))
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images = to_memory_format(images, channels_last)
            loss, losses = step_losses(state.net, criterion, images, labels, cfg.aux_weight,
                                       autocast_context(device, cfg.fp16))
            state.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # the scale tensor before the step (private attribute: get_scale() would synchronise)
            scale_before = scaler._scale.clone() if scaler.is_enabled() else None
            scaler.step(state.optimizer)
            scaler.update()
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update(state.model)
            state.iteration = it = it + 1
            stats = torch.cat([loss.detach()[None], losses.detach()])
            if scale_before is not None:
                count_skipped_steps(skip_run, skip_longest, scale_before, scaler._scale)
                # the scaler skips the occasional overflow: only its history signals divergence
                stats = torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0)
            sums += stats
            count += 1
            if bar is not None:
                bar.update(1)

            if it % cfg.log_every == 0 or it == cfg.max_iter:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - tic
                _check_divergence(state, sums, count, names, skip_longest)
                skip_longest.copy_(skip_run)
                if dist_info.is_main:
                    means = _log_progress(it, cfg, state.optimizer, sums, names, count, elapsed)
                    record_progress(state, events, means, count, elapsed)
                    if bar is not None:
                        bar.set_postfix(loss=f"{means[0]:.4f}", refresh=False)
                sums.zero_()
                count = 0
                tic = time.perf_counter()
            if val_set is not None and cfg.eval_every and it % cfg.eval_every == 0:
                seconds = validate(state, val_set, dist_info, events)
                validation_seconds += seconds
                tic += seconds  # the s/it and images/s of the next log line exclude it
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.max_iter:
                _check_divergence(state, sums, count, names, skip_longest)
                _save_periodic(state, dist_info)
            if it < cfg.max_iter and stop.agreed(it, dist_info):  # else: finishing anyway
                if dist_info.is_main:
                    logger.warning("signal %d: stopping after iteration %d", stop.signum or 0, it)
                if state.last_checkpoint != state.run_dir / CHECKPOINT_PATTERN.format(it):
                    _check_divergence(state, sums, count, names, skip_longest)
                    _save_periodic(state, dist_info)
                raise KeyboardInterrupt(f"stopped at iteration {it}")
    if bar is not None:
        bar.close()
    total = time.perf_counter() - start_time
    if dist_info.is_main and validation_seconds:
        logger.info("training loop: %.1f s, of which validation %.1f s (%.1f%%)", total,
                    validation_seconds, 100 * validation_seconds / total)
    return {"iterations": state.iteration, "final_lr": base_lr(state.optimizer),
            "loop_seconds": total, "validation_seconds": validation_seconds}


def _check_divergence(state: RunState, sums: torch.Tensor, count: int, names: Sequence[str],
                      skip_longest: torch.Tensor) -> None:
    """Raise TrainingDiverged on a non-finite loss or a GradScaler that keeps skipping steps.

    Called at logging and checkpoint times only: reading the sums synchronises with the device.
    The verdict is all-reduced so that every rank stops together.
    """
    bad = (~torch.isfinite(sums)).any().to(sums.dtype)[None]
    distributed.all_reduce_sum(bad)
    if bad.item():
        means = (sums / max(count, 1)).tolist()
        heads = dict(zip(names, [f"{v:.4g}" for v in means[1:]], strict=True))
        raise diverged(state, f"loss is {means[0]} (mean of the last {count} iterations, per "
                              f"head: {heads})")
    if state.scaler.is_enabled():
        reason = fp16_divergence(int(skip_longest.item()), state.scaler.get_scale())
        if reason is not None:
            raise diverged(state, reason)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + iteration) % (2**63)


def _save_periodic(state: RunState, dist_info: distributed.DistInfo) -> Path:
    path = state.run_dir / CHECKPOINT_PATTERN.format(state.iteration)
    state.ensure_finite()  # on every rank (same weights), so that all stop together
    if dist_info.is_main:
        state.save(path)
        prune_checkpoints(state.run_dir, state.cfg.keep_checkpoints)  # this run's folder only
        logger.info("saved %s", path)
    distributed.barrier()
    state.last_checkpoint = path
    return path


def _evaluate_at_end(cfg, dist_info, out_dir, info, model, ema: WeightEma | None = None,
                     events: EventLog | None = None) -> dict[str, Any]:
    """The recipe's evaluation, on the model's inference form: the very computation that
    ``evaluate.py`` runs on the saved ``model_final.pth`` (and ``model_final_ema.pth``), so both
    print the same numbers."""
    val_set = build_dataset(cfg, "val", train=False)
    options = cfg.eval_options()
    summary: dict[str, Any] = {}
    weights = {"": model} if ema is None else {"": model, "_ema": ema.module}
    for suffix, module in weights.items():
        inference_model = to_inference_form(module)
        results = evaluate(inference_model, val_set, cfg.n_classes, options,
                           device=dist_info.device, ignore_index=cfg.ignore_index,
                           progress=dist_info.is_main and interactive())
        if not dist_info.is_main:
            continue
        logger.info("validation%s (%d images; %s):\n%s", " of the EMA weights" if suffix else "",
                    len(val_set), options.describe(), format_iou_table(results, info.class_names))
        scores = {f"{mode}{suffix}": segmentation_metrics(conf) for mode, conf in results.items()}
        summary.update({f"miou_{key}": m.miou for key, m in scores.items()})
        if events is not None:
            events.scalars(cfg.max_iter, {f"final/{name}_{key}": 100 * value
                                          for key, m in scores.items()
                                          for name, value in m.summary().items()})
        if not suffix:
            example = save_example_prediction(inference_model, val_set, 0,
                                              out_dir / "example_prediction.png", info.palette,
                                              dist_info.device, info.class_names,
                                              cfg.ignore_index)
            logger.info("image | ground truth | prediction of %s written to %s",
                        val_set.pairs[0][0], example)
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
    try:
        return train(cfg)
    except RunFinished as exc:
        logger.info("%s", exc)
        return {"finished": str(exc)}
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (TrainingDiverged, CheckpointError, PretrainedWeightsError, ValueError,
            FileNotFoundError) as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None


__all__ = ["train", "main", "TrainingDiverged", "RunState", "autocast_context",
           "build_checkpoint", "load_finetune_weights", "check_batch_split", "fp16_divergence",
           "count_skipped_steps", "make_scheduler"]
