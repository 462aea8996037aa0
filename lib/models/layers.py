"""Building blocks shared by several models of this repository."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is in a lower precision (fp16/bf16 under autocast), else
    unchanged: float64 stays float64 (models built in float64, e.g. for exact comparisons)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class ConvBNReLU(nn.Module):
    """``Conv2d -> BatchNorm2d -> ReLU``, the basic unit of both BiSeNet papers.

    ``padding=None`` keeps the spatial size for stride 1 (``kernel_size // 2``). The convolution has
    no bias by default because the batch norm right after it has its own shift.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2
        self.conv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``x`` to the spatial ``size`` of another tensor (or of the input image).

    The published models upsample with fixed factors (x2, x4, x8 ...), which only lines up with the
    other feature map when the input is a multiple of 32. Resizing to the actual target size gives
    identical results in that case and keeps every other input size working.
    ``mode`` is ``"nearest"`` or ``"bilinear"`` (the latter with ``align_corners=False``).
    """
    size = tuple(size[-2:])
    # (a traced graph must not bake in the shortcut: the sizes differ for other inputs)
    if not torch.jit.is_tracing() and tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    raise ValueError(f"unsupported resize mode {mode!r}; use 'nearest' or 'bilinear'")


def global_average(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial dimensions, kept as an ``[N, C, 1, 1]`` map."""
    return torch.mean(x, dim=(2, 3), keepdim=True)
