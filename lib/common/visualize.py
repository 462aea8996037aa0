"""Colour palettes and colourised label maps."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def colourise(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 RGB; the ignore index (and any id without a colour) is black."""
    if label.ndim != 2:
        raise ValueError(f"expected an HxW label map, got shape {label.shape}")
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError("label values must be in 0..255 to be colourised")
    lut = np.zeros((256, 3), np.uint8)
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    lut[: len(palette)] = palette
    if 0 <= ignore_index < 256:
        lut[ignore_index] = 0
    return lut[label.astype(np.uint8)]


# ---------------------------------------------------------------------------------------------
# Pictures a person looks at: image | ground truth | prediction with a legend (the training
# curves: lib/common/curves.py).

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4
LEGEND_ROW = 18  # pixels per legend row
LEGEND_SWATCH = 12  # side of a legend's colour square


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0]


def legend(class_ids: Sequence[int], class_names: Sequence[str], palette: np.ndarray,
           width: int) -> np.ndarray:
    """RGB strip ``width`` wide: a colour square and the name of each class in ``class_ids``,
    wrapped into rows of LEGEND_ROW pixels (white background)."""
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    entries = [(int(c), class_names[c] if c < len(class_names) else str(c)) for c in class_ids]
    rows: list[list[tuple[int, str, int]]] = [[]]
    x = 4
    for class_id, name in entries:
        entry_width = LEGEND_SWATCH + 4 + _text_width(name) + 12
        if rows[-1] and x + entry_width > width:
            rows.append([])
            x = 4
        rows[-1].append((class_id, name, x))
        x += entry_width
    strip = np.full((LEGEND_ROW * len(rows) + 4, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        top = 4 + r * LEGEND_ROW
        for class_id, name, left in row:
            strip[top:top + LEGEND_SWATCH, left:left + LEGEND_SWATCH] = palette[class_id]
            cv2.putText(strip, name, (left + LEGEND_SWATCH + 4, top + LEGEND_SWATCH - 2), _FONT,
                        _FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def prediction_panel(image_rgb: np.ndarray, label: np.ndarray, pred: np.ndarray,
                     palette: np.ndarray, class_names: Sequence[str],
                     ignore_index: int = 255) -> np.ndarray:
    """image | ground truth | prediction side by side (RGB), above a legend of the classes present
    in the ground truth or the prediction; ignored pixels are black."""
    if not image_rgb.shape[:2] == label.shape == pred.shape:
        raise ValueError(f"image {image_rgb.shape[:2]}, label {label.shape} and prediction "
                         f"{pred.shape} must have the same size")
    top = np.concatenate([image_rgb, colourise(label, palette, ignore_index),
                          colourise(pred, palette, ignore_index)], axis=1)
    present = np.union1d(np.unique(label), np.unique(pred))
    present = [int(c) for c in present if c != ignore_index and c < len(palette)]
    return np.concatenate([top, legend(present, class_names, palette, top.shape[1])], axis=0)


def write_rgb(path, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 image with OpenCV (which expects BGR); OSError naming the path."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(image_rgb[..., ::-1])):
        raise OSError(f"could not write {path}")
