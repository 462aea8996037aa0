"""Single-image inference helpers shared by training (example prediction), demo and tools."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from lib.evaluator import EvalOptions, predict_scores
from lib.transforms import to_tensor
from lib.visualize import prediction_panel, write_rgb


def normalise(image_rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xHxW float tensor normalised with ``mean``/``std`` of [0, 1] images."""
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image_rgb.dtype} "
                         f"{image_rgb.shape}")
    return to_tensor(image_rgb, mean, std).unsqueeze(0)  # the evaluation transform's maths


@torch.inference_mode()
def predict_labels(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Arg-max class map [N, H, W] of a normalised batch, at the batch's resolution."""
    was_training = model.training
    model.eval()
    logits = model(images)
    model.train(was_training)
    return logits.argmax(1)


def tiling_options(tile: Sequence[int], overlap: float = 1 / 3, flip: bool = False
                   ) -> EvalOptions:
    """Sliding-window inference as the evaluator's crop modes compute it at scale 1: ``ssc``
    (tiles of ``tile`` = (height, width), neighbours sharing ``overlap`` of a tile: the crop
    stride is ``1 - overlap``; summed softmax scores; centred zero padding of smaller images),
    or with ``flip`` the single-scale term of ``mscf`` (each tile also mirrored)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"the tile overlap must be in [0, 1), got {overlap}")
    return EvalOptions(modes=("mscf",) if flip else ("ssc",), scales=(1.0,),
                       crop_size=tuple(tile), crop_stride=1 - overlap, flip=flip)


def tiled_scores(model: nn.Module, image: torch.Tensor, options: EvalOptions,
                 n_classes: int) -> torch.Tensor:
    """Summed tile scores [1, C, H, W] of a normalised image [1, 3, H, W] (see
    :func:`tiling_options`); the arg-max over C is the prediction."""
    return predict_scores(model, image, options, n_classes)[options.modes[0]]


def example_panel(model: nn.Module, dataset, index: int, palette: np.ndarray,
                  class_names: Sequence[str], device: torch.device | str = "cpu",
                  ignore_index: int = 255) -> np.ndarray:
    """image | ground truth | prediction of ``dataset[index]`` with a legend (RGB uint8)."""
    image, label = dataset[index]
    pred = predict_labels(model, image.unsqueeze(0).to(device))[0].cpu().numpy()
    original = cv2.imread(str(dataset.pairs[index][0]), cv2.IMREAD_COLOR)[..., ::-1]
    return prediction_panel(original, label.numpy().astype(np.uint8), pred.astype(np.uint8),
                            palette, class_names, ignore_index)


def save_example_prediction(
    model: nn.Module, dataset, index: int, path: str | Path, palette: np.ndarray,
    device: torch.device | str = "cpu", class_names: Sequence[str] = (),
    ignore_index: int = 255,
) -> Path:
    """Write image | ground truth | prediction, with a legend of the classes shown, to ``path``."""
    panel = example_panel(model, dataset, index, palette, class_names, device, ignore_index)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rgb(path, panel)
    return path
