"""Colour palettes and colourised label maps."""

from __future__ import annotations

import colorsys

import numpy as np

from lib.cityscapes import PALETTE


def make_palette(n_classes: int) -> np.ndarray:
    """(n_classes, 3) uint8 RGB: Cityscapes' colours for 19 classes, else evenly spread hues."""
    if n_classes == len(PALETTE):
        return PALETTE.copy()
    colours = []
    for i in range(n_classes):
        # golden-ratio hue steps keep neighbouring ids apart; three value levels add contrast
        hue = (i * 0.618033988749895) % 1.0
        value = (1.0, 0.75, 0.5)[i % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(n_classes, 3)


def colourise(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 RGB; the ignore index (and any id without a colour) is black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette[:256]
    if 0 <= ignore_index < 256:
        lut[ignore_index] = 0
    return lut[label.astype(np.uint8)]
