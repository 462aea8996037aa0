"""How the training step is executed: memory format, ``torch.compile``, cuDNN autotuning.

None of these options changes what is computed (the losses equal those of the eager, contiguous
fp32 step to float rounding; tests/test_step.py, tests/test_cuda_step.py), only how fast.
``tools/benchmark_train.py`` measures every variant side by side on a device. The defaults per
device (``STEP_DEFAULTS``), each overridden by its option:

* CUDA, from the first measurement on a GPU (one H200, torch 2.11, BiSeNetV2, batch 16 at
  512x1024, ``tools/benchmark_train.py --device cuda``): eager fp32 0.167 s/step,
  channels-last 0.154, fp16 autocast 0.148, compiled (fp32) 0.118 after 87 s of compiling.
  So channels-last is on, ``torch.compile`` is on for runs with at least
  ``COMPILE_MIN_ITERATIONS`` iterations to go (the 87 s are repaid after about 1,800
  iterations at 0.05 s saved each; shorter runs stay eager) and without synchronised
  BatchNorm (``use_compile``), and ``cudnn.benchmark`` is on:
  training crops have one fixed size, so cuDNN's autotuning runs once per shape and picks the
  fastest convolution algorithms. fp16 (``--fp16``) stays a choice of the recipe: it changes the
  numbers, not only the speed.
* CPU: channels-last off (1-2% faster for V1 and V2, within the noise), compile off (on a 2-core
  AVX2 CPU the compiled BiSeNetV2 step was 21% slower after 3 minutes of compiling; README,
  Training), no cuDNN.

The model that checkpoints save is never the compiled wrapper: ``torch.compile`` returns a new
module whose state-dict keys carry an ``_orig_mod.`` prefix, so only the module *called* for the
training step is compiled and checkpoints keep the plain keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from lib.training.loss import OhemCrossEntropy


@dataclass(frozen=True)
class StepDefaults:
    """What the training step uses on a device type when no option says otherwise."""

    channels_last: bool
    compile: bool
    cudnn_benchmark: bool


# Device type -> defaults, from tools/benchmark_train.py measurements (module docstring).
STEP_DEFAULTS = {
    "cuda": StepDefaults(channels_last=True, compile=True, cudnn_benchmark=True),
    "cpu": StepDefaults(channels_last=False, compile=False, cudnn_benchmark=False),
}
_NO_DEFAULTS = StepDefaults(channels_last=False, compile=False, cudnn_benchmark=False)
# Default compilation only for runs this long: compiling costs 1.5 minutes on an H200 and saves
# 0.05 s per BiSeNetV2 step, repaid after about 1,800 iterations.
COMPILE_MIN_ITERATIONS = 5000


def step_defaults(device: torch.device) -> StepDefaults:
    return STEP_DEFAULTS.get(device.type, _NO_DEFAULTS)


def use_channels_last(requested: bool | None, device: torch.device) -> bool:
    """``--channels-last`` / ``--no-channels-last`` if given, else the device's measured default."""
    if requested is not None:
        return requested
    return step_defaults(device).channels_last


def use_compile(requested: bool | None, device: torch.device, iterations_left: int,
                sync_bn: bool = False) -> bool:
    """``--compile`` / ``--no-compile`` if given, else the device's default for a run with
    ``iterations_left`` iterations to go (compilation must have time to pay for itself).

    Not by default with synchronised BatchNorm (several processes): ``torch.compile`` breaks the
    graph at every ``nn.SyncBatchNorm`` (pytorch/pytorch#161302), and the 1.4x was measured
    without it (one GPU); ``--compile`` still compiles such a run.
    """
    if requested is not None:
        return requested
    return (step_defaults(device).compile and not sync_bn
            and iterations_left >= COMPILE_MIN_ITERATIONS)


def set_backend_defaults(device: torch.device) -> bool:
    """Switch on cuDNN's autotuning where it is the device's default (CUDA: training crops have
    a fixed size, so each convolution is tuned once); returns whether it is on."""
    if step_defaults(device).cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return device.type == "cuda" and torch.backends.cudnn.benchmark


@contextmanager
def without_cudnn_autotuning() -> Iterator[None]:
    """cuDNN autotuning off for a while: evaluation feeds images of many sizes (scales, ADE20K's
    aspect ratios), and each new size would be tuned again."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def describe_step(device: torch.device, channels_last: bool, compiled: bool,
                  fp16: bool) -> str:
    """One log line naming how the training step runs."""
    precision = ("fp16 autocast + GradScaler" if device.type == "cuda" else "bf16 autocast") \
        if fp16 else "fp32"
    parts = [precision, "channels-last" if channels_last else "contiguous (NCHW)",
             "torch.compile" if compiled else "eager"]
    if device.type == "cuda":
        parts.append(f"cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}")
    return "training step on " + device.type + ": " + ", ".join(parts)


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


def step_losses(net: nn.Module, criterion: OhemCrossEntropy, images: torch.Tensor,
                labels: torch.Tensor, aux_weight: float,
                autocast: AbstractContextManager | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the per-output losses (main output first, then auxiliary heads).

    ``autocast`` wraps the network only; the loss is computed in float32 (from the fp16/bf16
    logits, without a float32 copy of them).
    """
    # the network's parameter dtype: a no-op for the float32 models of training runs; a model
    # built in float64 (the 1-vs-2-process test) gets float64 batches
    images = images.to(next(net.parameters()).dtype)
    # named ranges for torch.profiler (tools/benchmark_train.py --profile); free otherwise
    with torch.profiler.record_function("forward"), autocast or nullcontext():
        outputs = net(images)
    with torch.profiler.record_function("loss"):
        losses = criterion.output_losses(outputs, labels)
        return losses[0] + aux_weight * losses[1:].sum(), losses


def accumulated_step(net: nn.Module, criterion: OhemCrossEntropy, batches: Iterator,
                     micro_batches: int, aux_weight: float,
                     prepare: Callable[[torch.Tensor, torch.Tensor],
                                       tuple[torch.Tensor, torch.Tensor]],
                     autocast: AbstractContextManager | None = None,
                     scaler: torch.amp.GradScaler | None = None,
                     ddp: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one iteration's ``micro_batches`` batches drawn from ``batches``
    (``--accumulate``); the gradients add up in ``.grad``, the optimizer steps afterwards.

    Each micro-batch's loss is divided by ``micro_batches``, so the summed gradient is that of
    the mean of the micro-batch losses: the large batch's gradient when every micro-batch has
    the same number of pixels in the loss (OHEM keeps its hard pixels per micro-batch, and
    BatchNorm normalises each micro-batch with its own statistics; README, Training).
    ``scaler`` (fp16) scales every micro-batch's loss with the same scale. Under DDP (``ddp``,
    the wrapper) the gradients are all-reduced once, in the last micro-batch's backward.
    ``prepare`` moves a batch to the device. Returns the detached training loss and per-output
    losses, averaged over the micro-batches.
    """
    total = per_output = None
    for index in range(micro_batches):
        images, labels = prepare(*next(batches))
        last = index == micro_batches - 1
        with nullcontext() if ddp is None or last else ddp.no_sync():
            loss, losses = step_losses(net, criterion, images, labels, aux_weight, autocast)
            loss, losses = loss / micro_batches, losses.detach() / micro_batches
            with torch.profiler.record_function("backward"):
                (loss if scaler is None else scaler.scale(loss)).backward()
        total = loss.detach() if total is None else total + loss.detach()
        per_output = losses if per_output is None else per_output + losses
    return total, per_output



def autocast_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on the CPU (fp16 matmuls are slow or missing there)."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["StepDefaults", "STEP_DEFAULTS", "COMPILE_MIN_ITERATIONS", "step_defaults",
           "use_channels_last", "use_compile", "set_backend_defaults", "without_cudnn_autotuning",
           "describe_step", "to_memory_format", "compile_for_training", "without_dropout",
           "step_losses", "accumulated_step", "autocast_context"]
