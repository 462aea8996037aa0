"""``DataConfig``: which dataset, where, its classes and its normalisation.

Training nests it in its ``TrainConfig`` (the options keep their flat names on the command line,
``--data-root``, ``--n-classes`` ...); ``evaluate.py`` and the tools build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lib.data.datasets import DATASETS
from lib.data.datasets.cityscapes import MEAN, STD


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - argparse's keyword
    """A dataclass field that becomes the command-line option ``--<name>`` with this help."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class DataConfig:
    dataset: str = option(
        "cityscapes",
        "'cityscapes', 'coco-stuff', 'ade20k' or 'camvid' (the official tree under --data-root; "
        "sets the class count, names, colours, label mapping and mean/std unless given), 'list' "
        "(--train-list/--val-list annotation files) or 'folders' (<root>/images/<split>, "
        "<root>/labels/<split>)",
    )
    data_root: str = option("data", "dataset root folder")
    train_list: str | None = option(None, "annotation list of the training split (image,label)")
    val_list: str | None = option(None, "annotation list of the validation split")
    n_classes: int = option(19, "number of classes (labels 0..n-1; the ignore index is separate)")
    ignore_index: int = option(255, "label value excluded from loss and metrics")
    label_map: str | None = option(
        None, "JSON or CSV file mapping raw label values to train ids (Cityscapes: built in)"
    )
    class_names: str | None = option(None, "file with one class name per line")
    mean: tuple[float, float, float] = option(MEAN, "RGB normalisation mean of [0, 1] images")
    std: tuple[float, float, float] = option(STD, "RGB normalisation std of [0, 1] images")
    generate_toy: bool = option(
        False, "generate a toy dataset of --dataset if --data-root has none")

    def validate(self) -> None:
        """Reject values that would otherwise fail late or silently read the wrong labels."""
        if self.dataset not in (*DATASETS, "list", "folders"):
            raise ValueError(f"--dataset {self.dataset!r} must be one of {', '.join(DATASETS)}, "
                             "list or folders")
        spec = DATASETS.get(self.dataset)
        if spec is not None and self.n_classes != spec.n_classes:
            raise ValueError(
                f"--dataset {self.dataset} has {spec.n_classes} classes, but --n-classes is "
                f"{self.n_classes} (to train on part of its classes, use --dataset folders or "
                "list with --label-map)")
        if self.n_classes < 1:
            raise ValueError(f"--n-classes must be positive, got {self.n_classes}")
        if 0 <= self.ignore_index < self.n_classes:
            raise ValueError(
                f"--ignore-index {self.ignore_index} is a valid class id (0..{self.n_classes - 1}"
                "); choose a value outside that range, such as 255")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"--std {self.std} must be positive")


# options whose defaults follow --dataset when it names another dataset than the recipe's
DATASET_DEFAULTS = ("n_classes", "mean", "std", "eval_short_side", "eval_crop_size")

def dataset_defaults(dataset: str) -> dict[str, Any]:
    """The values of ``DATASET_DEFAULTS`` that the named ``dataset`` implies ({} for list and
    folders: custom data keeps the recipe's). A model variant may score a dataset otherwise
    (``ModelVariant.eval_protocol``)."""
    spec = DATASETS.get(dataset)
    if spec is None:
        return {}
    values = {"n_classes": spec.n_classes, "mean": spec.mean, "std": spec.std,
              "eval_short_side": spec.eval_short_side, "eval_crop_size": spec.eval_crop_size}
    return values
