"""Sliding-window (tiled) inference for images larger than the training crops (``demo.py
--tile``): the evaluator's crop arithmetic at scale 1, so that a tiled prediction is pixel for
pixel that of ``evaluate.py --mode ssc`` (or ``mscf --scales 1`` with flips)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lib.evaluation.evaluator import EvalOptions, predict_scores


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
