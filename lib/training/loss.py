"""Online hard example mining (OHEM) cross-entropy, the seed's first training trick."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class OhemCrossEntropy(nn.Module):
    """Cross-entropy averaged over the hard pixels only (OHEM, as used to train BiSeNet).

    A pixel is hard when the predicted probability of its true class is below ``thresh`` (its loss
    exceeds ``-log(thresh)``). At least ``n_min = max(1, floor(valid * min_kept_ratio))`` of the
    valid (non-ignored) pixels are kept, the hardest ones, so that a well-fitted batch still gives
    a signal. A batch whose pixels are all ignored gives a zero loss that still back-propagates
    (zero gradients, no NaN). The loss is computed in float32, also under autocast.

    A label that is neither a class index nor ``ignore_index`` raises ``ValueError`` here, not a
    device-side assert later.

    With ``class_weights`` (``--class-weights``) the hard pixels are still selected on the
    unweighted loss (the probability of the true class, as in the reference), and the loss is
    the weighted mean of the selected pixels' cross-entropy, ``sum(w_y * ce) / sum(w_y)``: the
    "mean" reduction of PyTorch's weighted ``cross_entropy`` over the selected pixels.
    """

    def __init__(self, thresh: float = 0.7, min_kept_ratio: float = 1 / 16,
                 ignore_index: int = 255,
                 class_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0 < thresh < 1:
            raise ValueError(f"OHEM threshold must be in (0, 1), got {thresh}")
        if not 0 < min_kept_ratio <= 1:
            raise ValueError(f"min_kept_ratio must be in (0, 1], got {min_kept_ratio}")
        self.thresh = thresh
        self.loss_thresh = -math.log(thresh)
        self.min_kept_ratio = min_kept_ratio
        self.ignore_index = ignore_index
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if not (torch.isfinite(weights).all() and (weights > 0).all()):
                raise ValueError(f"class weights must be finite and positive, got "
                                 f"{weights.tolist()}")
        self.register_buffer("class_weights", weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.output_losses([logits], labels)[0]

    def output_losses(self, outputs: Sequence[torch.Tensor], labels: torch.Tensor
                      ) -> torch.Tensor:
        """The OHEM loss of each of ``outputs`` (main and auxiliary logits of one batch), as a
        1-d tensor, each equal to ``self(output, labels)``.

        Cheaper than one call per output: the labels are checked once, and one host-device
        synchronisation reads every count the selection needs (instead of two per output). The
        logits are never copied to float32: log-softmax reads fp16/bf16 logits and writes float32
        (on CUDA in one kernel). The threshold branch masks with ``where`` rather than
        compacting the hard pixels by boolean indexing, which would synchronise once more.
        """
        n_classes = outputs[0].shape[1]
        for logits in outputs:
            if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]) \
                    or logits.shape[1] != n_classes:
                raise ValueError(f"expected logits [N, C, H, W] and labels [N, H, W], got "
                                 f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        labels = labels.long()
        valid = labels != self.ignore_index
        out_of_range = valid & ((labels < 0) | (labels >= n_classes))
        # out-of-range labels would trip a device-side assert in nll_loss before the clear error
        # below is raised: they are ignored until then
        checked = labels.masked_fill(out_of_range, self.ignore_index)
        pixel_losses = [self.pixel_losses(logits, checked) for logits in outputs]
        # ignored pixels have loss 0, so they are never hard
        hard = [losses > self.loss_thresh for losses in pixel_losses]
        n_valid, n_bad, *n_hard = torch.stack(
            [valid.sum(), out_of_range.sum(), *(h.sum() for h in hard)]).tolist()
        if n_bad:
            bad = torch.unique(labels[out_of_range]).tolist()[:10]
            raise ValueError(f"labels {bad} are neither in [0, {n_classes}) nor the ignore index "
                             f"{self.ignore_index}")
        if n_valid == 0:  # keeps the graph: zero gradients, not NaN
            return torch.stack([losses.sum() * 0.0 for losses in pixel_losses])
        n_min = max(1, int(n_valid * self.min_kept_ratio))
        weights = self._pixel_weights(checked, valid, n_classes)
        kept = []
        for losses, is_hard, count in zip(pixel_losses, hard, n_hard, strict=True):
            if count < n_min:  # too few hard pixels: the n_min largest losses (a partial sort)
                is_hard = torch.zeros_like(is_hard).scatter_(
                    0, losses.topk(n_min, sorted=False).indices, True)
                count = n_min
            if weights is None:
                kept.append(torch.where(is_hard, losses, 0.0).sum() / count)
            else:  # ignored pixels weigh 0
                selected = torch.where(is_hard, weights, 0.0)
                kept.append((selected * losses).sum() / selected.sum().clamp_min(1e-12))
        return torch.stack(kept)

    def _pixel_weights(self, labels: torch.Tensor, valid: torch.Tensor, n_classes: int
                       ) -> torch.Tensor | None:
        """Each pixel's class weight, flattened (0 where ignored), or None without weights."""
        if self.class_weights is None:
            return None
        if self.class_weights.numel() != n_classes:
            raise ValueError(f"{self.class_weights.numel()} class weights for {n_classes} "
                             "classes")
        weights = self.class_weights.to(labels.device)[labels.clamp(0, n_classes - 1)]
        return torch.where(valid, weights, 0.0).flatten()

    def pixel_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-pixel float32 cross-entropy, flattened; 0 at ignored pixels. ``labels``: int64.
        float64 logits stay float64 (for exact comparisons in tests)."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(logits.device.type, enabled=False):
            log_probs = F.log_softmax(logits, dim=1, dtype=dtype)
            return F.nll_loss(log_probs, labels, ignore_index=self.ignore_index,
                              reduction="none").flatten()
