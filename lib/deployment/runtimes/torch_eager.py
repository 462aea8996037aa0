"""PyTorch eager: the inference form (BatchNorm folded, channels-last) under ``inference_mode``."""

from __future__ import annotations

import torch
from torch import nn

from lib.deployment.inference import autocast_for, to_inference_form
from lib.deployment.runtimes.base import Runtime


class TorchRuntime(Runtime):
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu",
                 precision: str = "fp32") -> None:
        super().__init__(device)
        autocast_for(self.device, precision)  # validates the precision for the device
        self.precision = precision
        self.model = to_inference_form(model).to(self.device)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.device, self.precision):
            return self.model(images).float()

    def extra_repr(self) -> str:
        return f"device={self.device}, precision={self.precision}"
