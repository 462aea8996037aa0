"""BiSeNetV2 (Yu et al., "BiSeNet V2: Bilateral Network with Guided Aggregation for Real-time
Semantic Segmentation", IJCV 2021).

Two branches read the image: a wide and shallow *detail branch* (1/8 resolution, 128 channels)
and a narrow and deep *semantic branch* (stem block, gather-and-expand layers, context embedding
block; 1/32 resolution). The *bilateral guided aggregation* layer lets each branch gate the other
before a single segmentation head predicts the classes. During training four *booster* heads on
intermediate semantic features add deep supervision; they cost nothing at inference.

Parameter names follow the widely used published checkpoints, so those weights load unchanged.
Where the paper and those weights differ (a few extra ReLUs, batch norm on the pooled vector of the
context embedding block, a ConvBNReLU instead of a plain conv at its end) this follows the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.models.layers import ConvBNReLU, global_average, resize_to
from lib.models.pretrained import load_v2_backbone
from lib.models.registry import ModelVariant, register

__all__ = ["BiSeNetV2"]


def _conv_bn(
    in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """Conv (no bias) + batch norm, as a list so callers can extend the ``nn.Sequential``."""
    padding = kernel_size // 2
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


def _depthwise_separable(channels: int) -> nn.Sequential:
    """Depth-wise 3x3 + BN followed by a point-wise 1x1 (no BN, no activation)."""
    return nn.Sequential(
        *_conv_bn(channels, channels, 3, groups=channels),
        nn.Conv2d(channels, channels, 1, bias=False),
    )


class DetailBranch(nn.Module):
    """Three stages of plain 3x3 ConvBNReLUs, each starting with stride 2 (output 1/8, 128 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.S1 = nn.Sequential(ConvBNReLU(3, 64, 3, stride=2), ConvBNReLU(64, 64))
        self.S2 = nn.Sequential(
            ConvBNReLU(64, 64, 3, stride=2), ConvBNReLU(64, 64), ConvBNReLU(64, 64)
        )
        self.S3 = nn.Sequential(
            ConvBNReLU(64, 128, 3, stride=2), ConvBNReLU(128, 128), ConvBNReLU(128, 128)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.S3(self.S2(self.S1(x)))


class StemBlock(nn.Module):
    """Stem of the semantic branch: 1/4 resolution, 16 channels.

    After a strided conv, a conv path and a max-pool path both halve the size again; their
    concatenation is fused by a 3x3 conv.
    """

    def __init__(self, out_ch: int = 16) -> None:
        super().__init__()
        self.conv = ConvBNReLU(3, out_ch, 3, stride=2)
        self.left = nn.Sequential(
            ConvBNReLU(out_ch, out_ch // 2, 1),
            ConvBNReLU(out_ch // 2, out_ch, 3, stride=2),
        )
        self.right = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.fuse = ConvBNReLU(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fuse(torch.cat([self.left(x), self.right(x)], dim=1))


class GatherExpand(nn.Module):
    """Gather-and-expand layer with stride 1 (identity shortcut).

    3x3 conv gathers, a depth-wise 3x3 expands the channels ``expansion`` times, a 1x1 projects
    back; the sum with the input goes through a ReLU.
    """

    def __init__(self, channels: int, expansion: int = 6) -> None:
        super().__init__()
        mid = channels * expansion
        self.conv1 = ConvBNReLU(channels, channels)
        self.dwconv = nn.Sequential(*_conv_bn(channels, mid, 3, groups=channels), nn.ReLU(True))
        self.conv2 = nn.Sequential(*_conv_bn(mid, channels, 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.dwconv(self.conv1(x))) + x)


class GatherExpandDown(nn.Module):
    """Gather-and-expand layer with stride 2 and a depth-wise separable projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int = 6) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.conv1 = ConvBNReLU(in_ch, in_ch)
        self.dwconv1 = nn.Sequential(*_conv_bn(in_ch, mid, 3, stride=2, groups=in_ch))
        self.dwconv2 = nn.Sequential(*_conv_bn(mid, mid, 3, groups=mid), nn.ReLU(True))
        self.conv2 = nn.Sequential(*_conv_bn(mid, out_ch, 1))
        self.shortcut = nn.Sequential(
            *_conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch), *_conv_bn(in_ch, out_ch, 1)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.conv2(self.dwconv2(self.dwconv1(self.conv1(x))))
        return self.relu(main + self.shortcut(x))


class ContextEmbedding(nn.Module):
    """Context embedding block: the globally pooled feature is added back to every position."""

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv_gap = ConvBNReLU(channels, channels, 1)
        self.conv_last = ConvBNReLU(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.conv_gap(self.bn(global_average(x)))
        return self.conv_last(x + context)  # broadcast over H, W


class SemanticBranch(nn.Module):
    """Semantic branch; returns the features of every stage (the booster heads read them)."""

    def __init__(self) -> None:
        super().__init__()
        self.S1S2 = StemBlock(16)
        self.S3 = nn.Sequential(GatherExpandDown(16, 32), GatherExpand(32))
        self.S4 = nn.Sequential(GatherExpandDown(32, 64), GatherExpand(64))
        self.S5_4 = nn.Sequential(
            GatherExpandDown(64, 128), GatherExpand(128), GatherExpand(128), GatherExpand(128)
        )
        self.S5_5 = ContextEmbedding(128)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s2 = self.S1S2(x)  # 1/4, 16 ch
        s3 = self.S3(s2)  # 1/8, 32 ch
        s4 = self.S4(s3)  # 1/16, 64 ch
        s5_4 = self.S5_4(s4)  # 1/32, 128 ch
        s5_5 = self.S5_5(s5_4)
        return s2, s3, s4, s5_4, s5_5


class BilateralGuidedAggregation(nn.Module):
    """Fuses the 1/8 detail feature and the 1/32 semantic feature with mutual sigmoid gates.

    The detail feature is gated at 1/8 by the upsampled semantic feature, and, after downsampling
    to 1/32, by the semantic feature itself; the second product is upsampled and both are summed.
    Upsampling is nearest-neighbour, as in the published weights.
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.left1 = _depthwise_separable(channels)
        self.left2 = nn.Sequential(
            *_conv_bn(channels, channels, 3, stride=2),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.right1 = nn.Sequential(*_conv_bn(channels, channels, 3))
        self.right2 = _depthwise_separable(channels)
        self.conv = nn.Sequential(*_conv_bn(channels, channels, 3), nn.ReLU(inplace=True))

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        size = detail.shape[-2:]
        detail_keep = self.left1(detail)
        detail_down = self.left2(detail)  # same size as ``semantic``
        semantic_up = resize_to(self.right1(semantic), size, "nearest")
        high = detail_keep * torch.sigmoid(semantic_up)
        low = detail_down * torch.sigmoid(self.right2(semantic))
        return self.conv(high + resize_to(low, size, "nearest"))


class SegmentHead(nn.Module):
    """3x3 ConvBNReLU, dropout, 1x1 classifier; logits are resized bilinearly to the input size.

    A booster head (``booster_ch`` set) first upsamples nearest x2 and applies one more 3x3
    ConvBNReLU to ``booster_ch`` channels before the classifier.
    """

    def __init__(
        self, in_ch: int, mid_ch: int, n_classes: int, booster_ch: int | None = None
    ) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch)
        self.drop = nn.Dropout(0.1)
        if booster_ch is None:
            refine: nn.Module = nn.Identity()
            cls_in = mid_ch
        else:
            refine = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), ConvBNReLU(mid_ch, booster_ch)
            )
            cls_in = booster_ch
        self.conv_out = nn.Sequential(refine, nn.Conv2d(cls_in, n_classes, 1, bias=True))

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        logits = self.conv_out(self.drop(self.conv(x)))
        return resize_to(logits, size, "bilinear")


class BiSeNetV2(nn.Module):
    """BiSeNetV2 for semantic segmentation.

    Args:
        n_classes: number of output classes.
        aux_heads: build the four booster heads (needed for training as in the paper; a model
            without them has the same inference outputs and loads inference-only checkpoints).

    ``model.train()``: returns ``(out, aux2, aux3, aux4, aux5_4)`` (only ``(out,)`` without
    booster heads); ``model.eval()``: returns the main logits. All logits are
    ``[N, n_classes, H, W]`` at the input resolution.
    """

    model_name = "bisenetv2"
    output_names: tuple[str, ...] = ("out", "aux2", "aux3", "aux4", "aux5_4")
    # (name, input channels, output stride) of the semantic-branch stage each booster head reads
    _boosters = (("aux2", 16, 4), ("aux3", 32, 8), ("aux4", 64, 16), ("aux5_4", 128, 32))

    def __init__(self, n_classes: int = 19, aux_heads: bool = True) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes = n_classes
        self.aux_heads = aux_heads
        self.detail = DetailBranch()
        self.segment = SemanticBranch()
        self.bga = BilateralGuidedAggregation(128)
        self.head = SegmentHead(128, 1024, n_classes)
        if aux_heads:
            for name, in_ch, stride in self._boosters:
                # the booster's extra conv has stride**2 channels, as in the published weights
                setattr(self, name, SegmentHead(in_ch, 128, n_classes, booster_ch=stride**2))
        else:
            self.output_names = ("out",)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Residual branches start as zero so each gather-and-expand layer begins as (ReLU of)
        # its shortcut, which eases early training.
        for module in self.segment.modules():
            if isinstance(module, (GatherExpand, GatherExpandDown)):
                nn.init.zeros_(module.conv2[1].weight)

    def head_modules(self) -> list[nn.Module]:
        """The output heads (main and booster), trained with a larger learning rate."""
        if not self.aux_heads:
            return [self.head]
        return [self.head] + [getattr(self, name) for name, _, _ in self._boosters]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        size = x.shape[-2:]
        s2, s3, s4, s5_4, s5_5 = self.segment(x)
        out = self.head(self.bga(self.detail(x), s5_5), size)
        if not self.training:
            return out
        if not self.aux_heads:
            return (out,)
        aux = [self.aux2(s2, size), self.aux3(s3, size), self.aux4(s4, size),
               self.aux5_4(s5_4, size)]
        return (out, *aux)


# state dicts with a detail branch ("detail.*") are BiSeNetV2's (model_final_v2_*.pth)
VARIANT = register(ModelVariant(
    name="bisenetv2", build=BiSeNetV2, key_prefixes=("detail.",),
    classifier_key="head.conv_out.1.weight", aux_prefixes=("aux2.", "aux3.", "aux4.", "aux5_4."),
    load_backbone=load_v2_backbone,
))
