"""One evaluator, with the arithmetic of the protocol behind the published BiSeNet tables.

The published mIoUs (e.g. 74.95 / 75.58 / 76.53 / 77.08 for ``model_final_v2_city.pth`` in
ss / ssc / msf / mscf) were computed by the public reference implementation's evaluation script.
This module computes the same numbers, point for point:

* **Start size** (``short_side``, ADE20K and COCO-Stuff only): the image is first resized so that
  its short side has that length (bilinear, ``align_corners=False``; the long side
  ``int(short_side / short * long)``). Scores are always accumulated at the label's size.
* **ss / msf** (whole image): at each scale ``s`` the image is resized to
  ``(ceil(int(s * H) / 32) * 32, ceil(int(s * W) / 32) * 32)`` (bilinear, ``align_corners=True``),
  the logits are resized to the label's size (bilinear, ``align_corners=True``) and then turned
  into probabilities (softmax); with flip the mirrored image's logits are flipped back, resized and
  soft-maxed the same way and added. ``ss`` is scale 1 without flip; ``msf`` sums every
  scale and both flips.
* **ssc / mscf** (crops): at each scale the image is resized to ``(int(s * H), int(s * W))``
  (bilinear, ``align_corners=True``, no rounding to 32). Unless it is larger than the crop in
  both dimensions it is zero-padded (in normalised space) to at least the crop size, **centred**
  (the extra row/column goes to the bottom/right). Windows of ``crop_size`` step by
  ``ceil(crop * crop_stride)`` (stride 2/3 of the crop), the last one of each row/column moved
  back to end at the border. A crop's score is ``softmax(logits)``; with flip it is
  ``exp(softmax(logits) + softmax(mirrored logits, flipped back))``. Overlapping crop scores
  are **summed**, the padding cut off, and the result resized to the label's size (bilinear,
  ``align_corners=True``) and summed over the scales. ``ssc`` is scale 1 without flip.

The prediction is the arg-max of the summed scores. Passes shared by several requested modes run
once (``ss`` is ``msf``'s scale-1 unflipped term; ``ssc``'s crop scores are ``mscf``'s unflipped
crop softmaxes), so a mode's result does not depend on which other modes were requested.

The confusion matrix lives on the evaluation device and is summed over the ranks, so N processes,
each taking every N-th image, give exactly the single-process result. IoU is
``TP / (TP + FP + FN)`` per class; a class absent from both labels and predictions has no IoU and
is left out of the mean. (The reference adds 1 to every denominator and counts such a class as 0:
the two agree to 1e-7 whenever every class occurs, as on the published validation sets.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lib.common import distributed
from lib.common.visualize import colourise
from lib.evaluation.metrics import confusion_matrix

MODES = ("ss", "ssc", "msf", "mscf")
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
SIZE_DIVISOR = 32  # whole-image passes feed sizes rounded up to this


@dataclass(frozen=True)
class EvalOptions:
    """What a number means: the modes and the protocol's parameters (defaults: Cityscapes)."""

    modes: tuple[str, ...] = ("ss",)
    scales: tuple[float, ...] = DEFAULT_SCALES
    crop_size: tuple[int, int] = (1024, 1024)
    crop_stride: float = 2 / 3
    flip: bool = True
    short_side: int | None = None
    crop_batch: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "crop_size", tuple(int(c) for c in self.crop_size))
        if not self.modes:
            raise ValueError("no evaluation mode given; choose from " + ", ".join(MODES))
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown evaluation mode {mode!r}; choose from "
                                 f"{', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"evaluation modes repeated: {list(self.modes)}")
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {list(self.scales)}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales repeated: {list(self.scales)}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be two positive integers (height, width), "
                             f"got {self.crop_size}")
        if not 0 < self.crop_stride <= 1:
            raise ValueError(f"crop_stride must be in (0, 1] (a fraction of the crop), got "
                             f"{self.crop_stride}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be a positive integer, got {self.short_side}")
        if self.crop_batch < 1:
            raise ValueError(f"crop_batch must be >= 1, got {self.crop_batch}")

    def describe(self) -> str:
        """One line for logs: the modes and the protocol's parameters that apply to them."""
        parts = [f"modes {' '.join(self.modes)}"]
        if self.short_side:
            parts.append(f"short side {self.short_side}")
        if {"msf", "mscf"} & set(self.modes):
            parts.append(f"scales {', '.join(f'{s:g}' for s in self.scales)}, "
                         f"flip {'on' if self.flip else 'off'}")
        if {"ssc", "mscf"} & set(self.modes):
            parts.append(f"crops {self.crop_size[0]}x{self.crop_size[1]} stride "
                         f"{self.crop_stride:.4g}")
        return "; ".join(parts)


def start_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """The size an image is resized to before any scale: its short side set to ``short_side``."""
    if short_side is None:
        return height, width
    if height < width:
        return short_side, int(short_side / height * width)
    return int(short_side / width * height), short_side


def whole_image_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Input size of a whole-image pass at ``scale``: truncated, then rounded up to 32."""
    return tuple(math.ceil(int(scale * side) / SIZE_DIVISOR) * SIZE_DIVISOR
                 for side in (height, width))


def crop_windows(height: int, width: int, crop: tuple[int, int], stride_rate: float
                 ) -> list[tuple[int, int]]:
    """(top, left) of the crop windows over a ``height`` x ``width`` image (at least the crop's
    size), row by row: steps of ``ceil(crop * stride_rate)``, the last window ending at the
    border."""
    def starts(size: int, length: int) -> list[int]:
        stride = math.ceil(length * stride_rate)
        count = math.ceil((size - length) / stride) + 1
        return [min(size, stride * i + length) - length for i in range(count)]

    return [(top, left) for top in starts(height, crop[0]) for left in starts(width, crop[1])]


def centred_padding(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of an image before cropping: none when it is larger
    than the crop in both dimensions, else up to the crop size, centred."""
    if crop[0] < height and crop[1] < width:
        return 0, 0, 0, 0
    extra_h, extra_w = max(crop[0], height) - height, max(crop[1], width) - width
    return extra_h // 2, extra_h - extra_h // 2, extra_w // 2, extra_w - extra_w // 2


def _logits(model: nn.Module, batch: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Float32 logits of the model's main output for ``batch``, at the input's resolution."""
    out = model(batch)
    if isinstance(out, (tuple, list)):  # a model that also returns auxiliary outputs
        out = out[0]
    if out.shape[1] != n_classes:
        raise ValueError(f"the model outputs {out.shape[1]} classes but n_classes={n_classes}")
    if out.shape[-2:] != batch.shape[-2:]:
        raise RuntimeError(f"the model returned {tuple(out.shape[-2:])} scores for a "
                           f"{tuple(batch.shape[-2:])} input; expected the input resolution")
    return out.float()


def _resize(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class _Accumulator:
    """Summed scores [1, C, H, W] of each requested mode at the label's size."""

    def __init__(self, modes: Sequence[str]) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.modes = set(modes)

    def add(self, mode: str, scores: torch.Tensor) -> None:
        if mode in self.modes:
            if mode in self.totals:
                self.totals[mode].add_(scores)
            else:
                self.totals[mode] = scores.clone()


def _scales_to_run(options: EvalOptions, single: str, multi: str, modes: set[str]
                   ) -> list[float]:
    """Scales in the order the multi-scale mode sums them, plus 1.0 for the single-scale mode."""
    scales = list(options.scales) if multi in modes else []
    if single in modes and 1.0 not in scales:
        scales.append(1.0)
    return scales


def _whole_image_passes(model: nn.Module, image: torch.Tensor, size: tuple[int, int],
                        n_classes: int, options: EvalOptions, acc: _Accumulator) -> None:
    height, width = image.shape[-2:]
    for scale in _scales_to_run(options, "ss", "msf", acc.modes):
        scaled = _resize(image, whole_image_size(height, width, scale), align_corners=True)
        probs = _resize(_logits(model, scaled, n_classes), size, True).softmax(1)
        if scale == 1.0:
            acc.add("ss", probs)
        if "msf" not in acc.modes or scale not in options.scales:
            continue
        acc.add("msf", probs)
        if options.flip:  # added on its own, in the order the reference adds the terms
            mirrored = _logits(model, scaled.flip(-1), n_classes).flip(-1)
            acc.add("msf", _resize(mirrored, size, True).softmax(1))


def _crop_scores(model: nn.Module, image: torch.Tensor, n_classes: int, options: EvalOptions,
                 plain: bool, flipped: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Summed crop scores of one scaled image: ``softmax`` (``plain``) and, with ``flipped``,
    ``exp(softmax + mirrored softmax)``, both with the padding cut off."""
    crop = options.crop_size
    height, width = image.shape[-2:]
    top, bottom, left, right = centred_padding(height, width, crop)
    if top or bottom or left or right:
        image = F.pad(image, (left, right, top, bottom))
    full_h, full_w = image.shape[-2:]
    windows = crop_windows(full_h, full_w, crop, options.crop_stride)
    shape = (1, n_classes, full_h, full_w)
    plain_sum = image.new_zeros(shape, dtype=torch.float32) if plain else None
    flip_sum = image.new_zeros(shape, dtype=torch.float32) if flipped else None
    for first in range(0, len(windows), options.crop_batch):
        chunk = windows[first:first + options.crop_batch]
        crops = torch.cat([image[..., t:t + crop[0], c:c + crop[1]] for t, c in chunk])
        probs = _logits(model, crops, n_classes).softmax(1)
        if flipped:
            both = (probs + _logits(model, crops.flip(-1), n_classes).flip(-1).softmax(1)).exp_()
        for i, (t, c) in enumerate(chunk):
            if plain_sum is not None:
                plain_sum[0, :, t:t + crop[0], c:c + crop[1]] += probs[i]
            if flip_sum is not None:
                flip_sum[0, :, t:t + crop[0], c:c + crop[1]] += both[i]
    keep = (..., slice(top, top + height), slice(left, left + width))
    return (plain_sum[keep] if plain else None), (flip_sum[keep] if flipped else None)


def _crop_passes(model: nn.Module, image: torch.Tensor, size: tuple[int, int], n_classes: int,
                 options: EvalOptions, acc: _Accumulator) -> None:
    height, width = image.shape[-2:]
    for scale in _scales_to_run(options, "ssc", "mscf", acc.modes):
        scaled = _resize(image, (int(height * scale), int(width * scale)), align_corners=True)
        for_ssc = "ssc" in acc.modes and scale == 1.0
        for_mscf = "mscf" in acc.modes and scale in options.scales
        # without flip, mscf's crop score is the plain softmax, as ssc's
        plain, flipped = _crop_scores(model, scaled, n_classes, options,
                                      plain=for_ssc or (for_mscf and not options.flip),
                                      flipped=for_mscf and options.flip)
        if for_ssc:
            acc.add("ssc", _resize(plain, size, True))
        if for_mscf:
            acc.add("mscf", _resize(flipped if options.flip else plain, size, True))


def predict_scores(model: nn.Module, image: torch.Tensor, options: EvalOptions, n_classes: int,
                   label_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Summed scores [1, C, H, W] of each of ``options.modes`` for ``image`` [1, 3, h, w], at
    ``label_size`` (default: the image's size). The arg-max over C is the prediction."""
    if model.training:
        raise RuntimeError("the model is in training mode: call model.eval() before predicting")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image [1, 3, H, W], got shape {tuple(image.shape)}")
    size = tuple(label_size) if label_size is not None else tuple(image.shape[-2:])
    if options.short_side is not None:
        image = _resize(image, start_size(*image.shape[-2:], options.short_side), False)
    acc = _Accumulator(options.modes)
    with torch.inference_mode():
        if {"ss", "msf"} & acc.modes:
            _whole_image_passes(model, image, size, n_classes, options, acc)
        if {"ssc", "mscf"} & acc.modes:
            _crop_passes(model, image, size, n_classes, options, acc)
    return {mode: acc.totals[mode] for mode in options.modes}


def _unwrap(model: nn.Module) -> nn.Module:
    # A DistributedDataParallel forward may synchronise buffers across ranks; ranks evaluate
    # different numbers of images, so the wrapped module is used directly.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


@dataclass
class PredictionWriter:
    """Where and how ``--save-pred`` writes predictions.

    One PNG per image at ``<folder>/<image's folder>/<image's name>.png`` (Cityscapes:
    ``<city>/<name>_leftImg8bit.png``, the benchmark server's layout), values mapped through
    ``label_to_id`` (a 256-entry uint8 table, e.g. trainIds -> labelIds; None writes class ids).
    With a ``palette`` a colourised copy ``<name>_colour.png`` goes to the same sub-folder of the
    sibling ``<folder>_colour``: the official Cityscapes evaluation matches every
    ``<city>_<seq>_<frame>*.png`` below the results folder and would reject a second file there.
    """

    folder: Path
    label_to_id: np.ndarray | None = None
    palette: np.ndarray | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.label_to_id is not None:
            self.label_to_id = np.asarray(self.label_to_id)
            if self.label_to_id.dtype != np.uint8 or self.label_to_id.shape != (256,):
                raise ValueError(f"label_to_id must be a uint8 table of shape (256,), got "
                                 f"{self.label_to_id.dtype} {self.label_to_id.shape}")
        if self.palette is not None:
            self.palette = np.asarray(self.palette, np.uint8).reshape(-1, 3)

    def write(self, pred: torch.Tensor, image_path: str | Path) -> None:
        class_ids = pred.to(torch.uint8).cpu().numpy()
        target = prediction_path(image_path, self.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        values = self.label_to_id[class_ids] if self.label_to_id is not None else class_ids
        if not cv2.imwrite(str(target), values):
            raise OSError(f"could not write {target}")
        if self.palette is not None:
            colour_dir = self.folder.with_name(self.folder.name + "_colour") / target.parent.name
            colour_dir.mkdir(parents=True, exist_ok=True)
            colour_path = colour_dir / f"{target.stem}_colour.png"
            rgb = colourise(class_ids, self.palette, self.ignore_index)
            if not cv2.imwrite(str(colour_path), np.ascontiguousarray(rgb[..., ::-1])):
                raise OSError(f"could not write {colour_path}")


def evaluate(
    model: nn.Module, dataset, n_classes: int, options: EvalOptions = EvalOptions(),
    device: torch.device | str | None = None, ignore_index: int = 255,
    writer: PredictionWriter | None = None, progress: bool = True, num_workers: int = 2,
) -> dict[str, torch.Tensor]:
    """Confusion matrix ([C, C] int64, on the CPU) of each of ``options.modes`` over ``dataset``.

    ``dataset[i]`` is ``(image [3, H, W] float, label [H, W] int64)`` and ``dataset.pairs[i][0]``
    the image's path. Under ``torch.distributed`` rank r evaluates images r, r + N, ... and every
    rank receives the summed matrices. Images whose label is all ``ignore_index`` (a test split)
    are predicted but add nothing to the matrices. ``writer`` saves the prediction of the
    **last** mode listed.
    """
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    model = _unwrap(model)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    modes = options.modes
    confusion = {m: torch.zeros(n_classes, n_classes, dtype=torch.long, device=device)
                 for m in modes}
    bar = tqdm(zip(indices, loader, strict=True), total=len(indices),
               disable=not progress or rank != 0, desc=f"eval {'+'.join(modes)}",
               dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for index, (image, label) in bar:
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True)
            scores = predict_scores(model, image, options, n_classes, label.shape[-2:])
            for mode in modes:
                pred = scores[mode].argmax(1)
                try:
                    confusion[mode] += confusion_matrix(pred, label, n_classes, ignore_index)
                except ValueError as exc:
                    raise ValueError(f"{dataset.pairs[index][0]}: {exc}") from None
            if writer is not None:
                writer.write(pred[0], dataset.pairs[index][0])
    finally:
        model.train(was_training)
    for conf in confusion.values():
        distributed.all_reduce_sum(conf)
    return {mode: conf.cpu() for mode, conf in confusion.items()}


def prediction_path(image_path: str | Path, out_dir: str | Path) -> Path:
    """Where the prediction of ``image_path`` is written: ``out_dir/<folder>/<stem>.png``."""
    image_path = Path(image_path)
    return Path(out_dir) / image_path.parent.name / (image_path.stem + ".png")
