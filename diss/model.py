"""BiSeNet (V1) without the spatial path: the "diss" variant.

What changes: the spatial path (three stride-2 convolutions on the image) is removed. The feature
fusion module instead receives the ResNet-18 ``layer2`` output ("res3b1" in Caffe naming), which
already has the same resolution (1/8) and width (128 channels) as the spatial-path feature. The
fusion module therefore keeps its 256-channel input, and the state dict is exactly BiSeNetV1's
minus the ``sp.*`` keys.

Why: the argument is that the bilateral structure is not what makes BiSeNet accurate. A 1/8
feature for spatial detail is available for free inside the backbone, as encoder-decoder models
such as DeepLabv3+ already exploit; the accuracy comes mostly from the training and evaluation
recipe (OHEM loss, warm-up, larger head learning rate, multi-scale training and evaluation).
Reusing the backbone feature reached the same Cityscapes mIoU as the full model while training
faster and using less memory, since the extra full-resolution convolutions are gone.

All blocks come from :mod:`bisenetv1.model`; only the wiring differs.
"""

from __future__ import annotations

import torch
from torch import nn

from bisenetv1.model import ContextPath, FeatureFusion, OutputHead, init_bisenet_weights

__all__ = ["BiSeNetDiss"]


class BiSeNetDiss(nn.Module):
    """BiSeNetV1 whose fusion module takes the backbone's 1/8 feature instead of a spatial path.

    Args:
        n_classes: number of output classes.
        aux_heads: build the two auxiliary heads on the context path (training only).

    ``model.train()``: returns ``(out, out16, out32)`` (only ``(out,)`` without auxiliary heads);
    ``model.eval()``: returns the main logits, all at the input resolution.
    """

    model_name = "diss"
    output_names: tuple[str, ...] = ("out", "out16", "out32")

    def __init__(self, n_classes: int = 19, aux_heads: bool = True) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes = n_classes
        self.aux_heads = aux_heads
        self.cp = ContextPath()
        # ResNet layer2 (128 ch) + context 1/8 (128 ch): same 256 input channels as BiSeNetV1
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, n_classes)
        if aux_heads:
            self.conv_out16 = OutputHead(128, 64, n_classes)
            self.conv_out32 = OutputHead(128, 64, n_classes)
        else:
            self.output_names = ("out",)
        init_bisenet_weights(self)

    def head_modules(self) -> list[nn.Module]:
        """Fusion module and output heads: the layers trained with a larger learning rate."""
        heads = [self.ffm, self.conv_out]
        if self.aux_heads:
            heads += [self.conv_out16, self.conv_out32]
        return heads

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        size = x.shape[-2:]
        backbone8, context8, context16 = self.cp(x)
        out = self.conv_out(self.ffm(backbone8, context8), size)
        if not self.training:
            return out
        if not self.aux_heads:
            return (out,)
        return out, self.conv_out16(context8, size), self.conv_out32(context16, size)
