"""CamVid in the common 11-class layout (the SegNet release): 960x720 PNG frames.

``<root>/{train,val,test}/<name>.png`` are the images and ``<root>/{train,val,test}annot/
<name>.png`` their labels: values 0..10 are the classes below, 11 is void (ignored); any larger
value is a data error. The label values are already train ids, so void is the only mapping.
"""

from __future__ import annotations

import numpy as np

from lib.data.datasets.base import DatasetSpec, raw_value_table
from lib.data.datasets.cityscapes import MEAN as CITYSCAPES_MEAN
from lib.data.datasets.cityscapes import STD as CITYSCAPES_STD

CLASS_NAMES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # "Sidewalk" is called "Pavement" in some releases
VOID = 11

# the colours of these classes in CamVid's own colour-coded labels
PALETTE = np.array(
    [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
     (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)],
    dtype=np.uint8,
)

LABEL_LUT = np.full(256, 255, np.uint8)
LABEL_LUT[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES))  # 11 (void) stays 255

SPEC = DatasetSpec(
    name="camvid",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    # Cityscapes' statistics (street scenes too) until measured on CamVid:
    # tools/compute_mean_std.py recomputes them from the training images
    mean=CITYSCAPES_MEAN,
    std=CITYSCAPES_STD,
    label_lut=LABEL_LUT,
    valid_raw=raw_value_table(range(VOID + 1)),
    splits={"train": "train", "val": "val", "test": "test"},
    image_dir="{split}",
    label_dir="{split}annot",
    image_suffix=".png",
    unpack_hint=("point --data-root at the CamVid folder that holds train/, trainannot/, val/, "
                 "valannot/, test/ and testannot/"),
    # evaluated on the full 960x720 frames: no resizing, one crop covering the image
    eval_short_side=None,
    eval_crop_size=(720, 960),
)
