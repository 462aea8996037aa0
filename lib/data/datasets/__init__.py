"""Dataset kinds selectable by name (``--dataset NAME``): one module per dataset, each defining
the ``SPEC`` of that dataset over the shared :class:`DatasetSpec`."""

from __future__ import annotations

from lib.data.datasets.ade20k import SPEC as ADE20K
from lib.data.datasets.base import DatasetSpec, generate_palette
from lib.data.datasets.camvid import SPEC as CAMVID
from lib.data.datasets.cityscapes import SPEC as CITYSCAPES
from lib.data.datasets.coco_stuff import SPEC as COCO_STUFF

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (CITYSCAPES, COCO_STUFF, ADE20K, CAMVID)
}


def dataset_for_class_count(n_classes: int) -> DatasetSpec | None:
    """The one dataset with ``n_classes`` classes, or None when none or several have it."""
    matches = [spec for spec in DATASETS.values() if spec.n_classes == n_classes]
    return matches[0] if len(matches) == 1 else None


__all__ = ["DATASETS", "DatasetSpec", "dataset_for_class_count", "generate_palette"]
