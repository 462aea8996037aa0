"""Divergence: a non-finite loss or weights, or an fp16 GradScaler that keeps skipping steps.

The checks read sums accumulated on the device at logging and checkpoint times only, so they add
no host-device synchronisation per iteration; the verdict is all-reduced so every rank stops at
the same iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lib.common import distributed

if TYPE_CHECKING:
    from lib.training.state import RunState

# After this many consecutive steps skipped by the GradScaler, the run is not recovering by itself.
MAX_SKIPPED_STEPS = 100



# A GradScaler scale below the smallest normal fp16 number: the gradients overflow fp16 even when
# shrunk 16384 times, which no healthy run does.
MIN_SCALE = 2.0**-14



class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite, or the fp16 GradScaler keeps skipping."""



def weights_finite(model: nn.Module) -> bool:
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())



def diverged(state: RunState, reason: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged at iteration {state.iteration}: {reason}; last good checkpoint: "
        f"{state.last_checkpoint or 'none written yet'}. Check the labels "
        "(tools/check_dataset.py) or lower --lr"
    )



def count_skipped_steps(run: torch.Tensor, longest: torch.Tensor, scale_before: torch.Tensor,
                        scale_after: torch.Tensor) -> None:
    """Update, on the device, the current and the longest run of steps the GradScaler skipped.

    The scaler lowers its scale exactly when it skips a step (inf/NaN gradients); comparing the
    scale tensors needs no host-device synchronisation.
    """
    skipped = (scale_after < scale_before).to(run.dtype)
    run.add_(1).mul_(skipped)
    torch.maximum(longest, run, out=longest)



def fp16_divergence(longest_skipped: int, scale: float) -> str | None:
    """Why the GradScaler's history means the run diverged, or None if it is healthy."""
    if longest_skipped >= MAX_SKIPPED_STEPS:
        return (f"{longest_skipped} optimizer steps in a row skipped by the fp16 GradScaler "
                "(non-finite gradients)")
    if scale < MIN_SCALE:
        return (f"the fp16 GradScaler's scale collapsed to {scale:.3g} (gradients overflow fp16 "
                "even scaled down)")
    return None



def check_divergence(state: RunState, sums: torch.Tensor, count: int, names: Sequence[str],
                      skip_longest: torch.Tensor) -> None:
    """Raise TrainingDiverged on a non-finite loss or a GradScaler that keeps skipping steps.

    Called at logging and checkpoint times only: reading the sums synchronises with the device.
    The verdict is all-reduced so that every rank stops together.
    """
    bad = (~torch.isfinite(sums)).any().to(sums.dtype)[None]
    distributed.all_reduce_sum(bad)
    if bad.item():
        means = (sums / max(count, 1)).tolist()
        heads = dict(zip(names, [f"{v:.4g}" for v in means[1:]], strict=True))
        raise diverged(state, f"loss is {means[0]} (mean of the last {count} iterations, per "
                              f"head: {heads})")
    if state.scaler.is_enabled():
        reason = fp16_divergence(int(skip_longest.item()), state.scaler.get_scale())
        if reason is not None:
            raise diverged(state, reason)



