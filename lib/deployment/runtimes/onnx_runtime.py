"""ONNX Runtime on the CPU, running the exported ONNX graph (fp32, or an int8 QDQ graph)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.deployment.runtimes.base import Runtime, threads


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    package = "onnxruntime"

    def __init__(self, onnx_path: str | Path, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.check(self.device)
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        options.log_severity_level = 3  # warnings about unused initialisers are not ours
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])

    def extra_repr(self) -> str:
        return f"path={self.path.name}, threads={threads()}"
