"""torch.hub entry points::

    model = torch.hub.load("<clone of this repo>", "bisenetv2", weights="city", source="local")
    model = torch.hub.load("<clone>", "bisenetv1", weights="ade20k", source="local")
    model = torch.hub.load("<clone>", "bisenetv2", weights=None, n_classes=5, source="local")

``weights`` is ``"city"``, ``"coco"`` or ``"ade20k"`` (the published files, taken from the torch
hub cache and downloaded there when missing, as ``--ckpt bisenetv2-city`` does), the path of a
checkpoint, or None for a random initialisation. ``n_classes`` other than the weights'
re-initialises the class layers (as ``--finetune-from`` does). The model comes back in eval mode,
with its auxiliary heads (the published layout); it returns logits at the input resolution for an
RGB image scaled to [0, 1] and normalised with the dataset's mean and std
(``lib.data.datasets.cityscapes.MEAN``/``STD``, ``lib.data.datasets.DATASETS[name].mean``/``std``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lib.models.checkpoint import load_finetune_weights, load_model
from lib.models.published import PUBLISHED
from lib.models.zoo import build_model

dependencies = ["torch", "torchvision", "numpy", "cv2"]


def _model(name: str, weights: str | None, n_classes: int | None) -> nn.Module:
    if weights is None:
        return build_model(name, 19 if n_classes is None else n_classes).eval()
    if Path(weights).is_file():
        source = weights
    else:
        source = f"{name}-{weights}"
        if source not in PUBLISHED:
            choices = sorted(k.split("-", 1)[1] for k in PUBLISHED if k.startswith(f"{name}-"))
            raise ValueError(f"{name}: no published weights {weights!r}; choose one of "
                             f"{', '.join([*choices, 'a checkpoint file', 'None'])}")
    model, meta = load_model(source, model_name=name)
    if n_classes is None or n_classes == meta["n_classes"]:
        return model
    model = build_model(name, n_classes)
    load_finetune_weights(model, source, n_classes)
    return model.eval()


def bisenetv1(weights: str | None = None, n_classes: int | None = None) -> nn.Module:
    """BiSeNetV1 (ResNet-18 context path); ``weights``: "city", "coco", "ade20k", a file or None."""
    return _model("bisenetv1", weights, n_classes)


def bisenetv2(weights: str | None = None, n_classes: int | None = None) -> nn.Module:
    """BiSeNetV2; ``weights``: "city", "coco", "ade20k", a file or None."""
    return _model("bisenetv2", weights, n_classes)


def diss(weights: str | None = None, n_classes: int | None = None) -> nn.Module:
    """BiSeNetV1 without its spatial path (no published weights); ``weights``: a file or None."""
    return _model("diss", weights, n_classes)
