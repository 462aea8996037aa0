"""Synchronised BatchNorm for CPU processes (gloo), where ``nn.SyncBatchNorm`` needs CUDA.

With several processes, a plain ``BatchNorm2d`` normalises each process's share of the batch with
that share's statistics, so 2 processes with 2 images each do not compute what 1 process with 4
images computes. :class:`SyncBatchNorm2d` all-reduces the per-channel sum, sum of squares and
count over the process group, normalises with the global mean and biased variance, and updates
the running statistics with the global ones (unbiased variance), exactly like ``BatchNorm2d`` on
the whole batch. The reduction is differentiable: gradients flow back to every process's input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lib.models.layers import at_least_float32


class _AllReduceSum(torch.autograd.Function):
    """Sum over the default process group; the gradient of a sum is the sum of the gradients.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the batch of all processes.

    Evaluation with running statistics and a single process use the plain ``BatchNorm2d``
    forward. Every process must call the forward the same number of
    times in the same order (as with ``nn.SyncBatchNorm``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or _world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        # statistics in float32 also under bf16 autocast, like BatchNorm2d (float64 stays float64)
        xf = at_least_float32(x)
        dims = (0, 2, 3)
        # float64 accumulation: var = E[x^2] - mean^2 loses precision in float32 sums
        local = torch.cat([
            xf.sum(dims, dtype=torch.float64),
            (xf * xf).sum(dims, dtype=torch.float64),
            torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device),
        ])
        total = _AllReduceSum.apply(local)
        count = int(total[-1].item())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {tuple(x.shape)} ({count} value(s) over all processes)")
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        invstd = torch.rsqrt(var + self.eps).to(xf.dtype)
        out = (xf - mean.to(xf.dtype)[None, :, None, None]) * invstd[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # BatchNorm2d's rule: momentum, or a cumulative average when momentum is None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SyncBatchNorm2d`.

    The new modules take over the same parameter and buffer tensors, so the state-dict keys and
    values are unchanged. Returns the converted module (a new one when ``module`` itself is a
    ``BatchNorm2d``).
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        converted = SyncBatchNorm2d(module.num_features, module.eps, module.momentum,
                                    module.affine, module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
        return converted
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]
