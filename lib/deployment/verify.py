"""Checking an exported file against the eager model it came from, right after writing it.

The file is run by its own runtime (ONNX Runtime, OpenVINO, AOTInductor) on inputs of another
batch size and of sizes that are not multiples of 32, and compared with the eager eval-mode
model: logits within ``MAX_RELATIVE_DIFF`` of their range and the arg-max equal on at least
``MIN_AGREEMENT`` of the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.deployment.runtimes.onnx_runtime import OnnxRuntime
from lib.deployment.runtimes.openvino_runtime import OpenVinoRuntime

MAX_RELATIVE_DIFF = 1e-4
MIN_AGREEMENT = 0.999
CHECK_SHAPES = ((2, 3, 67, 131), (1, 3, 75, 141))  # another batch, sizes not multiples of 32


@dataclass
class Check:
    shape: tuple[int, ...]
    relative_diff: float | None  # None for --argmax graphs (labels only)
    agreement: float

    @property
    def ok(self) -> bool:
        close = self.relative_diff is None or self.relative_diff <= MAX_RELATIVE_DIFF
        return close and self.agreement >= MIN_AGREEMENT

    def __str__(self) -> str:
        diff = "" if self.relative_diff is None else f"max diff {self.relative_diff:.2e} " \
                                                      "of the logits' range, "
        return (f"{'x'.join(map(str, self.shape))}: {diff}arg-max equal on "
                f"{100 * self.agreement:.3f}% of pixels")


def loader(fmt: str, path: Path, device: torch.device | str = "cpu"
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The written file, loaded by its runtime (which imports its own package)."""
    if fmt == "onnx":
        return OnnxRuntime(path)
    if fmt == "openvino":
        return OpenVinoRuntime(path)
    package = torch._inductor.aoti_load_package(str(path))

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # a CUDA package takes and returns CUDA tensors
            return package(images.to(device)).to(images.device)
    return run


def verify(model: nn.Module, fmt: str, path: Path, argmax: bool,
           device: torch.device | str = "cpu") -> list[Check]:
    """Run the exported file (on ``device``: pt2) against the eager eval-mode ``model`` on the
    CPU at ``CHECK_SHAPES``."""
    run = loader(fmt, path, device)
    model = getattr(model, "module", model).cpu().eval()
    checks = []
    for shape in CHECK_SHAPES:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            want = model(x).numpy()
        got = run(x).cpu().numpy()
        if argmax:
            checks.append(Check(shape, None, float((got == want.argmax(1)).mean())))
            continue
        if got.shape != want.shape:
            raise RuntimeError(f"{path} returned shape {got.shape} for input {shape}; "
                               f"expected {want.shape}")
        relative = float(np.abs(got - want).max() / np.abs(want).max())
        checks.append(Check(shape, relative, float((got.argmax(1) == want.argmax(1)).mean())))
    return checks
