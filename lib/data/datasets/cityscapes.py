"""Cityscapes: the 19 evaluated classes, the labelId -> trainId table, and the official file tree.

The ``*_gtFine_labelIds.png`` files store 34 label ids (0..33; -1, the licence plate, is never
written to them); 19 of them are trained and evaluated, the others are ignored (255). The table
below is the official one (``cityscapesscripts.helpers.labels``), written out so that the package
is not needed at run time; a test compares the two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.data.datasets.base import DatasetSpec

# (labelId, trainId) of the 19 evaluated classes, in trainId order
_TRAINED_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

PALETTE: np.ndarray = np.array(
    [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
     (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
     (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
     (0, 80, 100), (0, 0, 230), (119, 11, 32)],
    dtype=np.uint8,
)

# Normalisation statistics of Cityscapes' training images (RGB, for images scaled to [0, 1]);
# the published weights were trained with them.
MEAN: tuple[float, float, float] = (0.3257, 0.3690, 0.3223)
STD: tuple[float, float, float] = (0.2112, 0.2148, 0.2115)

LABEL_ID_TO_TRAIN_ID: np.ndarray = np.full(256, 255, dtype=np.uint8)
LABEL_ID_TO_TRAIN_ID[list(_TRAINED_LABEL_IDS)] = np.arange(len(_TRAINED_LABEL_IDS))

# The values a *_gtFine_labelIds.png may hold: 0..33. Anything else (e.g. 255, or 200) means the
# file is not a labelIds file (a train-id PNG, a colour channel, a corrupt export).
LABEL_IDS: np.ndarray = np.zeros(256, dtype=bool)
LABEL_IDS[:34] = True

TRAIN_ID_TO_LABEL_ID: np.ndarray = np.zeros(256, dtype=np.uint8)
TRAIN_ID_TO_LABEL_ID[: len(_TRAINED_LABEL_IDS)] = _TRAINED_LABEL_IDS

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def find_cityscapes_pairs(root: str | Path, split: str) -> list[tuple[Path, Path | None]]:
    """Image/label pairs of ``split`` in the official tree under ``root``, sorted by path.

    ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` is paired with
    ``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png``. For ``test`` (whose public labels are
    empty) the label is None.
    """
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    layout = (f"expected {root}/leftImg8bit/{split}/<city>/<name>{IMAGE_SUFFIX} and "
              f"{root}/gtFine/{split}/<city>/<name>{LABEL_SUFFIX}")
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"no Cityscapes images at {image_dir}: unpack leftImg8bit_trainvaltest.zip and "
            f"gtFine_trainvaltest.zip in {root} ({layout})"
        )
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise FileNotFoundError(f"{image_dir} contains no <city>/*{IMAGE_SUFFIX} images ({layout})")
    if split == "test":  # the public test labels are placeholders
        return [(image, None) for image in images]
    pairs: list[tuple[Path, Path | None]] = []
    missing = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = root / "gtFine" / split / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if not label.is_file():
            missing.append((image, label))
        pairs.append((image, label))
    if missing:
        image, label = missing[0]
        more = f" (and {len(missing) - 1} more images without labels)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"missing label for {image}: expected {label}{more}")
    return pairs


class CityscapesSpec(DatasetSpec):
    """Cityscapes' tree has a folder per city and suffixed names, and placeholder test labels."""

    def find_pairs(self, root: str | Path, split: str) -> list[tuple[Path, Path | None]]:
        if split not in self.splits:
            raise ValueError(f"cityscapes has no {split!r} split; splits: {', '.join(self.splits)}")
        return find_cityscapes_pairs(root, split)


SPEC = CityscapesSpec(
    name="cityscapes",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    mean=MEAN,
    std=STD,
    label_lut=LABEL_ID_TO_TRAIN_ID,
    valid_raw=LABEL_IDS,
    splits={"train": "train", "val": "val", "test": "test"},
    image_dir="leftImg8bit/{split}",
    label_dir="gtFine/{split}",
    image_suffix=IMAGE_SUFFIX,
    unpack_hint="unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip in <data-root>",
    # the published Cityscapes scores: full 1024x2048 images, 1024x1024 crops in ssc / mscf
    eval_short_side=None,
    eval_crop_size=(1024, 1024),
)
