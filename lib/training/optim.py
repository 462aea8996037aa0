"""SGD with the seed's parameter groups."""

from __future__ import annotations

import torch
from torch import nn


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
