"""ADE20K as in the SceneParsing benchmark (ADEChallengeData2016): 150 classes.

The annotation PNGs store 0 for "other" (ignored) and 1..150 for the classes, in the
benchmark's order; train ids are the values minus one. Larger values do not occur in the
dataset and are reported as data errors.
"""

from __future__ import annotations

import numpy as np

from lib.data.datasets.base import DatasetSpec, generate_palette, raw_value_table

CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)

LABEL_LUT = np.full(256, 255, np.uint8)
LABEL_LUT[1 : len(CLASS_NAMES) + 1] = np.arange(len(CLASS_NAMES))

SPEC = DatasetSpec(
    name="ade20k",
    class_names=CLASS_NAMES,
    palette=generate_palette(len(CLASS_NAMES)),
    mean=(0.49343230, 0.46819794, 0.43106043),
    std=(0.25680755, 0.25506608, 0.27422913),
    label_lut=LABEL_LUT,
    valid_raw=raw_value_table(range(len(CLASS_NAMES) + 1)),
    splits={"train": "training", "val": "validation"},
    image_dir="images/{split}",
    label_dir="annotations/{split}",
    image_suffix=".jpg",
    unpack_hint=("unzip ADEChallengeData2016.zip and point --data-root at the "
                 "ADEChallengeData2016 folder it makes"),
    # the published ADE20K scores: short side resized to 640 and sliding 640x640 crops for
    # BiSeNetV2 (BiSeNetV1's table used 512 and 512x512)
    eval_short_side=640,
    eval_crop_size=(640, 640),
)
