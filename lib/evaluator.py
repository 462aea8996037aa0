"""One evaluator for the four protocols the field reports (seed tips 4 and 5).

* ``ss``: the whole image at its own size;
* ``ssc``: sliding-window crops over the image, probabilities averaged where crops overlap;
* ``msf``: several scales, each with its horizontal flip, probabilities summed at the original size;
* ``mscf``: both: crops at every scale, each crop also seen mirrored.

Definitions (what a number produced here means):

* An image is rescaled to ``(round(H * s), round(W * s))`` with bilinear interpolation
  (``align_corners=False``); the class probabilities (softmax in float32) of every scale are
  resized back the same way and summed at the original resolution.
* Crops are ``crop_size`` windows with stride ``round(crop * (1 - crop_overlap))``, the last window
  of each row/column touching the border; an image smaller than a crop is padded at the bottom
  and right with zeros (the mean colour, in normalised space) and the scores cropped back. Inside
  one scale the probabilities of overlapping crops are averaged.
* The flip of a crop mode mirrors each crop (the same windows), so the windows never move; the flip
  of a whole-image mode mirrors the image. The mirrored probabilities are flipped back and added.

Passes shared by several requested modes are computed once: ``ss`` is the scale-1 unflipped pass
of ``msf``, ``ssc`` that of ``mscf``. Flipped passes run as separate forward passes, so a mode's
result is bit-for-bit the same whether it is requested alone or with others.

The confusion matrix lives on the evaluation device and is summed over the ranks, so N processes,
each taking every N-th image, give exactly the single-process result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lib import distributed
from lib.visualize import colourise

MODES = ("ss", "ssc", "msf", "mscf")
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# (scale, with crops) identifies one pass over an image
PassKey = tuple[float, bool]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[C, C] int64 counts on the tensors' device, rows = ground truth, columns = prediction.

    Pixels labelled ``ignore_index`` are skipped. Any other label (or prediction) outside
    ``[0, n_classes)`` raises ``ValueError``: dropping it would silently change the IoU.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape "
                         f"{tuple(label.shape)}")
    valid = label != ignore_index
    truth, guess = label[valid].long(), pred[valid].long()
    out_of_range = (truth < 0) | (truth >= n_classes) | (guess < 0) | (guess >= n_classes)
    if bool(out_of_range.any()):
        bad_truth = torch.unique(truth[(truth < 0) | (truth >= n_classes)]).tolist()
        bad_guess = torch.unique(guess[(guess < 0) | (guess >= n_classes)]).tolist()
        raise ValueError(
            f"values outside [0, {n_classes}) that are not the ignore index {ignore_index}: "
            f"labels {bad_truth[:10]}, predictions {bad_guess[:10]}"
        )
    index = truth * n_classes + guess
    return torch.bincount(index, minlength=n_classes * n_classes).view(n_classes, n_classes)


def iou_from_confusion(conf: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU and its mean.

    A class absent from both the ground truth and the prediction has no IoU (NaN) and is left out
    of the mean, so an absent class never turns the mIoU into NaN; the mean is NaN only when the
    matrix is empty.
    """
    conf = conf.double().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(
        conf, np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    true_pos = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - true_pos
    iou = np.full(len(conf), np.nan)
    np.divide(true_pos, union, out=iou, where=union > 0)
    present = ~np.isnan(iou)
    return iou, float(iou[present].mean()) if present.any() else float("nan")


def window_starts(size: int, crop: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``crop`` covering ``size`` (>= crop) with the given
    overlap; the last window ends exactly at ``size``."""
    if size <= crop:
        return [0]
    stride = max(1, int(crop * (1 - overlap) + 0.5))
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


def sliding_windows(height: int, width: int, crop: tuple[int, int], overlap: float
                    ) -> list[tuple[int, int]]:
    """(top, left) corners of the crop windows over a ``height`` x ``width`` image that is at
    least as large as ``crop``, row by row."""
    return [(top, left) for top in window_starts(height, crop[0], overlap)
            for left in window_starts(width, crop[1], overlap)]


def _probs(model: nn.Module, batch: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Float32 softmax of the model's main output for ``batch``."""
    out = model(batch)
    if isinstance(out, (tuple, list)):  # a model that also returns auxiliary outputs
        out = out[0]
    if out.shape[1] != n_classes:
        raise ValueError(f"the model outputs {out.shape[1]} classes but n_classes={n_classes}")
    if out.shape[-2:] != batch.shape[-2:]:
        raise RuntimeError(f"the model returned {tuple(out.shape[-2:])} scores for a "
                           f"{tuple(batch.shape[-2:])} input; expected the input resolution")
    return out.float().softmax(1)


def _whole_pass(model: nn.Module, image: torch.Tensor, n_classes: int, flip: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    plain = _probs(model, image, n_classes)
    mirrored = _probs(model, image.flip(-1), n_classes).flip(-1) if flip else None
    return plain, mirrored


def _paste(target: torch.Tensor, probs: torch.Tensor, windows: list[tuple[int, int]],
           crop: tuple[int, int]) -> None:
    for (top, left), p in zip(windows, probs, strict=True):
        target[0, :, top:top + crop[0], left:left + crop[1]] += p


def _crop_pass(model: nn.Module, image: torch.Tensor, n_classes: int, crop: tuple[int, int],
               overlap: float, flip: bool, crop_batch: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop-averaged probabilities of ``image`` [1,3,h,w] and, with ``flip``, of its mirrored
    crops (flipped back). ``crop_batch`` crops go through the model at once."""
    _, _, height, width = image.shape
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    if pad_h or pad_w:  # smaller than a crop: pad with zeros (normalised space), crop back below
        image = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = image.shape[-2:]
    windows = sliding_windows(full_h, full_w, crop, overlap)
    shape = (1, n_classes, full_h, full_w)
    plain = image.new_zeros(shape, dtype=torch.float32)
    mirrored = image.new_zeros(shape, dtype=torch.float32) if flip else None
    count = image.new_zeros((1, 1, full_h, full_w), dtype=torch.float32)
    for first in range(0, len(windows), crop_batch):
        chunk = windows[first:first + crop_batch]
        crops = torch.cat([image[..., t:t + crop[0], left:left + crop[1]] for t, left in chunk])
        _paste(plain, _probs(model, crops, n_classes), chunk, crop)
        if mirrored is not None:
            _paste(mirrored, _probs(model, crops.flip(-1), n_classes).flip(-1), chunk, crop)
        for t, left in chunk:
            count[..., t:t + crop[0], left:left + crop[1]] += 1
    plain = plain.div_(count)[..., :height, :width]
    if mirrored is not None:
        mirrored = mirrored.div_(count)[..., :height, :width]
    return plain, mirrored


def _resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    height, width = image.shape[-2:]
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    if size == (height, width):
        return image  # no interpolation at all: scale 1 is exactly the input
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def _mode_passes(mode: str, scales: Sequence[float], flip: bool) -> list[tuple[PassKey, bool]]:
    """The passes a mode sums, as ((scale, crops), flipped too), in ascending scale order."""
    crops = mode in ("ssc", "mscf")
    if mode in ("ss", "ssc"):
        return [((1.0, crops), False)]
    return [((float(s), crops), flip) for s in sorted(scales)]


def _check_options(modes: Sequence[str], scales: Sequence[float], crop_size: Sequence[int],
                   crop_overlap: float, crop_batch: int) -> None:
    if not modes:
        raise ValueError("no evaluation mode given; choose from " + ", ".join(MODES))
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown evaluation mode {mode!r}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"evaluation modes repeated: {list(modes)}")
    if any(m in ("msf", "mscf") for m in modes):
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"scales repeated: {list(scales)}")
    if len(crop_size) != 2 or any(int(c) < 1 for c in crop_size):
        raise ValueError(f"crop_size must be two positive integers (height, width), "
                         f"got {crop_size}")
    if not 0 <= crop_overlap < 1:
        raise ValueError(f"crop_overlap must be in [0, 1), got {crop_overlap}")
    if crop_batch < 1:
        raise ValueError(f"crop_batch must be >= 1, got {crop_batch}")


def _predict_modes(model: nn.Module, image: torch.Tensor, modes: Sequence[str], n_classes: int,
                   scales: Sequence[float], crop_size: Sequence[int], crop_overlap: float,
                   flip: bool, crop_batch: int) -> dict[str, torch.Tensor]:
    """Summed probabilities [1, C, H, W] of every mode, each pass computed once."""
    if model.training:
        raise RuntimeError("the model is in training mode: call model.eval() before predicting")
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image [1, 3, H, W], got shape {tuple(image.shape)}")
    crop = (int(crop_size[0]), int(crop_size[1]))
    uses = {mode: _mode_passes(mode, scales, flip) for mode in modes}
    needs_flip: dict[PassKey, bool] = {}
    for passes in uses.values():
        for key, flipped in passes:
            needs_flip[key] = needs_flip.get(key, False) or flipped
    height, width = image.shape[-2:]
    totals: dict[str, torch.Tensor] = {}
    for key in sorted(needs_flip):  # ascending scale, so every mode adds its scales in order
        scale, crops = key
        scaled = _resize_image(image, scale)
        if crops:
            plain, mirrored = _crop_pass(model, scaled, n_classes, crop, crop_overlap,
                                         needs_flip[key], crop_batch)
        else:
            plain, mirrored = _whole_pass(model, scaled, n_classes, needs_flip[key])
        for mode, passes in uses.items():
            for used_key, flipped in passes:
                if used_key != key:
                    continue
                probs = plain + mirrored if flipped else plain
                if probs.shape[-2:] != (height, width):
                    probs = F.interpolate(probs, size=(height, width), mode="bilinear",
                                          align_corners=False)
                totals[mode] = probs.clone() if mode not in totals else totals[mode].add_(probs)
        del plain, mirrored
    return totals


@torch.inference_mode()
def predict_probs(model: nn.Module, image: torch.Tensor, mode: str, n_classes: int,
                  scales: Sequence[float] = DEFAULT_SCALES, crop_size: Sequence[int] = (1024, 1024),
                  crop_overlap: float = 1 / 3, flip: bool = True, crop_batch: int = 8
                  ) -> torch.Tensor:
    """Class probabilities [1, C, H, W] of ``image`` [1, 3, H, W] under ``mode``, summed over
    the scales and flips of that mode (``ss``/``ssc``: one pass, so they sum to 1).

    ``model`` must be in eval mode and on ``image``'s device; its output must have the input's
    resolution. ``flip`` and ``scales`` only concern ``msf`` and ``mscf``.
    """
    _check_options((mode,), scales, crop_size, crop_overlap, crop_batch)
    return _predict_modes(model, image, (mode,), n_classes, scales, crop_size, crop_overlap,
                          flip, crop_batch)[mode]


def _unwrap(model: nn.Module) -> nn.Module:
    # A DistributedDataParallel forward may synchronise buffers across ranks; ranks evaluate
    # different numbers of images, so the wrapped module is used directly.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def evaluate(
    model: nn.Module, dataset, n_classes: int, modes: Sequence[str] = ("ss",),
    scales: Sequence[float] = DEFAULT_SCALES, crop_size: Sequence[int] = (1024, 1024),
    crop_overlap: float = 1 / 3, flip: bool = True, crop_batch: int = 8,
    device: torch.device | str | None = None, ignore_index: int = 255,
    save_pred_dir: str | Path | None = None, save_colour: bool = False,
    label_to_id: np.ndarray | None = None, palette: np.ndarray | None = None,
    progress: bool = True, num_workers: int = 2,
) -> dict[str, torch.Tensor]:
    """Confusion matrix ([C, C] int64, on the CPU) of each mode over ``dataset``.

    ``dataset[i]`` is ``(image [3, H, W] float, label [H, W] int64)`` and ``dataset.pairs[i][0]``
    the image's path. Under ``torch.distributed`` rank r evaluates images r, r + N, ... and every
    rank receives the summed matrices. Images whose label is all ``ignore_index`` (a test split)
    are predicted but add nothing to the matrices.

    ``save_pred_dir`` receives one PNG per image with the prediction of the **last** mode listed,
    at ``<save_pred_dir>/<image's folder>/<image's name>.png`` (Cityscapes:
    ``<city>/<name>_leftImg8bit.png``, the benchmark server's layout), its values mapped through
    ``label_to_id`` (a 256-entry uint8 table, e.g. trainIds -> labelIds; None writes class ids).
    With ``save_colour`` a colourised copy, ``<name>_colour.png`` coloured with ``palette``, goes
    to the same sub-folder of the sibling directory ``<save_pred_dir>_colour``: the official
    Cityscapes evaluation matches every ``<city>_<seq>_<frame>*.png`` below the results folder and
    would reject a second file per image there.
    """
    modes = tuple(modes)
    _check_options(modes, scales, crop_size, crop_overlap, crop_batch)
    if len(dataset) == 0:
        raise ValueError("the evaluation dataset is empty")
    if label_to_id is not None:
        label_to_id = np.asarray(label_to_id)
        if label_to_id.dtype != np.uint8 or label_to_id.shape != (256,):
            raise ValueError(f"label_to_id must be a uint8 table of shape (256,), got "
                             f"{label_to_id.dtype} {label_to_id.shape}")
    if save_pred_dir is not None and save_colour:
        if palette is None:
            raise ValueError("save_colour needs a palette")
        palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    model = _unwrap(model)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    confusion = {m: torch.zeros(n_classes, n_classes, dtype=torch.long, device=device)
                 for m in modes}
    bar = tqdm(zip(indices, loader, strict=True), total=len(indices),
               disable=not progress or rank != 0, desc=f"eval {'+'.join(modes)}",
               dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index, (image, label) in bar:
                image = image.to(device, non_blocking=True)
                label = label.to(device, non_blocking=True)
                probs = _predict_modes(model, image, modes, n_classes, scales, crop_size,
                                       crop_overlap, flip, crop_batch)
                for mode in modes:
                    pred = probs[mode].argmax(1)
                    try:
                        confusion[mode] += confusion_matrix(pred, label, n_classes, ignore_index)
                    except ValueError as exc:
                        raise ValueError(f"{dataset.pairs[index][0]}: {exc}") from None
                if save_pred_dir is not None:
                    _save_prediction(pred[0], Path(dataset.pairs[index][0]), Path(save_pred_dir),
                                     label_to_id, palette if save_colour else None, ignore_index)
    finally:
        model.train(was_training)
    for conf in confusion.values():
        distributed.all_reduce_sum(conf)
    return {mode: conf.cpu() for mode, conf in confusion.items()}


def prediction_path(image_path: str | Path, out_dir: str | Path) -> Path:
    """Where the prediction of ``image_path`` is written: ``out_dir/<folder>/<stem>.png``."""
    image_path = Path(image_path)
    return Path(out_dir) / image_path.parent.name / (image_path.stem + ".png")


def _save_prediction(pred: torch.Tensor, image_path: Path, out_dir: Path,
                     label_to_id: np.ndarray | None, palette: np.ndarray | None,
                     ignore_index: int) -> None:
    class_ids = pred.to(torch.uint8).cpu().numpy()
    target = prediction_path(image_path, out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    values = label_to_id[class_ids] if label_to_id is not None else class_ids
    if not cv2.imwrite(str(target), values):
        raise OSError(f"could not write {target}")
    if palette is not None:
        colour_dir = out_dir.with_name(out_dir.name + "_colour") / target.parent.name
        colour_dir.mkdir(parents=True, exist_ok=True)
        colour_path = colour_dir / f"{target.stem}_colour.png"
        rgb = colourise(class_ids, palette, ignore_index)
        if not cv2.imwrite(str(colour_path), np.ascontiguousarray(rgb[..., ::-1])):
            raise OSError(f"could not write {colour_path}")


def format_iou_table(results: dict[str, torch.Tensor], class_names: Sequence[str]) -> str:
    """Per-class IoU (%) with one column per mode and a last mIoU row; '-' for a class absent from
    both the ground truth and the predictions."""
    from tabulate import tabulate

    columns = {mode: iou_from_confusion(conf) for mode, conf in results.items()}
    for mode, (iou, _) in columns.items():
        if len(iou) != len(class_names):
            raise ValueError(f"{len(class_names)} class names for the {len(iou)} classes of the "
                             f"{mode!r} confusion matrix")

    def cell(value: float) -> str:
        return "-" if np.isnan(value) else f"{100 * value:.2f}"

    rows = [[name] + [cell(iou[i]) for iou, _ in columns.values()]
            for i, name in enumerate(class_names)]
    rows.append(["mIoU"] + [cell(miou) for _, miou in columns.values()])
    return tabulate(rows, headers=["class", *columns], tablefmt="github",
                    colalign=("left",) + ("right",) * len(columns))
