"""COCO-Stuff 164k: 171 classes (80 things, 91 stuff) over the COCO 2017 images.

The ``stuffthingmaps_trainval2017`` PNGs store zero-based COCO category ids: 0..90 for things,
91..181 for stuff, 255 for unlabelled. Eleven thing ids in 0..90 have no annotations (they are
gaps in the COCO category list), so 171 of the 182 ids are classes, numbered in increasing id
order; the 11 unused ids and 255 are ignored.
"""

from __future__ import annotations

from lib.data.datasets.base import DatasetSpec, generate_palette, lut_from_ids, raw_value_table

THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
CLASS_NAMES: tuple[str, ...] = THING_NAMES + STUFF_NAMES

# zero-based thing ids without annotations (street sign, hat, shoe, eye glasses, plate, mirror,
# window, desk, door, blender, hair brush)
UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
N_RAW_IDS = 182  # 0..181
USED_IDS: tuple[int, ...] = tuple(i for i in range(N_RAW_IDS) if i not in UNUSED_IDS)

SPEC = DatasetSpec(
    name="coco-stuff",
    class_names=CLASS_NAMES,
    palette=generate_palette(len(CLASS_NAMES)),
    mean=(0.46962251, 0.4464104, 0.40718787),
    std=(0.27469736, 0.27012361, 0.28515933),
    label_lut=lut_from_ids(USED_IDS),
    valid_raw=raw_value_table([*range(N_RAW_IDS), 255]),
    # test2017 has no stuff annotations
    splits={"train": "train2017", "val": "val2017"},
    image_dir="images/{split}",
    label_dir="annotations/{split}",
    image_suffix=".jpg",
    unpack_hint=("unzip train2017.zip and val2017.zip into <data-root>/images and "
                 "stuffthingmaps_trainval2017.zip into <data-root>/annotations"),
    # the published COCO-Stuff scores: single scale, no resizing of the short side, sliding
    # 640x640 crops for BiSeNetV2 (BiSeNetV1's table used 512x512)
    eval_short_side=None,
    eval_crop_size=(640, 640),
)
