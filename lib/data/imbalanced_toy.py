"""A deliberately imbalanced toy dataset: the toy street scenes reduced to four classes.

Background (every stuff class and the poles), car, person and traffic sign, in the toy
Cityscapes' own images (:func:`lib.data.toy_cityscapes.generate_toy_cityscapes`), read as custom
data
(``--dataset list`` with a label map), so that class weighting can be measured on the code
path of a user's own data: about 88% / 6% / 5% / 1% of the labelled pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from lib.data import toy_cityscapes as scene

IMBALANCED_CLASSES = ("background", "car", "person", "traffic sign")
# raw Cityscapes label id of the toy scenes -> class id; void (ego vehicle, static) unlisted,
# hence ignored
IMBALANCED_MAP = {
    **{raw: 0 for raw in (scene.ROAD, scene.SIDEWALK, scene.BUILDING, scene.VEGETATION,
                          scene.TERRAIN, scene.SKY, scene.POLE)},
    scene.CAR: 1, scene.PERSON: 2, scene.SIGN: 3,
}


def write_imbalanced_toy(root: str | Path, n_train: int = 40, n_val: int = 12, height: int = 64,
                         width: int = 128, seed: int = 0) -> list[str]:
    """Write the dataset under ``root``; returns the training options that read it."""
    root = Path(root)
    scene.generate_toy_cityscapes(root, n_train=n_train, n_val=n_val, height=height,
                                  width=width, seed=seed)
    for split in ("train", "val"):
        images = sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
        lines = []
        for image in images:
            label = (root / "gtFine" / split / image.parent.name
                     / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
            lines.append(f"{image.relative_to(root)},{label.relative_to(root)}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "label_map.json").write_text(json.dumps({str(k): v for k, v in
                                                     IMBALANCED_MAP.items()}))
    (root / "classes.txt").write_text("\n".join(IMBALANCED_CLASSES) + "\n")
    return ["--dataset", "list", "--data-root", str(root), "--train-list",
            str(root / "train.txt"), "--val-list", str(root / "val.txt"), "--n-classes",
            str(len(IMBALANCED_CLASSES)), "--label-map", str(root / "label_map.json"),
            "--class-names", str(root / "classes.txt")]
