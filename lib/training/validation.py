"""Validation during training (``--eval-every N``) and the best model's bookkeeping.

Every N iterations the single-scale evaluation runs on the inference form of the model (and of
its EMA, with ``--ema-decay``), through the same distributed evaluator as ``evaluate.py``: under
DDP each rank evaluates its share of the images and the confusion matrices are summed. The mIoU is
logged, and ``model_best.pth`` (a model file with its iteration and mIoU inside) is rewritten,
atomically and by rank 0, whenever a weight set beats the best so far. The bookkeeping travels in
the checkpoints, so ``--resume`` continues it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from lib.common import distributed
from lib.common.log import interactive
from lib.deployment.examples import example_panel
from lib.deployment.inference import to_inference_form
from lib.evaluation.evaluator import EvalOptions, evaluate
from lib.evaluation.metrics import SegmentationMetrics, segmentation_metrics
from lib.models.checkpoint import save_checkpoint
from lib.training.monitor import EventLog

if TYPE_CHECKING:
    from lib.training.state import RunState

logger = logging.getLogger("bisenet")

BEST_NAME = "model_best.pth"
PREVIEW_IMAGES = 3  # validation images shown in TensorBoard at each validation


@dataclass
class BestModel:
    """The best validation mIoU so far, when it was reached, and by which weights."""

    miou: float = -1.0
    iteration: int = 0
    weights: str = ""  # "raw" or "ema"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> BestModel:
        return cls(**values) if values else cls()


def weight_sets(state: RunState) -> dict[str, nn.Module]:
    """The weights a validation evaluates: the raw model, and its EMA when there is one."""
    sets = {"raw": state.model}
    if state.ema is not None:
        sets["ema"] = state.ema.module
    return sets


def validate(state: RunState, val_set, dist_info: distributed.DistInfo,
             events: EventLog) -> float:
    """Evaluate (single scale), log, update ``model_best.pth``; returns the seconds it took."""
    tic = time.perf_counter()
    cfg, it = state.cfg, state.iteration
    options = EvalOptions(modes=("ss",), short_side=cfg.eval_short_side)
    results: dict[str, tuple[np.ndarray, float]] = {}
    metrics: dict[str, SegmentationMetrics] = {}
    lean_models = {}
    for name, module in weight_sets(state).items():
        lean = to_inference_form(module)
        conf = evaluate(lean, val_set, cfg.data.n_classes, options, device=dist_info.device,
                        ignore_index=cfg.data.ignore_index,
                        progress=dist_info.is_main and interactive())["ss"]
        metrics[name] = segmentation_metrics(conf)
        results[name] = (metrics[name].iou, metrics[name].miou)
        lean_models[name] = lean
    # every rank holds the same summed matrices, hence the same verdict
    name, (_, miou) = max(results.items(), key=lambda kv: np.nan_to_num(kv[1][1], nan=-1.0))
    improved = bool(miou > state.best.miou)
    if improved:
        state.best = BestModel(float(miou), it, name)
    state.history.add_validation(it, results["raw"][1])
    if dist_info.is_main:
        if improved:
            best = state.model_checkpoint(weight_sets(state)[name])
            best.update(best_miou=float(miou), weights=name)
            save_checkpoint(state.run_dir / BEST_NAME, best)
        shown = " | ".join(f"{n} mIoU {100 * m:.2f}%" for n, (_, m) in results.items())
        raw = metrics["raw"]
        logger.info("validation at iteration %d (%d images, ss): %s; raw pixel accuracy "
                    "%.2f%%, fwIoU %.2f%%, macro F1 %.2f%%, micro F1 %.2f%%; best %.2f%% at "
                    "iteration %d (%s)%s; %.1f s", it, len(val_set), shown,
                    100 * raw.pixel_accuracy, 100 * raw.fw_iou, 100 * raw.macro_f1,
                    100 * raw.micro_f1, 100 * state.best.miou, state.best.iteration,
                    state.best.weights, f"; saved {BEST_NAME}" if improved else "",
                    time.perf_counter() - tic)
        _write_events(state, events, metrics, lean_models["raw"], val_set, dist_info)
    distributed.barrier()
    return time.perf_counter() - tic


def _write_events(state: RunState, events: EventLog, metrics: dict[str, SegmentationMetrics],
                  lean: nn.Module, val_set, dist_info: distributed.DistInfo) -> None:
    if not events.enabled:
        return
    it, names = state.iteration, state.info.class_names
    for weights, scores in metrics.items():
        prefix = "val" if weights == "raw" else f"val_{weights}"
        values = {f"{prefix}/{key}": 100 * value for key, value in scores.summary().items()}
        for kind, per_class in (("iou", scores.iou), ("f1", scores.f1)):
            values.update({f"{prefix}_{kind}/{names[c].replace(' ', '_')}": 100 * per_class[c]
                           for c in range(len(per_class)) if not np.isnan(per_class[c])})
        events.scalars(it, values)
    events.images(it, {
        f"val/prediction_{i}": example_panel(lean, val_set, i, state.info.palette, names,
                                             dist_info.device, state.cfg.data.ignore_index)
        for i in range(min(PREVIEW_IMAGES, len(val_set)))})
    events.flush()


__all__ = ["BestModel", "BEST_NAME", "validate", "weight_sets"]
