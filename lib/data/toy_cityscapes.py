"""A toy Cityscapes: synthetic street scenes in the official layout and formats.

It lets every script run, and every test pass, without the real dataset:
``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (RGB) and
``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (Cityscapes *label ids*, void ids included).

Ten of the 19 classes are drawn as randomly placed scene elements: sky, building, vegetation,
road, sidewalk, terrain, car, person, pole and traffic sign. Every element takes its colour from one
palette shared by all classes, so colour alone does not tell the classes apart (the colour-only
baseline in ``tools/colour_baseline.py`` stays far below a CNN); what does is texture (window grids,
tiles, foliage noise, stripes), shape (wheels, heads, thin poles) and position (sky above the
horizon, road below). Images are generated on demand, deterministically from a seed:

    python -m lib.data.toy_cityscapes --root data/toy_cityscapes --height 128 --width 256

Variants, for checking that a recipe does not rely on the default toy's particulars (the defaults
leave the default toy's bytes unchanged):

* ``--class-colour-prob P``: each element takes, with probability P, a colour near its own class's
  base colour instead of the shared palette, so colour becomes partly informative, as in real
  street scenes (the colour-only baseline rises with P);
* ``--object-density D``: D times as many cars, people and poles (rounded);
* ``--texture-strength T``: the class textures' contrast times T (0: flat colours).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from lib.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs

# Cityscapes label ids used by the toy scenes
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    7, 8, 11, 17, 20, 21, 22, 23, 24, 26)
EGO_VEHICLE, STATIC = 1, 4  # void: mapped to ignore
CITIES = {"train": ("aachen", "bremen", "hamburg"), "val": ("frankfurt", "lindau"),
          "test": ("berlin",)}
# Base colours of the classes when ``class_colour_prob`` > 0 (RGB, well apart from each other).
CLASS_COLOURS = {
    SKY: (110, 160, 215), BUILDING: (150, 100, 80), VEGETATION: (60, 140, 50),
    ROAD: (95, 95, 100), SIDEWALK: (190, 170, 150), TERRAIN: (160, 185, 80),
    CAR: (40, 60, 150), PERSON: (200, 60, 70), POLE: (205, 205, 60), SIGN: (230, 130, 30),
}


class _Canvas:
    """The image being painted (float RGB) and its label-id map."""

    def __init__(self, height: int, width: int, rng: np.random.Generator,
                 class_colour_prob: float = 0.0, texture_strength: float = 1.0) -> None:
        self.h, self.w, self.rng = height, width, rng
        self.class_colour_prob = class_colour_prob
        self.texture_strength = texture_strength
        self.unit = height / 128.0  # texture sizes follow the image size
        self.image = np.zeros((height, width, 3), np.float32)
        self.label = np.zeros((height, width), np.uint8)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.patterns = self._patterns()

    def colour(self, label_id: int | None = None) -> np.ndarray:
        """One colour of the palette shared by every class or, with probability
        ``class_colour_prob``, one near ``label_id``'s base colour."""
        # no extra random draw when the option is off: the default toy's bytes stay the same
        if self.class_colour_prob > 0 and label_id in CLASS_COLOURS:
            if self.rng.random() < self.class_colour_prob:
                base = np.asarray(CLASS_COLOURS[label_id], np.float32)
                return np.clip(base + self.rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)
        return self.rng.uniform(40, 215, size=3).astype(np.float32)

    def _patterns(self) -> dict[int, np.ndarray]:
        """Brightness modulation (around 1) that identifies each class."""
        u, rng, yy, xx = self.unit, self.rng, self.yy, self.xx

        def blurred_noise(sigma: float) -> np.ndarray:
            noise = rng.standard_normal((self.h, self.w)).astype(np.float32)
            noise = cv2.GaussianBlur(noise, (0, 0), sigma)
            return noise / (noise.std() + 1e-6)

        period = 10 * u
        windows = ((xx % period < 0.55 * period) & (yy % (1.3 * period) < 0.6 * period))
        tiles = ((xx % (8 * u) < 1.2 * u) | (yy % (5 * u) < 1.0 * u))
        patterns = {
            SKY: 1.0 + 0.25 * (yy / self.h - 0.3),  # smooth vertical gradient
            BUILDING: np.where(windows, 0.55, 1.15),
            VEGETATION: 1.0 + 0.35 * blurred_noise(1.2 * u),
            ROAD: 1.0 + 0.06 * blurred_noise(0.6 * u),
            SIDEWALK: np.where(tiles, 0.6, 1.1),
            TERRAIN: 1.0 + 0.3 * np.sin((xx + yy) * (2 * np.pi / (6 * u))),
            CAR: 1.0 + 0.0 * xx,
            PERSON: 1.0 + 0.25 * np.sin(yy * (2 * np.pi / (9 * u))),
            POLE: 1.0 + 0.0 * xx,
            SIGN: 1.0 + 0.0 * xx,
        }
        if self.texture_strength != 1.0:  # skipped at 1: same floats as before
            patterns = {k: 1.0 + self.texture_strength * (p - 1.0) for k, p in patterns.items()}
        return patterns

    def paint(self, mask: np.ndarray, label_id: int, colour: np.ndarray | None = None,
              window: tuple[slice, slice] | None = None) -> None:
        window = window or (slice(None), slice(None))
        colour = self.colour(label_id) if colour is None else colour
        pattern = self.patterns.get(label_id)
        image, label = self.image[window], self.label[window]
        shade = pattern[window][mask] if pattern is not None else 1.0
        image[mask] = colour * np.atleast_1d(shade)[:, None]
        label[mask] = label_id

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, label_id: int,
                colour: np.ndarray | None = None) -> None:
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.h)
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.w)
        if y0 >= y1 or x0 >= x1:
            return
        window = (slice(y0, y1), slice(x0, x1))
        mask = ((self.yy[window] - cy) / ry) ** 2 + ((self.xx[window] - cx) / rx) ** 2 <= 1
        self.paint(mask, label_id, colour, window)

    def rect(self, y0: float, y1: float, x0: float, x1: float, label_id: int,
             colour: np.ndarray | None = None) -> None:
        ys = slice(max(int(y0), 0), max(min(int(y1), self.h), 0))
        xs = slice(max(int(x0), 0), max(min(int(x1), self.w), 0))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return
        mask = np.ones((ys.stop - ys.start, xs.stop - xs.start), bool)
        self.paint(mask, label_id, colour, (ys, xs))


def draw_scene(height: int, width: int, rng: np.random.Generator, class_colour_prob: float = 0.0,
               object_density: float = 1.0, texture_strength: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (HxWx3 uint8 RGB image, HxW uint8 label ids); options as in
    :func:`generate_toy_cityscapes`. Painted back to front: sky and buildings, the ground, the
    objects (far to near, so that near ones occlude), the void regions, then light and noise."""
    c = _Canvas(height, width, rng, class_colour_prob, texture_strength)
    horizon = height * rng.uniform(0.38, 0.48)
    vanish_x = width * rng.uniform(0.35, 0.65)
    _draw_skyline(c, rng, horizon)
    _draw_ground(c, rng, horizon, vanish_x)
    _draw_objects(c, rng, horizon, vanish_x, object_density)
    h, w, u = height, width, c.unit
    # void regions: the ego vehicle's bonnet at the bottom, a few static things
    c.rect(h * rng.uniform(0.9, 0.95), h, 0, w, EGO_VEHICLE, np.full(3, 30.0, np.float32))
    if rng.random() < 0.5:
        y = horizon + rng.uniform(0.05, 0.2) * h
        c.rect(y - 6 * u, y, 0, rng.uniform(0.03, 0.08) * w, STATIC)
    # lighting and sensor noise, so that PNGs have natural-image statistics
    light = 1.0 + 0.15 * np.sin(c.xx / w * np.pi * rng.uniform(0.5, 2) + rng.uniform(0, 6))
    image = c.image * light[..., None] + rng.normal(0, 4.0, c.image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), c.label


def _draw_skyline(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
    """The sky, buildings along the horizon, trees in front of some of them."""
    h, w, u = c.h, c.w, c.unit
    c.paint(c.yy < horizon, SKY)
    x = rng.uniform(-0.1, 0.05) * w
    while x < w:
        bw = rng.uniform(0.12, 0.3) * w
        if rng.random() < 0.8:
            c.rect(rng.uniform(0.05, 0.3) * h, horizon + 2 * u, x, x + bw, BUILDING)
        x += bw + rng.uniform(0, 0.06) * w
    for _ in range(rng.integers(1, 4)):
        c.ellipse(horizon - rng.uniform(0, 0.12) * h, rng.uniform(0, w), rng.uniform(0.1, 0.2) * h,
                  rng.uniform(0.06, 0.14) * w, VEGETATION)


def _draw_ground(c: _Canvas, rng: np.random.Generator, horizon: float, vanish_x: float) -> None:
    """Sidewalk on both sides of the road, terrain patches at the outer edges, lane markings."""
    h, u = c.h, c.unit
    ground = c.yy >= horizon
    c.paint(ground, SIDEWALK)
    depth = np.clip(c.yy - horizon, 0, None)
    road_half = depth * rng.uniform(1.1, 1.8) + 2 * u
    c.paint(ground & (np.abs(c.xx - vanish_x) < road_half), ROAD)
    for side in (-1, 1):
        if rng.random() < 0.7:
            edge = vanish_x + side * (road_half + depth * rng.uniform(0.5, 1.0) + 4 * u)
            outer = (c.xx - edge) * side > 0
            c.paint(ground & outer & (c.yy > horizon + rng.uniform(0.05, 0.2) * h), TERRAIN)
    # lane markings belong to the road
    dash = (np.abs(c.xx - vanish_x) < 0.02 * depth + 0.5 * u) & ((depth // (6 * u)) % 2 == 0)
    c.image[ground & dash] = 235.0


def _draw_objects(c: _Canvas, rng: np.random.Generator, horizon: float, vanish_x: float,
                  object_density: float) -> None:
    """Cars, people and poles with signs, far to near so that near ones occlude."""
    h, w, u = c.h, c.w, c.unit

    def count(low: int, high: int) -> int:
        drawn = int(rng.integers(low, high))
        return drawn if object_density == 1.0 else max(0, round(drawn * object_density))
    objects = []
    for _ in range(count(1, 4)):
        objects.append(("car", horizon + rng.uniform(0.15, 0.5) * h))
    for _ in range(count(1, 4)):
        objects.append(("person", horizon + rng.uniform(0.1, 0.45) * h))
    for _ in range(count(2, 4)):
        objects.append(("pole", horizon + rng.uniform(0.1, 0.4) * h))
    for kind, foot in sorted(objects, key=lambda o: o[1]):
        scale = (foot - horizon) / h + 0.15
        half_road = (foot - horizon) * 1.3
        if kind == "car":
            cw, ch = scale * 0.9 * w * rng.uniform(0.25, 0.35), scale * h * rng.uniform(0.35, 0.5)
            cx = vanish_x + rng.uniform(-0.8, 0.8) * half_road
            body = c.colour(CAR)
            c.rect(foot - ch, foot - 0.25 * ch, cx - cw / 2, cx + cw / 2, CAR, body)
            c.rect(foot - ch * 1.35, foot - ch, cx - cw / 3, cx + cw / 3, CAR, body * 0.6)
            for wheel_x in (cx - cw / 3, cx + cw / 3):
                c.ellipse(foot - 0.25 * ch, wheel_x, 0.25 * ch, 0.12 * cw, CAR,
                          np.full(3, 25.0, np.float32))
        elif kind == "person":
            ph = scale * h * rng.uniform(1.0, 1.3)
            side = rng.choice([-1, 1])
            px = vanish_x + side * (half_road + rng.uniform(0.05, 0.2) * w)
            c.ellipse(foot - 0.4 * ph, px, 0.4 * ph, 0.15 * ph, PERSON)
            c.ellipse(foot - 0.88 * ph, px, 0.11 * ph, 0.1 * ph, PERSON)
        else:
            top = foot - scale * h * rng.uniform(1.3, 1.8)
            side = rng.choice([-1, 1])
            px = vanish_x + side * (half_road + rng.uniform(0.02, 0.1) * w)
            half = max(4 * u, scale * 0.03 * w)
            c.rect(top, foot, px - half, px + half, POLE)
            if rng.random() < 0.8:
                radius = max(9 * u, scale * 0.12 * h)
                c.ellipse(top, px, radius, radius, SIGN)
                c.ellipse(top, px, 0.6 * radius, 0.6 * radius, SIGN, c.colour(SIGN))


def generate_toy_cityscapes(
    root: str | Path, n_train: int = 150, n_val: int = 30, n_test: int = 0, height: int = 128,
    width: int = 256, seed: int = 0, cities: Mapping[str, Sequence[str]] | None = None,
    class_colour_prob: float = 0.0, object_density: float = 1.0, texture_strength: float = 1.0,
) -> Path:
    """Write the toy dataset under ``root``; returns ``root``. Same arguments, same bytes.

    ``cities`` maps a split to its city names (default ``CITIES``); images go round-robin to the
    cities of their split. The test split has images only, like the public Cityscapes labels.
    ``class_colour_prob`` (in [0, 1]): probability that an element is coloured near its class's
    base colour (``CLASS_COLOURS``) rather than from the shared palette. ``object_density``: cars,
    people and poles per image, relative to the default. ``texture_strength``: the class textures'
    contrast, relative to the default (0: flat). The defaults give the default toy.
    """
    if not 0 <= class_colour_prob <= 1:
        raise ValueError(f"class_colour_prob must be in [0, 1], got {class_colour_prob}")
    if object_density < 0 or texture_strength < 0:
        raise ValueError(f"object_density ({object_density}) and texture_strength "
                         f"({texture_strength}) must not be negative")
    root = Path(root)
    cities = {**CITIES, **(cities or {})}
    if min(height, width) < 32:
        raise ValueError(f"toy images must be at least 32x32, got {height}x{width}")
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val),
                                                 ("test", n_test))):
        names = tuple(cities[split])
        if count < 0 or (count and not names):
            raise ValueError(f"{count} {split} images need at least one city, got {names}")
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            image, label = draw_scene(height, width, rng, class_colour_prob, object_density,
                                      texture_strength)
            city = names[i % len(names)]
            stem = f"{city}_{i // len(names):06d}_{19 + i % 7:06d}"
            image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
            label_path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write {image_path}")
            if split != "test":
                label_path.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(label_path), label):
                    raise OSError(f"cannot write {label_path}")
    return root


def colour_baseline_miou(root: str | Path) -> tuple[float, np.ndarray]:
    """Colour-only baseline: each pixel gets the class whose mean colour is nearest.

    Class mean colours are measured on the train split, predictions scored on val. Returns the
    mIoU over the classes present in val and the (19,) per-class IoU (NaN for absent classes).
    """
    n = 19

    def load(split):
        for image_path, label_path in find_cityscapes_pairs(root, split):
            image = cv2.imread(str(image_path), cv2.IMREAD_COLOR).reshape(-1, 3).astype(np.float64)
            label = LABEL_ID_TO_TRAIN_ID[cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)]
            valid = label.ravel() < n
            yield image[valid], label.ravel()[valid].astype(np.int64)

    sums, counts = np.zeros((n, 3)), np.zeros(n)
    for image, label in load("train"):
        for channel in range(3):
            sums[:, channel] += np.bincount(label, weights=image[:, channel], minlength=n)
        counts += np.bincount(label, minlength=n)
    class_ids = np.flatnonzero(counts)
    means = sums[class_ids] / counts[class_ids, None]
    confusion = np.zeros((n, n), np.int64)  # rows: truth, columns: prediction
    for image, label in load("val"):
        pred = class_ids[((image[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
        confusion += np.bincount(label * n + pred, minlength=n * n).reshape(n, n)
    present = confusion.sum(1) > 0
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.where(present, np.diag(confusion) / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def _city_list(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/toy_cityscapes")
    parser.add_argument("--n-train", type=int, default=150)
    parser.add_argument("--n-val", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=0)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-colour-prob", type=float, default=0.0,
                        help="probability of a class-specific colour per element (default 0)")
    parser.add_argument("--object-density", type=float, default=1.0,
                        help="cars, people and poles per image, relative (default 1)")
    parser.add_argument("--texture-strength", type=float, default=1.0,
                        help="contrast of the class textures, relative (default 1)")
    for split, names in CITIES.items():
        parser.add_argument(f"--{split}-cities", type=_city_list, default=names,
                            help=f"comma-separated city names (default {','.join(names)})")
    args = parser.parse_args(argv)
    cities = {split: getattr(args, f"{split}_cities") for split in CITIES}
    root = generate_toy_cityscapes(args.root, n_train=args.n_train, n_val=args.n_val,
                                   n_test=args.n_test, height=args.height, width=args.width,
                                   seed=args.seed, cities=cities,
                                   class_colour_prob=args.class_colour_prob,
                                   object_density=args.object_density,
                                   texture_strength=args.texture_strength)
    print(f"toy Cityscapes written to {root}")


if __name__ == "__main__":
    main()
