"""What every runtime provides: a module mapping a normalised float batch to float32 logits."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import torch
from torch import nn


class RuntimeUnavailable(RuntimeError):
    """The requested runtime cannot run here (package not installed, device not supported)."""


class Runtime(nn.Module):
    """A model's inference form run by one engine.

    ``forward`` takes a normalised float batch [N, 3, H, W] of any size and returns float32
    logits [N, C, H, W] on the batch's device, like the eval-mode model. Subclasses implement
    ``_run``; ``name`` is what ``--runtime`` calls them, ``package`` the pip package they need.
    """

    name: ClassVar[str]
    package: ClassVar[str | None] = None
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.eval()

    @classmethod
    def is_installed(cls) -> bool:
        return cls.package is None or importlib.util.find_spec(cls.package) is not None

    @classmethod
    def unavailable_reason(cls, device: torch.device, precision: str = "fp32") -> str | None:
        """Why this runtime cannot run on ``device`` at ``precision``; None when it can."""
        if not cls.is_installed():
            return (f"runtime {cls.name!r} needs the {cls.package!r} package "
                    f"(pip install {cls.package})")
        if device.type not in cls.devices:
            return f"runtime {cls.name!r} runs on {', '.join(cls.devices)}, not {device.type}"
        if precision not in cls.precisions:
            return (f"runtime {cls.name!r} runs {', '.join(cls.precisions)}, not {precision} "
                    "(use --runtime torch for reduced precision)")
        return None

    @classmethod
    def check(cls, device: torch.device, precision: str = "fp32") -> None:
        reason = cls.unavailable_reason(device, precision)
        if reason is not None:
            raise RuntimeUnavailable(reason)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a [N, 3, H, W] batch, got {tuple(images.shape)}")
        with torch.inference_mode():
            return self._run(images.to(self.device)).to(images.device)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"device={self.device}"


def threads() -> int:
    """Threads every runtime uses: PyTorch's setting (``torch.set_num_threads`` /
    ``OMP_NUM_THREADS``), so that runtimes are compared on equal terms."""
    return torch.get_num_threads()
