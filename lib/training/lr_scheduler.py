"""Warm-up followed by poly decay, stepped once per iteration (seed tip 6: 1000 warm-up iters)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupPolyLR(LRScheduler):
    """lr = base_lr * factor(it) for each parameter group.

    Warm-up (``it < warmup_iter``) rises from ``warmup_ratio`` to 1, exponentially
    (``ratio ** (1 - it / warmup_iter)``) or linearly; then ``(1 - progress) ** power`` decays to 0
    at ``max_iter`` (and stays 0 after it), progress counted from the end of the warm-up.
    The base lr of a group is its initial ``lr``, which already includes the group's ``lr_mult``
    (see :func:`lib.training.optim.build_optimizer`). Being an ``LRScheduler``, its
    ``state_dict`` resumes.
    """

    def __init__(self, optimizer: Optimizer, max_iter: int, warmup_iter: int = 1000,
                 warmup_ratio: float = 0.1, warmup: str = "exp", power: float = 0.9,
                 last_epoch: int = -1) -> None:
        if warmup not in ("exp", "linear"):
            raise ValueError(f"warm-up must be 'exp' or 'linear', got {warmup!r}")
        if not 0 <= warmup_iter < max_iter:
            raise ValueError(f"warmup_iter ({warmup_iter}) must be in [0, max_iter={max_iter})")
        if not 0 < warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in (0, 1], got {warmup_ratio}")
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        self.max_iter, self.warmup_iter = max_iter, warmup_iter
        self.warmup_ratio, self.warmup, self.power = warmup_ratio, warmup, power
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        """The multiplier of the base learning rates at iteration ``it``."""
        if it < self.warmup_iter:
            progress = it / self.warmup_iter
            if self.warmup == "exp":
                return self.warmup_ratio ** (1 - progress)
            return self.warmup_ratio + (1 - self.warmup_ratio) * progress
        progress = min(it - self.warmup_iter, self.max_iter - self.warmup_iter)
        return (1 - progress / (self.max_iter - self.warmup_iter)) ** self.power

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
