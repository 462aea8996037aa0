"""The training loop: what happens each iteration, in order.

Load a batch, compute the losses, step the optimizer and the schedule, update the EMA, then, at
their intervals, log, validate, checkpoint, and honour a stop request. Randomness inside the model
depends only on (seed, rank, iteration), so a resumed run continues exactly as an uninterrupted
one would have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from lib.common import distributed
from lib.common.log import interactive, progress_bar
from lib.training.divergence import check_divergence, count_skipped_steps
from lib.training.monitor import EventLog
from lib.training.pipeline import SLOW_DATA_FRACTION, TrainPipeline
from lib.training.runs import CHECKPOINT_PATTERN, prune_checkpoints
from lib.training.state import RunState, base_lr
from lib.training.step import (
    accumulated_step,
    autocast_context,
    to_memory_format,
    use_channels_last,
    without_cudnn_autotuning,
)
from lib.training.stopping import StopRequest
from lib.training.validation import validate

logger = logging.getLogger("bisenet")

@dataclass
class Meters:
    """Sums over the iterations since the last log line, kept on the device (reading them
    synchronises, so that happens at logging and checkpoint times only)."""

    sums: torch.Tensor  # total loss, then one per output head
    skip_run: torch.Tensor  # current run of steps the GradScaler skipped (count_skipped_steps)
    skip_longest: torch.Tensor  # longest such run since the last check
    count: int = 0
    tic: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0  # seconds the loop waited for batches (host side: no device sync)
    intervals: int = 0  # logged so far by this process
    data_advised: bool = False  # the slow-data advice was given

    @classmethod
    def zeros(cls, n_outputs: int, device: torch.device) -> Meters:
        return cls(torch.zeros(n_outputs + 1, device=device), torch.zeros((), device=device),
                   torch.zeros((), device=device))

    def reset(self) -> None:
        self.sums.zero_()
        self.skip_longest.copy_(self.skip_run)
        self.count = 0
        self.tic = time.perf_counter()
        self.data_wait = 0.0
        self.intervals += 1


def timed(batches: Iterator, meters: Meters) -> Iterator:
    """``batches``, adding the time spent waiting for each to ``meters.data_wait``."""
    while True:
        tic = time.perf_counter()
        batch = next(batches)
        meters.data_wait += time.perf_counter() - tic
        yield batch


def train_loop(state: RunState, pipeline: TrainPipeline, criterion: nn.Module,
               dist_info: distributed.DistInfo, val_set=None,
               events: EventLog | None = None) -> dict[str, Any]:
    """Iterate from ``state.iteration`` to ``cfg.max_iter``; returns the loop's summary."""
    cfg = state.cfg
    events = events or EventLog(None)
    bar = progress_bar(cfg.max_iter, state.iteration, dist_info.is_main and interactive())
    start_time, validation_seconds = time.perf_counter(), 0.0
    meters = Meters.zeros(len(state.model.output_names), dist_info.device)
    state.net.train()
    batches = timed(iter(pipeline.loader), meters)
    # with a progress bar, log lines are printed above it
    with StopRequest() as stop, logging_redirect_tqdm() if bar is not None else nullcontext():
        while state.iteration < cfg.max_iter:
            # Randomness inside the model (dropout) depends only on (seed, rank, iteration), so
            # that a resumed run continues exactly as an uninterrupted one would have.
            torch.manual_seed(iteration_seed(cfg.seed, dist_info.rank, state.iteration))
            train_step(state, batches, criterion, meters, pipeline)
            it = state.iteration
            if bar is not None:
                bar.update(1)
            if it % cfg.log_every == 0 or it == cfg.max_iter:
                log_interval(state, meters, pipeline, dist_info, events, bar)
            if val_set is not None and cfg.eval_every and it % cfg.eval_every == 0:
                with without_cudnn_autotuning():
                    seconds = validate(state, val_set, dist_info, events)
                validation_seconds += seconds
                meters.tic += seconds  # the s/it and images/s of the next log line exclude it
            if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.max_iter:
                save_periodic(state, meters, dist_info)
            if it < cfg.max_iter and stop.agreed(it, dist_info):  # else: finishing anyway
                if dist_info.is_main:
                    logger.warning("signal %d: stopping after iteration %d", stop.signum or 0, it)
                if state.last_checkpoint != state.run_dir / CHECKPOINT_PATTERN.format(it):
                    save_periodic(state, meters, dist_info)
                raise KeyboardInterrupt(f"stopped at iteration {it}")
    if bar is not None:
        bar.close()
    total = time.perf_counter() - start_time
    if dist_info.is_main and validation_seconds:
        logger.info("training loop: %.1f s, of which validation %.1f s (%.1f%%)", total,
                    validation_seconds, 100 * validation_seconds / total)
    return {"iterations": state.iteration, "final_lr": base_lr(state.optimizer),
            "loop_seconds": total, "validation_seconds": validation_seconds}


def train_step(state: RunState, batches: Iterator, criterion: nn.Module, meters: Meters,
               pipeline: TrainPipeline) -> None:
    """One iteration: forward and backward of its batch (in ``--accumulate`` micro-batches, the
    gradients all-reduced once), optimizer and schedule step, EMA; adds the losses to ``meters``
    without synchronising with the device."""
    cfg, scaler, device = state.cfg, state.scaler, pipeline.device
    channels_last = use_channels_last(cfg.channels_last, device)

    def to_device(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images, labels = pipeline.to_device(images, labels)
        return to_memory_format(images, channels_last), labels

    state.optimizer.zero_grad(set_to_none=True)
    loss, losses = accumulated_step(state.net, criterion, batches, cfg.accumulate,
                                    cfg.aux_weight, to_device, autocast_context(device, cfg.fp16),
                                    scaler, state.ddp_model)
    # the scale tensor before the step (private attribute: get_scale() would synchronise)
    scale_before = scaler._scale.clone() if scaler.is_enabled() else None
    scaler.step(state.optimizer)
    scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.model)
    state.iteration += 1
    stats = torch.cat([loss.detach()[None], losses.detach()])
    if scale_before is not None:
        count_skipped_steps(meters.skip_run, meters.skip_longest, scale_before, scaler._scale)
        # the scaler skips the occasional overflow: only its history signals divergence
        stats = torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0)
    meters.sums += stats
    meters.count += 1


def log_interval(state: RunState, meters: Meters, pipeline: TrainPipeline,
                 dist_info: distributed.DistInfo, events: EventLog, bar: Any) -> None:
    """Check for divergence, then log the interval's means (rank 0) and start a new interval."""
    if dist_info.device.type == "cuda":
        torch.cuda.synchronize(dist_info.device)
    elapsed = time.perf_counter() - meters.tic
    check_meters(state, meters)
    waited = meters.data_wait / max(elapsed, 1e-9)
    if dist_info.is_main:
        means = log_progress(state, meters, elapsed, waited)
        record_progress(state, events, means, meters.count, elapsed, waited)
        if bar is not None:
            bar.set_postfix(loss=f"{means[0]:.4f}", refresh=False)
        # once, and not from the first interval (it includes starting the workers)
        if waited > SLOW_DATA_FRACTION and meters.intervals and not meters.data_advised:
            logger.warning("%s", pipeline.advice(waited))
            meters.data_advised = True
    meters.reset()


def check_meters(state: RunState, meters: Meters) -> None:
    check_divergence(state, meters.sums, meters.count, state.model.output_names,
                     meters.skip_longest)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + iteration) % (2**63)


def log_progress(state: RunState, meters: Meters, elapsed: float, data_wait: float
                 ) -> list[float]:
    """Log the means of the interval's iterations; returns them (total, then per head).
    ``data_wait``: the fraction of ``elapsed`` the loop spent waiting for the next batch."""
    cfg, it, count = state.cfg, state.iteration, max(meters.count, 1)
    means = (meters.sums / count).tolist()
    per_head = " ".join(f"{n}={v:.4f}"
                        for n, v in zip(state.model.output_names, means[1:], strict=False))
    sec_per_it = elapsed / count
    eta = sec_per_it * (cfg.max_iter - it)
    logger.info(
        "iter %d/%d | lr %.6g | samples %d | loss %.4f (%s) | %.3f s/it | data %.0f%% | eta %s",
        it, cfg.max_iter, base_lr(state.optimizer), it * cfg.batch_size, means[0],
        per_head, sec_per_it, 100 * data_wait,
        time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 3600:.1f} h",
    )
    return means


def record_progress(state: RunState, events: EventLog, means: list[float], count: int,
                    elapsed: float, data_wait: float = 0.0) -> None:
    """The logged values into the history (curves.png) and TensorBoard; already on the host."""
    it, lr = state.iteration, base_lr(state.optimizer)
    state.history.add_training(it, means[0], lr)
    values = {"train/loss": means[0], "train/lr": lr, "train/data_wait": data_wait,
              "train/images_per_s": count * state.cfg.batch_size / max(elapsed, 1e-9)}
    values.update({f"train/loss_{name}": v
                   for name, v in zip(state.model.output_names, means[1:], strict=True)})
    if state.scaler.is_enabled():
        values["train/grad_scale"] = state.scaler.get_scale()
    events.scalars(it, values)



def save_periodic(state: RunState, meters: Meters, dist_info: distributed.DistInfo) -> Path:
    """Write this iteration's checkpoint (rank 0), never from a diverged state."""
    check_meters(state, meters)
    path = state.run_dir / CHECKPOINT_PATTERN.format(state.iteration)
    state.ensure_finite()  # on every rank (same weights), so that all stop together
    if dist_info.is_main:
        state.save(path)
        prune_checkpoints(state.run_dir, state.cfg.keep_checkpoints)  # this run's folder only
        logger.info("saved %s", path)
    distributed.barrier()
    state.last_checkpoint = path
    return path
