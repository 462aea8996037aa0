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
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from lib.deployment.inference import to_inference_form

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
