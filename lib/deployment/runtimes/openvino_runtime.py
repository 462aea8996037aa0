"""OpenVINO on the CPU, compiling the ONNX graph (or IR) once with dynamic shapes, in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.deployment.runtimes.base import Runtime, threads


class OpenVinoRuntime(Runtime):
    name = "openvino"
    package = "openvino"

    def __init__(self, model_path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.check(self.device)
        import openvino as ov

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file for OpenVINO not found: {self.path}")
        core = ov.Core()
        config = {
            # without it OpenVINO runs bf16 on CPUs with AMX/AVX512-BF16: not the same arithmetic
            "INFERENCE_PRECISION_HINT": "f32",
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
        return f"path={self.path.name}, threads={threads()}"
