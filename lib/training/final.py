"""The end of a run: ``model_final.pth`` (and its EMA), ``curves.png``, and the recipe's evaluation.

The evaluation runs on the model's inference form through the same evaluator as ``evaluate.py``
on the saved ``model_final.pth``, so both print the same numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lib.common import distributed
from lib.common.curves import write_training_curves
from lib.common.log import interactive
from lib.data.dataset import build_dataset
from lib.deployment.examples import save_example_prediction
from lib.deployment.inference import to_inference_form
from lib.evaluation.evaluator import evaluate
from lib.evaluation.metrics import format_iou_table, segmentation_metrics
from lib.models.checkpoint import save_checkpoint
from lib.training.monitor import EventLog
from lib.training.runs import FINAL_NAME
from lib.training.state import RunState
from lib.training.step import without_cudnn_autotuning

logger = logging.getLogger("bisenet")

# Written next to model_final.pth: the EMA weights (--ema-decay) and the training curves.
FINAL_EMA_NAME = "model_final_ema.pth"
CURVES_NAME = "curves.png"


def finish(state: RunState, dist_info: distributed.DistInfo, events: EventLog) -> dict[str, Any]:
    """Save the final files (rank 0) and run the recipe's evaluation; returns their summary."""
    final_path = state.run_dir / FINAL_NAME
    state.ensure_finite()
    if dist_info.is_main:
        save_final(state, final_path)
    summary: dict[str, Any] = {"checkpoint": str(final_path), "run_dir": str(state.run_dir)}
    if state.cfg.eval_at_end:
        with without_cudnn_autotuning():  # evaluation images come in many sizes
            summary.update(evaluate_at_end(state, dist_info, events))
    return summary


def save_final(state: RunState, final_path: Path) -> None:
    # the full state: a larger --max-iter with --resume extends a finished run
    state.save(final_path)
    logger.info("saved %s", final_path)
    if state.ema is not None:
        ema_path = state.run_dir / FINAL_EMA_NAME
        save_checkpoint(ema_path, state.model_checkpoint(state.ema.module))
        logger.info("saved %s (EMA of the weights, decay %g)", ema_path, state.ema.decay)
    write_curves(state, state.run_dir / CURVES_NAME)


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


def evaluate_at_end(state: RunState, dist_info: distributed.DistInfo,
                    events: EventLog | None = None) -> dict[str, Any]:
    """The recipe's evaluation of the final weights (and of their EMA), on the inference form."""
    cfg, info = state.cfg, state.info
    val_set = build_dataset(cfg.data, "val")
    options = cfg.eval_options()
    summary: dict[str, Any] = {}
    weights = {"": state.model}
    if state.ema is not None:
        weights["_ema"] = state.ema.module
    for suffix, module in weights.items():
        inference_model = to_inference_form(module)
        results = evaluate(inference_model, val_set, cfg.data.n_classes, options,
                           device=dist_info.device, ignore_index=cfg.data.ignore_index,
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
                                              state.run_dir / "example_prediction.png",
                                              info.palette, dist_info.device, info.class_names,
                                              cfg.data.ignore_index)
            logger.info("image | ground truth | prediction of %s written to %s",
                        val_set.pairs[0][0], example)
    return summary
