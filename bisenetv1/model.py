"""BiSeNet (V1) (Yu et al., "BiSeNet: Bilateral Segmentation Network for Real-time Semantic
Segmentation", ECCV 2018).

A *spatial path* of three strided convolutions keeps a 1/8-resolution feature with fine detail;
a *context path* on an ImageNet ResNet-18 provides a large receptive field. Attention refinement
modules re-weight the 1/16 and 1/32 backbone features, a global-average context vector is added at
1/32, and the context is upsampled back to 1/8 through two 3x3 refinement convs. The *feature
fusion module* merges both paths; two auxiliary heads supervise the context path in training.

Parameter names follow the widely used published checkpoints (the backbone keeps torchvision's
ResNet-18 names under ``cp.resnet``), so those weights load unchanged.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from lib.models.layers import ConvBNReLU, global_average, resize_to
from lib.models.pretrained import load_resnet18_backbone
from lib.models.registry import ModelVariant, register

__all__ = [
    "AttentionRefinement",
    "BiSeNetV1",
    "ContextPath",
    "FeatureFusion",
    "OutputHead",
    "ResNet18Features",
    "SpatialPath",
    "init_bisenet_weights",
]


class ResNet18Features(nn.Module):
    """torchvision's ResNet-18 without the classifier, returning the 1/8, 1/16, 1/32 features.

    The sub-modules are torchvision's own, so their state-dict keys equal those of torchvision's
    ImageNet checkpoints (minus ``fc.*``).
    """

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2 = net.layer1, net.layer2
        self.layer3, self.layer4 = net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)  # "res3b1" in Caffe naming: 128 ch
        feat16 = self.layer3(feat8)  # 256 ch
        feat32 = self.layer4(feat16)  # 512 ch
        return feat8, feat16, feat32


class AttentionRefinement(nn.Module):
    """Attention refinement module: a 3x3 conv, then channel re-weighting by a sigmoid gate
    computed from the globally pooled feature (1x1 conv + BN)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 3)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(global_average(feat))))
        return feat * gate


class ContextPath(nn.Module):
    """ResNet-18 + attention refinement + global context, decoded to 1/16 and 1/8 (128 ch each).

    ``forward`` returns ``(backbone_1/8, context_1/8, context_1/16)``; the first one is the raw
    ResNet ``layer2`` output (used by the variant without spatial path).
    """

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = self.conv_avg(global_average(feat32))
        up32 = self.arm32(feat32) + context  # [N, C, 1, 1] broadcast
        up32 = self.conv_head32(resize_to(up32, feat16.shape, "nearest"))
        up16 = self.arm16(feat16) + up32
        up16 = self.conv_head16(resize_to(up16, feat8.shape, "nearest"))
        return feat8, up16, up32


class SpatialPath(nn.Module):
    """Three stride-2 ConvBNReLUs (7x7, 3x3, 3x3) then a 1x1 to 128 channels: 1/8 resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, 7, stride=2)
        self.conv2 = ConvBNReLU(64, 64, 3, stride=2)
        self.conv3 = ConvBNReLU(64, 64, 3, stride=2)
        self.conv_out = ConvBNReLU(64, 128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv3(self.conv2(self.conv1(x))))


class FeatureFusion(nn.Module):
    """Feature fusion module: concatenation, 1x1 ConvBNReLU, then ``feat + feat * gate`` with a
    channel gate from the pooled feature (1x1 conv + BN + sigmoid, as in the published weights;
    the paper draws a two-layer bottleneck here)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, 1)
        self.conv = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([low, high], dim=1))
        gate = torch.sigmoid(self.bn(self.conv(global_average(feat))))
        return feat + feat * gate


class OutputHead(nn.Module):
    """3x3 ConvBNReLU + 1x1 classifier (with bias); logits resized bilinearly to ``size``."""

    def __init__(self, in_ch: int, mid_ch: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch, 3)
        self.conv_out = nn.Conv2d(mid_ch, n_classes, 1, bias=True)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return resize_to(self.conv_out(self.conv(x)), size, "bilinear")


def init_bisenet_weights(model: nn.Module) -> None:
    """Initialise every conv outside the ImageNet backbone with unit-gain Kaiming normal (zero
    bias); the backbone keeps torchvision's initialisation until pretrained weights arrive."""
    backbone = set(model.cp.resnet.modules())
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module not in backbone:
            nn.init.kaiming_normal_(module.weight, a=1)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class BiSeNetV1(nn.Module):
    """BiSeNet (V1) with a ResNet-18 context path.

    Args:
        n_classes: number of output classes.
        aux_heads: build the two auxiliary heads on the context path (training only).
        spatial_path: build the spatial path (False gives the "diss" variant).

    ``model.train()``: returns ``(out, out16, out32)`` (only ``(out,)`` without auxiliary heads);
    ``model.eval()``: returns the main logits. All logits are ``[N, n_classes, H, W]`` at the
    input resolution.
    """

    model_name = "bisenetv1"
    output_names: tuple[str, ...] = ("out", "out16", "out32")

    def __init__(self, n_classes: int = 19, aux_heads: bool = True,
                 spatial_path: bool = True) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes = n_classes
        self.aux_heads = aux_heads
        self.cp = ContextPath()
        # Without a spatial path (the "diss" variant) the fusion module takes the ResNet's own
        # 1/8 feature, which has the same 128 channels: the fusion input stays 256 wide.
        self.sp = SpatialPath() if spatial_path else None
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
        detail = self.sp(x) if self.sp is not None else backbone8
        out = self.conv_out(self.ffm(detail, context8), size)
        if not self.training:
            return out
        if not self.aux_heads:
            return (out,)
        return out, self.conv_out16(context8, size), self.conv_out32(context16, size)


# BiSeNetV1's published ADE20K and COCO-Stuff weights were trained and scored at 512, not at the
# datasets' 640
PUBLISHED_PROTOCOL = {"ade20k": {"eval_short_side": 512, "eval_crop_size": (512, 512)},
                      "coco-stuff": {"eval_crop_size": (512, 512)}}

# state dicts with a spatial path ("sp.*") are BiSeNetV1's (model_final_v1_*.pth)
VARIANT = register(ModelVariant(
    name="bisenetv1", build=BiSeNetV1, key_prefixes=("sp.",),
    classifier_key="conv_out.conv_out.weight", aux_prefixes=("conv_out16.", "conv_out32."),
    load_backbone=load_resnet18_backbone, eval_protocol=PUBLISHED_PROTOCOL,
))
