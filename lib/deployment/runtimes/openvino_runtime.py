"""OpenVINO on the CPU, compiling the ONNX graph (or IR) once with dynamic shapes.

``precision`` sets the arithmetic of the float parts: fp32, or bf16 (CPUs with AVX512-BF16 or
AMX). An int8 graph (NNCF's IR or a QDQ ONNX graph) runs its quantised operations in int8
whatever the precision; its float remainder follows ``precision``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.deployment.runtimes.base import Runtime, threads


class OpenVinoRuntime(Runtime):
    name = "openvino"
    package = "openvino"
    precisions = ("fp32", "bf16")

    def __init__(self, model_path: str | Path, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> None:
        super().__init__(device)
        self.check(self.device, precision)
        self.precision = precision
        import openvino as ov

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file for OpenVINO not found: {self.path}")
        core = ov.Core()
        config = {
            # without it OpenVINO runs bf16 on CPUs with AMX/AVX512-BF16: not the same arithmetic
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads(),
        }
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.float().cpu().numpy())
        result = self.request.infer({0: array})
        return torch.from_numpy(np.array(result[self.compiled.output(0)]))

    def extra_repr(self) -> str:
        return f"path={self.path.name}, precision={self.precision}, threads={threads()}"
