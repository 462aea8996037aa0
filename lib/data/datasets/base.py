"""What describes one dataset kind: classes, colours, label mapping, statistics and file tree.

Each dataset module defines one :class:`DatasetSpec` named ``SPEC``. Raw label values (what the
PNG files store) go through ``label_lut`` to train ids (0..n_classes-1) or the ignore index;
``valid_raw`` says which raw values the dataset may contain at all, so that a value outside the
dataset's range is reported as a data error instead of being silently ignored.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

Pair = tuple[Path, Path | None]


def generate_palette(n_colours: int) -> np.ndarray:
    """(n_colours, 3) uint8 RGB: deterministic, pairwise distinct, never black (the ignore colour).

    Colours go round three (saturation, value) levels; each round takes the next of
    ceil(n/3) evenly spaced hues, visited with a stride near 0.38 of a turn so that neighbouring
    class ids get clearly different hues.
    """
    if n_colours < 1:
        raise ValueError(f"n_colours must be positive, got {n_colours}")
    levels = ((0.9, 1.0), (0.55, 0.85), (1.0, 0.6))
    n_hues = math.ceil(n_colours / len(levels))
    stride = max(1, round(0.382 * n_hues))
    while math.gcd(stride, n_hues) != 1:  # a stride sharing a factor would revisit hues
        stride += 1
    colours = []
    for i in range(n_colours):
        hue = (i // len(levels) * stride % n_hues) / n_hues
        saturation, value = levels[i % len(levels)]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    palette = np.asarray(colours, np.uint8)
    if len({tuple(c) for c in palette}) != n_colours:  # rounding merged two hues
        raise ValueError(f"cannot generate {n_colours} distinct colours")
    return palette


def raw_value_table(values: Iterable[int]) -> np.ndarray:
    """(256,) bool table, True at ``values``."""
    table = np.zeros(256, bool)
    table[list(values)] = True
    return table


def _read_only(array: np.ndarray, dtype) -> np.ndarray:
    array = np.array(array, dtype=dtype)  # a copy: the caller's array stays writable
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """One dataset kind: its classes, label mapping, statistics, evaluation protocol and layout.

    ``splits`` maps our split names (train/val/test) to the dataset's folder names, which fill
    ``{split}`` in ``image_dir`` and ``label_dir`` (relative to the data root). A label is the
    PNG with its image's stem in ``label_dir``.
    """

    name: str
    class_names: tuple[str, ...] = field(repr=False)
    palette: np.ndarray = field(repr=False)  # (n_classes, 3) uint8 RGB
    mean: tuple[float, float, float]  # RGB of images scaled to [0, 1]
    std: tuple[float, float, float]
    label_lut: np.ndarray | None = field(repr=False)  # (256,) uint8 raw value -> train id / 255
    valid_raw: np.ndarray = field(repr=False)  # (256,) bool: raw values the dataset may hold
    splits: Mapping[str, str]
    image_dir: str  # e.g. "images/{split}"
    label_dir: str
    image_suffix: str  # e.g. ".jpg"
    unpack_hint: str  # how the official archives become the tree under the data root
    eval_short_side: int | None = None  # images resized to this short side before evaluation
    eval_crop_size: tuple[int, int] | None = None  # (H, W) sliding-window crop
    ignore_index: int = 255

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(set(self.class_names)) != n:
            raise ValueError(f"{self.name}: class names are not distinct")
        palette = _read_only(self.palette, np.uint8)
        if palette.shape != (n, 3):
            raise ValueError(f"{self.name}: palette is {palette.shape}, expected ({n}, 3)")
        valid_raw = _read_only(self.valid_raw, bool)
        if valid_raw.shape != (256,):
            raise ValueError(f"{self.name}: valid_raw must be a (256,) table")
        lut = self.label_lut
        if lut is not None:
            lut = _read_only(lut, np.uint8)
            mapped = lut[valid_raw]
            if lut.shape != (256,) or ((mapped >= n) & (mapped != self.ignore_index)).any():
                raise ValueError(f"{self.name}: label_lut must be (256,) and map every valid raw "
                                 f"value to 0..{n - 1} or {self.ignore_index}")
        # frozen: the arrays are replaced by read-only copies through object.__setattr__
        object.__setattr__(self, "palette", palette)
        object.__setattr__(self, "valid_raw", valid_raw)
        object.__setattr__(self, "label_lut", lut)
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def train_ids(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values -> train ids (ignore included)."""
        return raw if self.label_lut is None else self.label_lut[raw]

    def raw_value(self, class_name: str) -> int:
        """The smallest raw label value that stands for ``class_name``."""
        train_id = self.class_names.index(class_name)
        if self.label_lut is None:
            return train_id
        return int(np.flatnonzero(self.label_lut == train_id)[0])

    def train_to_raw(self) -> np.ndarray:
        """(256,) uint8: train id -> the dataset's own label value (the smallest raw value of that
        class), so that saved predictions read like the dataset's label files; 0 elsewhere."""
        table = np.zeros(256, np.uint8)
        for train_id in range(self.n_classes):
            table[train_id] = self.raw_value(self.class_names[train_id])
        return table

    def describe_raw_values(self) -> str:
        """The raw values a label file may hold, as ranges: e.g. ``0..181, 255``."""
        values = np.flatnonzero(self.valid_raw).tolist()
        ranges: list[list[int]] = []
        for v in values:
            if ranges and v == ranges[-1][1] + 1:
                ranges[-1][1] = v
            else:
                ranges.append([v, v])
        return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in ranges)

    def bad_raw_table(self) -> np.ndarray:
        """(256,) uint8, 1 at raw values that are outside the dataset's range or end up neither
        a class nor the ignore index: one cheap ``cv2.LUT`` per label finds them."""
        mapped = self.train_ids(np.arange(256))
        is_target = (mapped < self.n_classes) | (mapped == self.ignore_index)
        return (~(self.valid_raw & is_target)).astype(np.uint8)

    def out_of_range_values(self, raw: np.ndarray) -> list[int]:
        """The distinct raw values of ``raw`` that the dataset cannot contain, sorted."""
        present = np.bincount(np.asarray(raw, np.uint8).ravel(), minlength=256) > 0
        return np.flatnonzero(present & self.bad_raw_table().astype(bool)).tolist()

    def folders(self, root: str | Path, split: str) -> tuple[Path, Path]:
        """(image folder, label folder) of our split name ``split`` under ``root``."""
        if split not in self.splits:
            raise ValueError(f"{self.name} has no {split!r} split here; splits: "
                             f"{', '.join(self.splits)}")
        folder = self.splits[split]
        root = Path(root)
        return (root / self.image_dir.format(split=folder),
                root / self.label_dir.format(split=folder))

    def layout(self, root: str | Path, split: str) -> str:
        image_dir, label_dir = self.folders(root, split)
        return (f"expected {image_dir}/<name>{self.image_suffix} and {label_dir}/<name>.png")

    def find_pairs(self, root: str | Path, split: str) -> list[Pair]:
        """Image/label pairs of ``split`` under ``root``, sorted by image path.

        Fails with the expected layout when the image folder is missing or holds no image, and
        with the image's name when its label is missing.
        """
        image_dir, label_dir = self.folders(root, split)
        layout = self.layout(root, split)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no {self.name} images at {image_dir}: {self.unpack_hint} "
                                    f"({layout})")
        images = sorted(p for p in image_dir.glob(f"*{self.image_suffix}") if p.is_file())
        if not images:
            raise FileNotFoundError(f"{image_dir} contains no *{self.image_suffix} images "
                                    f"({layout})")
        pairs: list[Pair] = [(image, label_dir / f"{image.stem}.png") for image in images]
        missing = [(image, label) for image, label in pairs if not label.is_file()]
        if missing:
            image, label = missing[0]
            more = (f" (and {len(missing) - 1} more images without labels)"
                    if len(missing) > 1 else "")
            raise FileNotFoundError(f"missing label for {image}: expected {label}{more}")
        return pairs


def lut_from_ids(used_ids: Sequence[int]) -> np.ndarray:
    """(256,) uint8: ``used_ids[k]`` -> k, every other value -> 255."""
    lut = np.full(256, 255, np.uint8)
    lut[list(used_ids)] = np.arange(len(used_ids))
    return lut
