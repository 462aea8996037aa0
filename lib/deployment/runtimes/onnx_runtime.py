"""ONNX Runtime running the exported ONNX graph (fp32, or an int8 QDQ graph).

On the CPU: ``CPUExecutionProvider``. On CUDA, the providers the installed package has, best
first: ``TensorrtExecutionProvider`` (the ``onnxruntime-gpu`` package with TensorRT installed;
builds an engine per input size on first use), then ``CUDAExecutionProvider``; the plain
``onnxruntime`` package has neither, and the runtime then says so. Inputs and outputs cross the
host-device boundary on every call (no I/O binding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lib.deployment.runtimes.base import Runtime, threads

CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def cuda_providers() -> list[str]:
    """The installed ONNX Runtime's GPU providers, best first (empty without onnxruntime-gpu)."""
    import onnxruntime as ort

    return [p for p in CUDA_PROVIDERS if p in ort.get_available_providers()]


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    package = "onnxruntime"
    devices = ("cpu", "cuda")

    @classmethod
    def unavailable_reason(cls, device: torch.device, precision: str = "fp32") -> str | None:
        reason = super().unavailable_reason(device, precision)
        if reason is None and device.type == "cuda" and not cuda_providers():
            return ("runtime 'onnxruntime' on cuda needs the onnxruntime-gpu package (CUDA or "
                    "TensorRT execution provider); the installed one has neither")
        return reason

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
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            index = {"device_id": self.device.index or 0}
            providers = [(p, index) for p in cuda_providers()] + providers
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.float().cpu().numpy())
        out = torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
        return out.to(self.device)

    def extra_repr(self) -> str:
        return (f"path={self.path.name}, threads={threads()}, "
                f"providers={self.session.get_providers()}")
