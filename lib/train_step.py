"""How the training step is executed: memory format and ``torch.compile``.

Neither option changes what is computed (the losses equal those of the eager, contiguous fp32
step to float rounding; tests/test_train_step.py), only how fast. ``tools/benchmark_train.py``
measures every variant side by side on a device; the defaults per device:

* channels-last: on by default on CUDA, the layout the trainer has always used there (not yet
  measured against NCHW by the benchmark on a GPU); off on the CPU, where it was 1-2% faster for
  V1 and V2, within the noise (``CHANNELS_LAST_DEFAULT``).
* compile: off by default. On a 2-core AVX2 CPU the compiled step of BiSeNetV2 was 21% slower
  than eager, after 3 minutes of compiling (README, Training).

The model that checkpoints save is never the compiled wrapper: ``torch.compile`` returns a new
module whose state-dict keys carry an ``_orig_mod.`` prefix, so only the module *called* for the
training step is compiled and checkpoints keep the plain keys.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from lib.layers import at_least_float32

# Device type -> whether channels-last is the default memory format of the training step.
# Measured with tools/benchmark_train.py (see README, Training): on the CPU the channels-last
# step was not clearly faster than the contiguous one (1-2% for V1 and V2).
CHANNELS_LAST_DEFAULT = {"cuda": True, "cpu": False}


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """``--channels-last`` / ``--no-channels-last`` if given, else the device's measured default."""
    if requested is not None:
        return requested
    return CHANNELS_LAST_DEFAULT.get(device.type, False)


def to_memory_format(tensor_or_model, channels_last: bool):
    """A model's weights or a 4-d batch in channels-last layout (unchanged when not asked)."""
    if not channels_last:
        return tensor_or_model
    if isinstance(tensor_or_model, nn.Module):
        return tensor_or_model.to(memory_format=torch.channels_last)
    return tensor_or_model.contiguous(memory_format=torch.channels_last)


def compile_for_training(net: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile`` of the module called for training steps (the DDP wrapper when there is
    one, so that DDP's graph splitting at bucket boundaries applies).

    Compilation happens lazily at the first call. Random ops (BiSeNetV2's dropout) draw their
    masks in another order than eager mode, from the same seeded generator: a compiled run is
    reproducible (and resumes exactly), but its dropout masks are not eager's.
    """
    return torch.compile(net, mode=None if mode == "default" else mode)


def without_dropout(model: nn.Module) -> nn.Module:
    """``model`` with every dropout replaced by the identity, in place.

    For comparisons of execution variants only: dropout masks are drawn in memory order, so a
    channels-last or compiled model draws other masks than the eager contiguous one, and the
    losses would differ by far more than float rounding for that reason alone.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout | nn.Dropout2d):
                setattr(parent, name, nn.Identity())
    return model


def step_losses(net: nn.Module, criterion: nn.Module, images: torch.Tensor,
                labels: torch.Tensor, aux_weight: float,
                autocast: AbstractContextManager | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the per-output losses (main output first, then auxiliary heads).

    The images are cast to the network's parameter dtype: a no-op for the float32 models of
    training runs; a model built in float64 (the 1-vs-2-process test) gets float64 batches.
    ``autocast`` wraps the network only; the loss is computed in float32 (float64 for a float64
    model).
    """
    images = images.to(next(net.parameters()).dtype)
    with autocast or nullcontext():
        outputs = net(images)
    losses = torch.stack([criterion(at_least_float32(out), labels) for out in outputs])
    return losses[0] + aux_weight * losses[1:].sum(), losses


__all__ = ["CHANNELS_LAST_DEFAULT", "use_channels_last", "to_memory_format",
           "compile_for_training", "without_dropout", "step_losses"]
