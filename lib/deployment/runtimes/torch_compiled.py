"""``torch.compile`` of the inference form: Inductor's fused kernels, per input size.

The graph is compiled for fixed sizes (``dynamic=False``; a new size compiles again, once), which
is what a camera stream or a fixed evaluation size gives. Modes:

* CUDA: ``max-autotune`` (default): Inductor benchmarks its Triton/cuBLAS/cuDNN choices for each
  convolution and matrix product, and replays the whole forward pass as one CUDA graph (no
  per-kernel launch cost, which dominates a network this small). Compiling takes minutes the
  first time; ``reduce-overhead`` (CUDA graphs, no autotuning) takes seconds.
* CPU: ``default``: fused C++/OpenMP kernels for the element-wise work around oneDNN's
  convolutions.

The first call at each size compiles (not timed by ``auto``: its warm-up run absorbs it).
"""

from __future__ import annotations

import torch
from torch import nn

from lib.deployment.runtimes.torch_eager import TorchRuntime


def default_mode(device: torch.device) -> str:
    return "max-autotune" if device.type == "cuda" else "default"


class TorchCompiledRuntime(TorchRuntime):
    name = "torch-compile"

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu",
                 precision: str = "fp32", mode: str | None = None) -> None:
        super().__init__(model, device, precision)
        self.mode = mode or default_mode(self.device)
        self.compiled = torch.compile(self._forward, mode=self.mode, dynamic=False)
        # CUDA graphs reuse their output buffers on the next replay: hand out copies
        self.graphed = self.device.type == "cuda" and self.mode in ("max-autotune",
                                                                    "reduce-overhead")

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(images).clone()
        return self.compiled(images)

    def extra_repr(self) -> str:
        return f"device={self.device}, precision={self.precision}, mode={self.mode}"
