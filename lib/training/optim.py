"""SGD with the seed's parameter groups, and its schedule: warm-up then poly decay, stepped once
per iteration (seed tip 6: 1000 warm-up iterations)."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9,
                    weight_decay: float = 5e-4, head_lr_mult: float = 10.0) -> torch.optim.SGD:
    """SGD whose groups apply weight decay only to weights of convolutions and linear layers
    (not to BatchNorm weights or any bias: every parameter with ndim <= 1), and ``head_lr_mult``
    times the learning rate to the parameters of ``model.head_modules()`` (seed tips 2 and 3).

    Each group records its ``lr_mult``; the LR scheduler scales each group's initial lr.
    """
    head_ids = set()
    if hasattr(model, "head_modules"):
        head_ids = {id(p) for module in model.head_modules() for p in module.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (head, decay): [] for head in (False, True) for decay in (True, False)}
    for param in model.parameters():
        if param.requires_grad:
            groups[(id(param) in head_ids, param.ndim > 1)].append(param)
    param_groups = []
    for (head, decay), params in groups.items():
        if params:
            mult = head_lr_mult if head else 1.0
            param_groups.append({"params": params, "lr": lr * mult, "lr_mult": mult,
                                 "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


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
