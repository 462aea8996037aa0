"""Exponential moving average (EMA) of a model's weights, evaluated and saved beside the raw ones.

After every optimizer step each floating-point entry of the state dict (weights and BatchNorm
running statistics) is updated as ``ema = d * ema + (1 - d) * weight``; integer entries (BatchNorm's
batch counters) are copied. The decay ramps up as ``d = min(decay, (1 + n) / (10 + n))`` after
``n`` updates, so that on a short run the average is not dominated by the random initialisation
(with a constant 0.999 the first weights would still weigh 0.999^200 = 82% after 200 steps).

The average is a deterministic function of the sequence of weights, and its state (the averaged
tensors and the update count) travels in the checkpoints, so a resumed run continues it exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay applied by the update that follows ``updates`` earlier ones."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEma:
    """A copy of ``model`` whose state is the moving average of ``model``'s state."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1) (0 turns it off), got {decay}")
        self.decay = decay
        self.updates = 0
        self._cached: tuple[int, tuple] | None = None  # (id of the source model, tensor lists)
        self.module = copy.deepcopy(getattr(model, "module", model)).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple:
        """(averaged tensors, their sources, copied tensors, their sources); the optimizer and
        load_state_dict update tensors in place, so the lists are built once per source model."""
        if self._cached is not None and self._cached[0] == id(model):
            return self._cached[1]
        own = self.module.state_dict()
        source = getattr(model, "module", model).state_dict()
        averaged = [k for k, v in own.items() if v.is_floating_point()]
        copied = [k for k, v in own.items() if not v.is_floating_point()]
        pairs = ([own[k] for k in averaged], [source[k].detach() for k in averaged],
                 [own[k] for k in copied], [source[k] for k in copied])
        self._cached = (id(model), pairs)
        return pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average (no host-device sync)."""
        averaged, current, copied, current_int = self._pairs(model)
        weight = 1.0 - ema_decay_at(self.decay, self.updates)
        # one fused kernel per tensor group instead of one per tensor (hundreds on BiSeNet)
        torch._foreach_lerp_(averaged, current, weight)
        for own, value in zip(copied, current_int, strict=True):
            own.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"state_dict": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])


__all__ = ["WeightEma", "ema_decay_at"]
