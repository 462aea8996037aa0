"""Deployable graphs of a model's inference form: ONNX, OpenVINO IR and AOTInductor (.pt2).

Every graph takes ``images`` (float32 [N, 3, H, W], normalised with the checkpoint's mean/std) and
returns ``logits`` (float32 [N, C, H, W]) or, with ``argmax``, ``labels`` (int64 [N, H, W]).
Batch, height and width are dynamic: any size, not only multiples of 32.

All three start from ``torch.export`` (the ONNX exporter of PyTorch 2.5+ uses it too), so no
TorchScript is involved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from lib.deploy import to_inference_form

FORMATS = ("onnx", "openvino", "pt2")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "pt2": ".pt2"}


class WithArgmax(nn.Module):
    """``model`` followed by the arg-max over classes: the graph outputs labels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).argmax(1)


def exportable(model: nn.Module, argmax: bool = False) -> nn.Module:
    """The inference form on the CPU, NCHW (graphs choose their own layout), optionally with
    the arg-max appended."""
    module = to_inference_form(model, channels_last=False).cpu()
    return (WithArgmax(module) if argmax else module).eval()


def export_program(model: nn.Module, argmax: bool = False, size: tuple[int, int] = (64, 128),
                   device: torch.device | str = "cpu") -> torch.export.ExportedProgram:
    """``torch.export`` of the inference form with dynamic batch, height and width, traced on
    ``device`` (what an AOTInductor package is compiled for)."""
    module = exportable(model, argmax).to(device)
    example = torch.randn(2, 3, *size, device=device)
    dynamic = ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic)


@contextlib.contextmanager
def _quiet():
    """The exporters print and log progress lines; keep the tools' output to what they report."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | Path, argmax: bool = False,
                size: tuple[int, int] = (64, 128), opset: int = 18) -> Path:
    """Write the ONNX graph (opset ``opset``) to ``path``; needs the ``onnxscript`` package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, argmax, size)
    output = "labels" if argmax else "logits"
    with _quiet():
        onnx_program = torch.onnx.export(program, input_names=["images"], output_names=[output],
                                         opset_version=opset, dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return path


def export_openvino(model: nn.Module, path: str | Path, argmax: bool = False,
                    size: tuple[int, int] = (64, 128)) -> Path:
    """Write OpenVINO IR (``path`` = ``.xml``, weights next to it in ``.bin``), converted from
    the ONNX graph; needs the ``openvino`` package."""
    import openvino as ov

    path = Path(path)
    onnx_path = path.with_name(path.stem + ".tmp.onnx")
    try:
        export_onnx(model, onnx_path, argmax, size)
        ov.save_model(ov.convert_model(str(onnx_path)), str(path))
    finally:
        for leftover in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
            if leftover.exists():
                os.unlink(leftover)
    return path


def export_pt2(model: nn.Module, path: str | Path, argmax: bool = False,
               size: tuple[int, int] = (64, 128), device: torch.device | str = "cpu") -> Path:
    """Write an AOTInductor package: compiled C++ for this machine's CPU, or CUDA kernels with
    ``device="cuda"`` (the package then takes and returns CUDA tensors), loadable with
    ``torch._inductor.aoti_load_package(path)`` and nothing of this repository."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, argmax, size, device)
    with _quiet():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


EXPORTERS = {"onnx": export_onnx, "openvino": export_openvino, "pt2": export_pt2}


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
    """The written file, loaded by its runtime (imported here: each needs its own package)."""
    if fmt == "onnx":
        from lib.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path)
    if fmt == "openvino":
        from lib.runtimes.openvino_runtime import OpenVinoRuntime

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
