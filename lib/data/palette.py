"""Class colours: Cityscapes' official ones for 19 classes, distinct generated ones otherwise."""

from __future__ import annotations

import colorsys

import numpy as np

from lib.data.datasets.cityscapes import PALETTE


def cityscapes_palette() -> np.ndarray:
    """(19, 3) uint8 RGB: the official Cityscapes colours in train-id order (a copy)."""
    return PALETTE.copy()


def make_palette(n_classes: int) -> np.ndarray:
    """(n_classes, 3) uint8 RGB: Cityscapes' colours for 19 classes, else generated colours.

    Generated colours are deterministic and pairwise distinct: golden-ratio hue steps keep
    neighbouring ids apart, three saturation/value levels add contrast between hue cycles.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    if n_classes == len(PALETTE):
        return cityscapes_palette()
    colours, seen = [], set()
    i = 0
    while len(colours) < n_classes:
        hue = (i * 0.618033988749895) % 1.0
        saturation = (0.85, 0.6, 1.0)[(i // 3) % 3]
        value = (1.0, 0.75, 0.5)[i % 3]
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        i += 1
        if colour not in seen and colour != (0, 0, 0):  # black is reserved for ignore
            seen.add(colour)
            colours.append(colour)
    return np.asarray(colours, dtype=np.uint8).reshape(n_classes, 3)
