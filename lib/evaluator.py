"""One evaluator for the four protocols the field reports (seed tips 4 and 5).

* ``ss``: the whole image at its own size;
* ``ssc``: sliding-window crops over the image, probabilities averaged where crops overlap;
* ``msf``: several scales, each with its horizontal flip, probabilities summed at the original size;
* ``mscf``: both: crops at every scale.

The confusion matrix lives on the evaluation device and is summed over the ranks, so N processes,
each taking every N-th image, give exactly the single-process result.
"""

from __future__ import annotations

import math
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


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    valid = (label != ignore_index) & (label >= 0) & (label < n_classes)
    index = label[valid].long() * n_classes + pred[valid].long()
    return torch.bincount(index, minlength=n_classes**2).view(n_classes, n_classes)


def iou_from_confusion(conf: torch.Tensor) -> tuple[np.ndarray, float]:
    """Per-class IoU (NaN for classes absent from both truth and prediction) and their mean."""
    conf = conf.double().cpu().numpy()
    true_pos = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - true_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_pos / union, np.nan)
    present = ~np.isnan(iou)
    return iou, float(iou[present].mean()) if present.any() else float("nan")


def sliding_windows(height: int, width: int, crop: tuple[int, int], overlap: float
                    ) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) windows covering the image; the last ones touch the border."""
    def starts(size: int, crop_len: int) -> list[int]:
        if size <= crop_len:
            return [0]
        stride = max(1, math.ceil(crop_len * (1 - overlap)))
        positions = list(range(0, size - crop_len, stride))
        return positions + [size - crop_len]

    return [(y, min(y + crop[0], height), x, min(x + crop[1], width))
            for y in starts(height, crop[0]) for x in starts(width, crop[1])]


def _softmax_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).float().softmax(1)


def _crop_probs(model: nn.Module, image: torch.Tensor, n_classes: int, crop: tuple[int, int],
                overlap: float, flip: bool, crop_batch: int) -> torch.Tensor:
    """Probabilities of ``image`` [1,3,H,W] from overlapping crops (and their flips), averaged."""
    _, _, height, width = image.shape
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    if pad_h or pad_w:  # smaller than a crop: pad (zeros in normalised space), crop back later
        image = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = image.shape[-2:]
    total = image.new_zeros(1, n_classes, full_h, full_w)
    count = image.new_zeros(1, 1, full_h, full_w)
    windows = sliding_windows(full_h, full_w, crop, overlap)
    for start in range(0, len(windows), crop_batch):
        chunk = windows[start:start + crop_batch]
        crops = torch.cat([image[..., t:b, left:r] for t, b, left, r in chunk])
        probs = _softmax_logits(model, crops)
        if flip:
            probs = probs + _softmax_logits(model, crops.flip(-1)).flip(-1)
        for (t, b, left, r), p in zip(chunk, probs, strict=True):
            total[..., t:b, left:r] += p
            count[..., t:b, left:r] += 1
    return (total / count)[..., :height, :width]


@torch.inference_mode()
def predict_probs(model: nn.Module, image: torch.Tensor, mode: str, n_classes: int,
                  scales: Sequence[float] = DEFAULT_SCALES, crop_size: Sequence[int] = (1024, 1024),
                  crop_overlap: float = 1 / 3, flip: bool = True, crop_batch: int = 8
                  ) -> torch.Tensor:
    """Summed class probabilities [1, C, H, W] of ``image`` [1, 3, H, W] under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {', '.join(MODES)}")
    multi_scale, use_crops = mode in ("msf", "mscf"), mode in ("ssc", "mscf")
    scales = tuple(scales) if multi_scale else (1.0,)
    flip = flip and multi_scale
    crop = (int(crop_size[0]), int(crop_size[1]))
    height, width = image.shape[-2:]
    total = image.new_zeros(1, n_classes, height, width, dtype=torch.float32)
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        scaled = image if size == (height, width) else F.interpolate(
            image, size=size, mode="bilinear", align_corners=False)
        if use_crops:
            probs = _crop_probs(model, scaled, n_classes, crop, crop_overlap, flip, crop_batch)
        elif flip:  # the image and its mirror in one batch
            both = _softmax_logits(model, torch.cat([scaled, scaled.flip(-1)]))
            probs = both[:1] + both[1:].flip(-1)
        else:
            probs = _softmax_logits(model, scaled)
        if probs.shape[-2:] != (height, width):
            probs = F.interpolate(probs, size=(height, width), mode="bilinear",
                                  align_corners=False)
        total += probs
    return total


def evaluate(
    model: nn.Module, dataset, n_classes: int, modes: Sequence[str] = ("ss",),
    scales: Sequence[float] = DEFAULT_SCALES, crop_size: Sequence[int] = (1024, 1024),
    crop_overlap: float = 1 / 3, flip: bool = True, crop_batch: int = 8,
    device: torch.device | str | None = None, ignore_index: int = 255,
    save_pred_dir: str | Path | None = None, save_colour: bool = False,
    label_to_id: np.ndarray | None = None, palette: np.ndarray | None = None,
    progress: bool = True, num_workers: int = 2,
) -> dict[str, torch.Tensor]:
    """Confusion matrix of each mode over ``dataset`` (every rank gets the summed result).

    ``save_pred_dir`` receives one PNG per image, of the last mode listed, named after the image's
    folder and file (``<city>/<name>_leftImg8bit.png``), its values mapped through ``label_to_id``
    (e.g. Cityscapes trainIds -> labelIds for the benchmark server); with ``save_colour`` a
    colourised copy goes to ``<save_pred_dir>_colour/``.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown evaluation mode {mode!r}; choose from {', '.join(MODES)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = distributed.get_rank(), distributed.get_world_size()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=num_workers)
    was_training = model.training
    model.eval()
    confusion = {m: torch.zeros(n_classes, n_classes, dtype=torch.long, device=device)
                 for m in modes}
    bar = tqdm(zip(indices, loader, strict=True), total=len(indices), disable=not progress,
               desc=f"eval {'+'.join(modes)}", dynamic_ncols=True)
    for index, (image, label) in bar:
        image, label = image.to(device), label.to(device)
        for mode in modes:
            probs = predict_probs(model, image, mode, n_classes, scales, crop_size, crop_overlap,
                                  flip, crop_batch)
            pred = probs.argmax(1)
            confusion[mode] += confusion_matrix(pred, label, n_classes, ignore_index)
        if save_pred_dir is not None:
            _save_prediction(pred[0], dataset.pairs[index][0], Path(save_pred_dir), label_to_id,
                             palette if save_colour else None, ignore_index)
    model.train(was_training)
    for conf in confusion.values():
        distributed.all_reduce_sum(conf)
    return {mode: conf.cpu() for mode, conf in confusion.items()}


def _save_prediction(pred: torch.Tensor, image_path: Path, out_dir: Path,
                     label_to_id: np.ndarray | None, palette: np.ndarray | None,
                     ignore_index: int) -> None:
    train_ids = pred.to(torch.uint8).cpu().numpy()
    relative = Path(Path(image_path).parent.name) / Path(image_path).with_suffix(".png").name
    target = out_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    values = label_to_id[train_ids] if label_to_id is not None else train_ids
    if not cv2.imwrite(str(target), values):
        raise OSError(f"could not write {target}")
    if palette is not None:
        colour_path = out_dir.with_name(out_dir.name + "_colour") / relative
        colour_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(colour_path), colourise(train_ids, palette, ignore_index)[..., ::-1])


def format_iou_table(results: dict[str, torch.Tensor], class_names: Sequence[str]) -> str:
    """Per-class IoU (%) with one column per mode, and the mIoU; '-' for an absent class."""
    from tabulate import tabulate

    columns = {mode: iou_from_confusion(conf) for mode, conf in results.items()}
    rows = []
    for i, name in enumerate(class_names):
        rows.append([name] + ["-" if np.isnan(iou[i]) else f"{100 * iou[i]:.2f}"
                              for iou, _ in columns.values()])
    rows.append(["mIoU"] + [f"{100 * miou:.2f}" for _, miou in columns.values()])
    return tabulate(rows, headers=["class", *columns], tablefmt="github",
                    colalign=("left",) + ("right",) * len(columns))
