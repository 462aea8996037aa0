"""Toy datasets in the official Cityscapes, COCO-Stuff, ADE20K and CamVid layouts, on demand.

The one generator of toy data: Cityscapes' is written by ``lib.data.toy_cityscapes`` (which also
paints the street scenes), the others here from the same scenes.

The scenes are the toy Cityscapes' street scenes (``lib.data.toy_cityscapes.draw_scene``: textured
sky, buildings, trees, road, sidewalk, terrain, cars, people, poles and signs), with each element
written as the raw label value that the dataset uses for the nearest class, void included, so
that every reader, label mapping and value check runs on files like the real ones:

    python -m lib.data.toy --dataset ade20k --root data/toy_ade20k
    python -m lib.data.toy --dataset cityscapes --root data/toy_cityscapes

COCO-Stuff and ADE20K images are JPEGs, CamVid's PNGs; labels are PNGs. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from lib.data import toy_cityscapes as scene
from lib.data.datasets import DATASETS
from lib.data.datasets.base import DatasetSpec

# toy scene element (a Cityscapes label id of draw_scene) -> the dataset's class name; the void
# elements (ego vehicle, static) become the dataset's raw void values below
TOY_CLASSES: dict[str, dict[int, str]] = {
    "coco-stuff": {
        scene.ROAD: "road", scene.SIDEWALK: "pavement", scene.BUILDING: "building-other",
        scene.POLE: "structural-other", scene.SIGN: "stop sign", scene.VEGETATION: "tree",
        scene.TERRAIN: "grass", scene.SKY: "sky-other", scene.PERSON: "person",
        scene.CAR: "car",
    },
    "ade20k": {
        scene.ROAD: "road", scene.SIDEWALK: "sidewalk", scene.BUILDING: "building",
        scene.POLE: "pole", scene.SIGN: "signboard", scene.VEGETATION: "tree",
        scene.TERRAIN: "grass", scene.SKY: "sky", scene.PERSON: "person", scene.CAR: "car",
    },
    # CamVid has no terrain class: the terrain texture stands in for fences, which keeps ten
    # elements that a model can tell apart
    "camvid": {
        scene.ROAD: "Road", scene.SIDEWALK: "Sidewalk", scene.BUILDING: "Building",
        scene.POLE: "Pole", scene.SIGN: "SignSymbol", scene.VEGETATION: "Tree",
        scene.TERRAIN: "Fence", scene.SKY: "Sky", scene.PERSON: "Pedestrian", scene.CAR: "Car",
    },
}
# raw values of the void elements (ego vehicle, static): COCO-Stuff's unlabelled value and one
# of its unused thing ids (11, "street sign"), ADE20K's "other", CamVid's void
TOY_VOID: dict[str, tuple[int, int]] = {
    "coco-stuff": (255, 11), "ade20k": (0, 0), "camvid": (11, 11),
}


def _file_stem(name: str, split: str, index: int) -> str:
    """A file name in the style of the dataset's own names."""
    if name == "coco-stuff":
        return f"{index + 1 + (0 if split == 'train' else 500000):012d}"
    if name == "ade20k":
        return f"ADE_{'train' if split == 'train' else 'val'}_{index + 1:08d}"
    sequence = {"train": "0001TP", "val": "0016E5", "test": "Seq05VD"}[split]
    return f"{sequence}_{index * 30:06d}"


def _raw_lut(name: str, spec: DatasetSpec) -> np.ndarray:
    """(256,) uint8: toy scene label id -> the dataset's raw label value."""
    lut = np.zeros(256, np.uint8)
    for element, class_name in TOY_CLASSES[name].items():
        lut[element] = spec.raw_value(class_name)
    lut[scene.EGO_VEHICLE], lut[scene.STATIC] = TOY_VOID[name]
    return lut


def generate_toy(name: str, root: str | Path, n_train: int = 40, n_val: int = 10,
                 height: int = 96, width: int = 128, seed: int = 0, n_test: int = 0) -> Path:
    """Write a toy ``name`` dataset (a key of ``DATASETS``) under ``root``; returns ``root``.

    ``n_test`` needs a dataset with a test split (CamVid, whose test labels are public;
    Cityscapes' test split has images only).
    """
    if name == "cityscapes":
        return scene.generate_toy_cityscapes(root, n_train=n_train, n_val=n_val, n_test=n_test,
                                             height=height, width=width, seed=seed)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if min(height, width) < 32:
        raise ValueError(f"toy images must be at least 32x32, got {height}x{width}")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if n_test and "test" not in spec.splits:
        raise ValueError(f"{name} has no test split with labels; use n_test=0")
    if min(counts.values()) < 0:
        raise ValueError(f"image counts must not be negative, got {counts}")
    root = Path(root)
    raw_lut = _raw_lut(name, spec)
    # JPEG quality fixed, so that the bytes depend on the arguments only
    image_options = [cv2.IMWRITE_JPEG_QUALITY, 92] if spec.image_suffix == ".jpg" else []
    for split_index, (split, count) in enumerate(counts.items()):
        if not count:
            continue
        image_dir, label_dir = spec.folders(root, split)
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])
            image, scene_label = scene.draw_scene(height, width, rng)
            stem = _file_stem(name, split, i)
            image_path = image_dir / f"{stem}{spec.image_suffix}"
            label_path = label_dir / f"{stem}.png"
            if not cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                               image_options):
                raise OSError(f"cannot write {image_path}")
            if not cv2.imwrite(str(label_path), cv2.LUT(scene_label, raw_lut)):
                raise OSError(f"cannot write {label_path}")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--root", required=True)
    parser.add_argument("--n-train", type=int, default=None,
                        help="training images (default: 150 for cityscapes, else 40)")
    parser.add_argument("--n-val", type=int, default=None,
                        help="validation images (default: 30 for cityscapes, else 10)")
    parser.add_argument("--n-test", type=int, default=0, help="CamVid and Cityscapes only")
    parser.add_argument("--height", type=int, default=None,
                        help="image height (default: 128 for cityscapes, else 96)")
    parser.add_argument("--width", type=int, default=None,
                        help="image width (default: 256 for cityscapes, else 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # the defaults of the quickstart's toy Cityscapes, and smaller sets for the others
    defaults = ((150, 30, 128, 256) if args.dataset == "cityscapes" else (40, 10, 96, 128))
    given = (args.n_train, args.n_val, args.height, args.width)
    n_train, n_val, height, width = (d if g is None else g
                                     for g, d in zip(given, defaults, strict=True))
    root = generate_toy(args.dataset, args.root, n_train=n_train, n_val=n_val, height=height,
                        width=width, seed=args.seed, n_test=args.n_test)
    print(f"toy {args.dataset} written to {root}")


if __name__ == "__main__":
    main()
