"""Training, from the command line to the final evaluation; the per-model ``train.py`` scripts
only supply their recipe (a ``TrainConfig``) and call :func:`main`.

A run is defined by ``max_iter`` and the *global* batch size, so 1, 2 or N processes see the same
samples with the same augmentation and follow the same learning-rate curve. In order: set-up and
resume (``setup``), the loop (``loop``), the final files and evaluation (``final``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from lib.common import distributed
from lib.common.log import setup_logging
from lib.data.dataset import build_dataset
from lib.models.checkpoint import CheckpointError
from lib.models.pretrained import PretrainedWeightsError
from lib.training.config import TrainConfig, parse_config
from lib.training.divergence import TrainingDiverged
from lib.training.final import finish
from lib.training.loop import train_loop
from lib.training.loss import OhemCrossEntropy
from lib.training.monitor import EventLog
from lib.training.runs import RunFinished, RunPlan
from lib.training.setup import (
    build_loader,
    build_state,
    check_batch_split,
    check_resume,
    find_resume,
    log_start,
    plan_run_folder,
    training_set,
    uses_sync_bn,
)

logger = logging.getLogger("bisenet")

# The GradScaler skips the optimizer step on overflow while the schedule still advances one
# iteration, which is intended; PyTorch warns about that order on the first skipped step.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model``, evaluate it on the validation split, and return a summary."""
    dist_info = distributed.init_distributed(cfg.device)
    setup_logging(None, dist_info.rank)
    try:
        plan = plan_run_folder(cfg, dist_info)
        setup_logging(plan.run_dir / "train.log" if dist_info.is_main else None, dist_info.rank)
        return _train(cfg, dist_info, plan)
    finally:
        distributed.cleanup_distributed()


def _train(cfg: TrainConfig, dist_info: distributed.DistInfo, plan: RunPlan) -> dict[str, Any]:
    check_batch_split(cfg.batch_size, dist_info.world_size, uses_sync_bn(cfg, dist_info),
                      cfg.accumulate)
    resume = find_resume(cfg, plan)
    changes = check_resume(cfg, *resume, plan.run_dir) if resume is not None else []
    torch.manual_seed(cfg.seed)
    log_start(cfg, dist_info, plan.run_dir)
    train_set = training_set(cfg, dist_info)
    state = build_state(cfg, dist_info, plan.run_dir, resume, changes)
    del resume  # the checkpoint's tensors are in the state now
    pipeline = build_loader(cfg, train_set, dist_info, state.iteration)
    criterion = OhemCrossEntropy(thresh=cfg.ohem_thresh, ignore_index=cfg.data.ignore_index,
                                 class_weights=state.class_weights).to(dist_info.device)
    val_set = build_dataset(cfg.data, "val") if cfg.eval_every else None
    events = EventLog(plan.run_dir if dist_info.is_main and cfg.tensorboard else None,
                      purge_step=state.iteration)
    try:
        summary = train_loop(state, pipeline, criterion, dist_info, val_set, events)
        summary.update(finish(state, dist_info, events))
    finally:
        events.close()
    return summary


@record  # under torchrun, a failing rank's traceback is shown in the launcher's summary
def main(recipe: TrainConfig, argv: Sequence[str] | None = None, description: str = "",
         presets: dict[str, TrainConfig] | None = None) -> dict[str, Any]:
    """Entry point of the per-model ``train.py`` scripts."""
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
