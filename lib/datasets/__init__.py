"""Dataset kinds selectable by name: each module defines the ``SPEC`` of one dataset.

Cityscapes joins this table when its module moves into this package.
"""

from __future__ import annotations

from lib.datasets.ade20k import SPEC as ADE20K
from lib.datasets.base import DatasetSpec, generate_palette
from lib.datasets.camvid import SPEC as CAMVID
from lib.datasets.coco_stuff import SPEC as COCO_STUFF

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (COCO_STUFF, ADE20K, CAMVID)}

__all__ = ["DATASETS", "DatasetSpec", "generate_palette"]
