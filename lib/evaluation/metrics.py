"""Scores from a confusion matrix (rows: ground truth, columns: prediction): per-class IoU and
mIoU, pixel accuracy, frequency-weighted IoU and per-class / macro / micro F1, as the reference
implementation's evaluation reports print them, and the table ``evaluate.py`` prints.

A class absent from both the ground truth and the predictions has no score (NaN) and is left out
of the means, so an absent class never turns the mIoU into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[C, C] int64 counts on the tensors' device, rows = ground truth, columns = prediction.

    Pixels labelled ``ignore_index`` are skipped. Any other label (or prediction) outside
    ``[0, n_classes)`` raises ``ValueError``: dropping it would silently change the IoU.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape "
                         f"{tuple(label.shape)}")
    valid = label != ignore_index
    truth, guess = label[valid].long(), pred[valid].long()
    out_of_range = (truth < 0) | (truth >= n_classes) | (guess < 0) | (guess >= n_classes)
    if bool(out_of_range.any()):
        bad_truth = torch.unique(truth[(truth < 0) | (truth >= n_classes)]).tolist()
        bad_guess = torch.unique(guess[(guess < 0) | (guess >= n_classes)]).tolist()
        raise ValueError(
            f"values outside [0, {n_classes}) that are not the ignore index {ignore_index}: "
            f"labels {bad_truth[:10]}, predictions {bad_guess[:10]}"
        )
    index = truth * n_classes + guess
    return torch.bincount(index, minlength=n_classes * n_classes).view(n_classes, n_classes)


def iou_from_confusion(conf: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU and its mean.

    A class absent from both the ground truth and the prediction has no IoU (NaN) and is left out
    of the mean, so an absent class never turns the mIoU into NaN; the mean is NaN only when the
    matrix is empty.
    """
    conf = conf.double().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(
        conf, np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    true_pos = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - true_pos
    iou = np.full(len(conf), np.nan)
    np.divide(true_pos, union, out=iou, where=union > 0)
    present = ~np.isnan(iou)
    return iou, float(iou[present].mean()) if present.any() else float("nan")


@dataclass(frozen=True)
class SegmentationMetrics:
    """The scores the reference implementation prints, from one confusion matrix.

    * ``iou`` / ``miou``: see :func:`iou_from_confusion`;
    * ``f1`` (dice) per class: ``2 TP / (2 TP + FP + FN)``, NaN for a class absent from both the
      ground truth and the predictions, which ``macro_f1`` (their mean) leaves out, as the mIoU
      does;
    * ``micro_f1``: ``2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN))`` over all classes; every
      wrong pixel is one false positive and one false negative, so it equals the pixel accuracy;
    * ``pixel_accuracy``: correct pixels / labelled pixels;
    * ``fw_iou``: the IoUs weighted by each class's share of the labelled pixels (classes without
      a ground-truth pixel weigh nothing).

    Everything is NaN only for an empty matrix.
    """

    iou: np.ndarray
    miou: float
    f1: np.ndarray
    macro_f1: float
    micro_f1: float
    pixel_accuracy: float
    fw_iou: float

    def summary(self) -> dict[str, float]:
        """The single numbers, by name."""
        return {"mIoU": self.miou, "fwIoU": self.fw_iou, "pixel_accuracy": self.pixel_accuracy,
                "macro_F1": self.macro_f1, "micro_F1": self.micro_f1}

    def as_dict(self, class_names: Sequence[str]) -> dict:
        """JSON-ready: the single numbers and the per-class IoU and F1 by class name (None for
        a class without a score)."""
        def plain(value: float) -> float | None:
            return None if np.isnan(value) else float(value)

        return {**{k: plain(v) for k, v in self.summary().items()},
                "iou": {n: plain(v) for n, v in zip(class_names, self.iou, strict=True)},
                "f1": {n: plain(v) for n, v in zip(class_names, self.f1, strict=True)}}


def segmentation_metrics(conf: torch.Tensor | np.ndarray) -> SegmentationMetrics:
    """Every score of :class:`SegmentationMetrics` from a [C, C] confusion matrix (rows: ground
    truth, columns: prediction)."""
    iou, miou = iou_from_confusion(conf)
    conf = conf.double().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(
        conf, np.float64)
    true_pos, truth, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
    total = conf.sum()
    f1 = np.full(len(conf), np.nan)
    np.divide(2 * true_pos, truth + predicted, out=f1, where=truth + predicted > 0)
    present = ~np.isnan(f1)
    if total == 0:
        return SegmentationMetrics(iou, miou, f1, *(float("nan"),) * 4)
    errors = total - true_pos.sum()  # each one a false positive and a false negative
    seen = truth > 0
    return SegmentationMetrics(
        iou=iou, miou=miou, f1=f1,
        macro_f1=float(f1[present].mean()),
        micro_f1=float(2 * true_pos.sum() / (2 * true_pos.sum() + 2 * errors)),
        pixel_accuracy=float(true_pos.sum() / total),
        fw_iou=float((truth[seen] / total * iou[seen]).sum()),
    )


def format_iou_table(results: dict[str, torch.Tensor], class_names: Sequence[str]) -> str:
    """Per-class IoU (%) with one column per mode, then per-class F1 (dice, %) per mode, and a
    last mIoU row ('-' for a class absent from both the ground truth and the predictions),
    followed by a table of the single numbers of each mode (:class:`SegmentationMetrics`)."""
    from tabulate import tabulate

    columns = {mode: segmentation_metrics(conf) for mode, conf in results.items()}
    for mode, metrics in columns.items():
        if len(metrics.iou) != len(class_names):
            raise ValueError(f"{len(class_names)} class names for the {len(metrics.iou)} classes "
                             f"of the {mode!r} confusion matrix")

    def cell(value: float) -> str:
        return "-" if np.isnan(value) else f"{100 * value:.2f}"

    rows = [[name] + [cell(m.iou[i]) for m in columns.values()]
            + [cell(m.f1[i]) for m in columns.values()] for i, name in enumerate(class_names)]
    rows.append(["mIoU"] + [cell(m.miou) for m in columns.values()] + [""] * len(columns))
    per_class = tabulate(rows, headers=["class", *columns, *(f"F1 {m}" for m in columns)],
                         tablefmt="github", colalign=("left",) + ("right",) * 2 * len(columns),
                         disable_numparse=True)
    names = {"mIoU": "mIoU", "fwIoU": "frequency-weighted IoU", "pixel_accuracy":
             "pixel accuracy", "macro_F1": "macro F1", "micro_F1": "micro F1"}
    summary = [[label] + [cell(m.summary()[key]) for m in columns.values()]
               for key, label in names.items()]
    overall = tabulate(summary, headers=["metric (%)", *columns], tablefmt="github",
                       colalign=("left",) + ("right",) * len(columns), disable_numparse=True)
    return f"{per_class}\n\n{overall}"
