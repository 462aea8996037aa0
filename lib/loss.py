"""Online hard example mining (OHEM) cross-entropy, the seed's first training trick."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lib.layers import at_least_float32


class OhemCrossEntropy(nn.Module):
    """Cross-entropy averaged over the hard pixels only (OHEM, as used to train BiSeNet).

    A pixel is hard when the predicted probability of its true class is below ``thresh`` (its loss
    exceeds ``-log(thresh)``). At least ``n_min = max(1, floor(valid * min_kept_ratio))`` of the
    valid (non-ignored) pixels are kept, the hardest ones, so that a well-fitted batch still gives
    a signal. A batch whose pixels are all ignored gives a zero loss that still back-propagates
    (zero gradients, no NaN). The loss is computed in float32, also under autocast (in float64
    for float64 logits).

    A label that is neither a class index nor ``ignore_index`` raises ``ValueError`` here, not a
    device-side assert later.
    """

    def __init__(self, thresh: float = 0.7, min_kept_ratio: float = 1 / 16,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if not 0 < thresh < 1:
            raise ValueError(f"OHEM threshold must be in (0, 1), got {thresh}")
        if not 0 < min_kept_ratio <= 1:
            raise ValueError(f"min_kept_ratio must be in (0, 1], got {min_kept_ratio}")
        self.thresh = thresh
        self.loss_thresh = -math.log(thresh)
        self.min_kept_ratio = min_kept_ratio
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"expected logits [N, C, H, W] and labels [N, H, W], got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        n_classes = logits.shape[1]
        valid = labels != self.ignore_index
        out_of_range = valid & ((labels < 0) | (labels >= n_classes))
        # one host synchronisation for both counts
        n_valid, n_bad = torch.stack([valid.sum(), out_of_range.sum()]).tolist()
        if n_bad:
            bad = torch.unique(labels[out_of_range]).tolist()[:10]
            raise ValueError(f"labels {bad} are neither in [0, {n_classes}) nor the ignore index "
                             f"{self.ignore_index}")
        with torch.autocast(logits.device.type, enabled=False):
            losses = F.cross_entropy(at_least_float32(logits), labels.long(),
                                     ignore_index=self.ignore_index, reduction="none").flatten()
        if n_valid == 0:
            return losses.sum() * 0.0  # keeps the graph: zero gradients, not NaN
        n_min = max(1, int(n_valid * self.min_kept_ratio))
        hard = losses > self.loss_thresh  # ignored pixels have loss 0, so they are never hard
        if int(hard.sum()) >= n_min:
            return losses[hard].mean()
        # Too few hard pixels: the n_min largest losses. Only now is a (partial) sort needed.
        return losses.topk(n_min, sorted=False).values.mean()
