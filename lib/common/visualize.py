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
# Pictures a person looks at: image | ground truth | prediction with a legend, training curves.

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


CURVE_SIZE = (200, 640)  # height, width of each of the three plots of curves.png
_MARGIN = (24, 10, 22, 70)  # top, right, bottom, left: room for the title and the axis labels


def plot_area(panel_height: int = CURVE_SIZE[0], panel_width: int = CURVE_SIZE[1]
              ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the data inside one plot."""
    top, right, bottom, left = _MARGIN
    return top, panel_height - bottom, left, panel_width - right


def line_plot(title: str, xs: Sequence[float], ys: Sequence[float], x_range: tuple[float, float],
              colour: tuple[int, int, int], log_y: bool = False) -> np.ndarray:
    """One plot of ``ys`` against ``xs`` (RGB, CURVE_SIZE): a polyline with its value range."""
    height, width = CURVE_SIZE
    panel = np.full((height, width, 3), 255, np.uint8)
    y0, y1, x0, x1 = plot_area()
    cv2.rectangle(panel, (x0, y0), (x1, y1), (160, 160, 160), 1)
    cv2.putText(panel, title, (x0, 16), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if np.isfinite(y)
              and (y > 0 or not log_y)]
    if not points:
        cv2.putText(panel, "no values", (x0 + 8, (y0 + y1) // 2), _FONT, _FONT_SCALE,
                    (0, 0, 0), 1, cv2.LINE_AA)
        return panel
    x = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    shown = np.log10(y) if log_y else y
    low, high = float(shown.min()), float(shown.max())
    span = high - low or 1.0
    x_span = (x_range[1] - x_range[0]) or 1.0
    px = x0 + (x - x_range[0]) / x_span * (x1 - x0)
    py = y1 - (shown - low) / span * (y1 - y0)
    pts = np.round(np.stack([px, py], 1)).astype(np.int32)
    cv2.polylines(panel, [pts.reshape(-1, 1, 2)], False, colour, 1, cv2.LINE_AA)
    for px_, py_ in pts if len(pts) < 30 else ():
        cv2.circle(panel, (int(px_), int(py_)), 2, colour, -1)
    for value, row in ((y.max(), y0 + 4), (y.min(), y1)):
        cv2.putText(panel, f"{value:.3g}", (2, row), _FONT, _FONT_SCALE, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(panel, "iteration", ((x0 + x1 - _text_width("iteration")) // 2, height - 6),
                _FONT, _FONT_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    for value, col in ((x_range[0], x0), (x_range[1], x1 - _text_width(f"{x_range[1]:g}"))):
        cv2.putText(panel, f"{value:g}", (col, height - 6), _FONT, _FONT_SCALE, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return panel


CURVE_COLOURS = {"loss": (200, 30, 30), "lr": (30, 90, 200), "miou": (20, 150, 40)}


def training_curves(iterations: Sequence[int], loss: Sequence[float], lr: Sequence[float],
                    val_iterations: Sequence[int], val_miou: Sequence[float],
                    max_iter: int) -> np.ndarray:
    """loss, learning rate and validation mIoU (%) against the iteration, stacked (RGB)."""
    x_range = (0.0, float(max_iter))
    return np.concatenate([
        line_plot("training loss (log scale)", iterations, loss, x_range, CURVE_COLOURS["loss"],
                  log_y=True),
        line_plot("learning rate", iterations, lr, x_range, CURVE_COLOURS["lr"]),
        line_plot("validation mIoU (%)", val_iterations, [100 * v for v in val_miou], x_range,
                  CURVE_COLOURS["miou"]),
    ], axis=0)


def write_rgb(path, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 image with OpenCV (which expects BGR); OSError naming the path."""
    if not cv2.imwrite(str(path), np.ascontiguousarray(image_rgb[..., ::-1])):
        raise OSError(f"could not write {path}")
