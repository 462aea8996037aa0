"""Online hard example mining (OHEM) cross-entropy, the seed's first training trick."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class OhemCrossEntropy(nn.Module):
    """Cross-entropy averaged over the hard pixels only.

    A pixel is hard when the predicted probability of its true class is below ``thresh`` (its loss
    exceeds ``-log(thresh)``). At least ``min_kept_ratio`` of the valid (non-ignored) pixels are
    kept, the hardest ones, so that a well-fitted batch still gives a signal. A batch whose pixels
    are all ignored gives a zero loss that still back-propagates (no NaN).
    """

    def __init__(self, thresh: float = 0.7, min_kept_ratio: float = 1 / 16,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if not 0 < thresh < 1:
            raise ValueError(f"OHEM threshold must be in (0, 1), got {thresh}")
        self.loss_thresh = -math.log(thresh)
        self.min_kept_ratio = min_kept_ratio
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index,
                                 reduction="none").flatten()
        n_valid = int((labels != self.ignore_index).sum())
        if n_valid == 0:
            return losses.sum() * 0.0  # keeps the graph: zero gradients, not NaN
        n_min = max(1, n_valid // int(round(1 / self.min_kept_ratio)))
        hard = losses[losses > self.loss_thresh]  # ignored pixels have loss 0: never hard
        if hard.numel() < n_min:
            hard = losses.topk(n_min).values
        return hard.mean()
