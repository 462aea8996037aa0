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

The network is :class:`bisenetv1.model.BiSeNetV1` built without its spatial path.
"""

from __future__ import annotations

from bisenetv1.model import PUBLISHED_PROTOCOL, BiSeNetV1
from lib.models.pretrained import load_resnet18_backbone
from lib.models.registry import ModelVariant, register

__all__ = ["BiSeNetDiss"]


class BiSeNetDiss(BiSeNetV1):
    """BiSeNetV1 whose fusion module takes the backbone's 1/8 feature instead of a spatial path.

    Args:
        n_classes: number of output classes.
        aux_heads: build the two auxiliary heads on the context path (training only).

    ``model.train()``: returns ``(out, out16, out32)`` (only ``(out,)`` without auxiliary heads);
    ``model.eval()``: returns the main logits, all at the input resolution.
    """

    model_name = "diss"

    def __init__(self, n_classes: int = 19, aux_heads: bool = True) -> None:
        super().__init__(n_classes, aux_heads, spatial_path=False)


# a context path ("cp.*") without a spatial path ("sp.*")
VARIANT = register(ModelVariant(
    name="diss", build=BiSeNetDiss, key_prefixes=("cp.",), absent_prefixes=("sp.",),
    classifier_key="conv_out.conv_out.weight", aux_prefixes=("conv_out16.", "conv_out32."),
    load_backbone=load_resnet18_backbone, eval_protocol=PUBLISHED_PROTOCOL,  # V1's recipes
))
