"""PyTorch eager: the inference form (BatchNorm folded, channels-last) under ``inference_mode``.

On CUDA, fp16 and bf16 run the weights and activations in that type (not autocast, which
re-casts every weight on every call and leaves the resizes in fp32), and cuDNN autotunes its
convolution algorithms for the input size (``torch.backends.cudnn.benchmark``): without it
cuDNN's heuristic picks slow kernels for BiSeNetV2's depth-wise convolutions in fp16. On the CPU
bf16 runs under autocast (oneDNN's bf16 kernels where the CPU has native bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from lib.deployment.inference import autocast_for, to_inference_form
from lib.deployment.runtimes.base import Runtime

HALF_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (None where it cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 products natively (AVX512-BF16 or AMX-BF16): only there does bf16
    pay; elsewhere oneDNN emulates it, slower than fp32."""
    flags = cpu_flags()
    if flags is None:  # not Linux: ask oneDNN
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot_product() -> bool:
    """The CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8), which sum
    uint8 x int8 products exactly in int32; without them (AVX2) pairs of products are summed in
    int16 with saturation. Unknown (not Linux): assumed present."""
    flags = cpu_flags()
    return flags is None or bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


class TorchRuntime(Runtime):
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")

    @classmethod
    def unavailable_reason(cls, device: torch.device, precision: str = "fp32") -> str | None:
        if precision == "fp16" and device.type != "cuda":
            return f"runtime {cls.name!r} runs fp16 on CUDA only; use bf16 on the CPU"
        return super().unavailable_reason(device, precision)

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> None:
        super().__init__(device)
        autocast_for(self.device, precision)  # validates the precision for the device
        self.precision = precision
        self.model = to_inference_form(model).to(self.device)
        # CUDA reduced precision: the whole network in that type; the CPU keeps autocast
        self.dtype = HALF_TYPES.get(precision) if self.device.type == "cuda" else None
        if self.dtype is not None:
            self.model = self.model.to(self.dtype)
        if self.device.type == "cuda":
            # inputs keep one size per stream: autotuning once per size pays from the 2nd frame
            torch.backends.cudnn.benchmark = True

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            return self.model(images.to(self.dtype)).float()
        with autocast_for(self.device, self.precision):
            return self.model(images).float()

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)

    def extra_repr(self) -> str:
        return f"device={self.device}, precision={self.precision}"
