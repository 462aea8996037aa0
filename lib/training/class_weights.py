"""Per-class loss weights for imbalanced data (``--class-weights auto|FILE``).

The weights follow ENet's class weighting (Paszke et al., 2016; also ERFNet's)::

    w_c = 1 / ln(c + p_c),   c = 1.02,   p_c = pixels of class c / labelled pixels

counted over the training split after the dataset's label mapping, the ignore index left out.
Why this formula rather than inverse frequency or SegNet's median-frequency balancing: it is
bounded by construction, between ``1 / ln(1 + c) = 1.42`` (a class covering every pixel) and
``1 / ln(c) = 50.5`` (a class with almost none), so one rare class can not take over the loss
with a weight of thousands, and it needs no per-image statistics (median-frequency balancing
divides by the frequency over the images *containing* the class, undefined for a class absent
from the split). A class without any training pixel gets the bound 50.5; it never occurs in a
loss, so its weight changes nothing.

How the weights combine with OHEM (lib/training/loss.py): hard pixels are selected on the unweighted
loss, as without weights, and the loss is the weighted mean over the selected pixels,
``sum(w_y * ce) / sum(w_y)``, which is PyTorch's weighted ``cross_entropy`` ("mean" reduction)
when every pixel is selected.

A weights file (``tools/compute_class_weights.py`` writes JSON) is JSON, either a list of numbers
or an object with a ``"weights"`` list, or text holding the numbers separated by spaces, commas
or new lines (``#`` starts a comment).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lib.common import distributed
from lib.common.log import interactive
from lib.data.checks import check_pairs
from lib.data.config import DataConfig
from lib.data.dataset import dataset_info, dataset_pairs
from lib.training.config import TrainConfig

logger = logging.getLogger("bisenet")

ENET_C = 1.02
FORMULA = f"ENet: 1 / ln({ENET_C} + class pixel frequency)"


def enet_class_weights(pixel_counts: Sequence[int] | np.ndarray, c: float = ENET_C
                       ) -> np.ndarray:
    """``1 / ln(c + p)`` for the pixel frequencies ``p`` of ``pixel_counts`` (float64)."""
    counts = np.asarray(pixel_counts, np.float64)
    total = counts.sum()
    if counts.ndim != 1 or total <= 0 or (counts < 0).any():
        raise ValueError(f"need non-negative pixel counts with at least one labelled pixel, got "
                         f"{counts.tolist()[:20]}")
    return 1.0 / np.log(c + counts / total)


def count_training_pixels(data: DataConfig, progress: bool = False) -> np.ndarray:
    """Pixels of each class (int64, ``data.n_classes`` long) over the training split, after the
    label mapping, the ignore index left out; label problems raise ValueError."""
    info = dataset_info(data)
    report = check_pairs(dataset_pairs(data, "train"), data.n_classes, data.ignore_index,
                         info.label_lut, split="train", valid_raw=info.valid_raw,
                         dataset_name=data.dataset, progress=progress)
    if report.problems:
        shown = "\n  ".join(str(p) for p in report.problems[:20])
        raise ValueError(f"cannot count the training labels, {len(report.problems)} problem(s) "
                         f"(python tools/check_dataset.py shows them all):\n  {shown}")
    return report.train_id_pixels[:data.n_classes].copy()


def read_class_weights(path: str | Path, n_classes: int) -> tuple[float, ...]:
    """The weights in ``path`` (JSON or text, see the module's text), checked: exactly
    ``n_classes`` finite positive numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class weights file not found: {path} (write one with "
                                "tools/compute_class_weights.py, or use --class-weights auto)")
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        data = [token for line in text.splitlines()
                for token in re.split(r"[\s,]+", line.split("#", 1)[0]) if token]
    if isinstance(data, dict):
        data = data.get("weights")
    if not isinstance(data, list):
        raise ValueError(f"class weights file {path}: expected a list of numbers or an object "
                         "with a \"weights\" list")
    try:
        weights = tuple(float(v) for v in data)
    except (TypeError, ValueError):
        raise ValueError(f"class weights file {path}: not all values are numbers: "
                         f"{data[:10]}") from None
    if len(weights) != n_classes:
        raise ValueError(f"class weights file {path} has {len(weights)} weights for "
                         f"{n_classes} classes")
    bad = [(i, w) for i, w in enumerate(weights) if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"class weights file {path}: weights must be finite and positive; "
                         f"class {bad[0][0]} has {bad[0][1]}")
    return weights


def write_class_weights(path: str | Path, weights: Sequence[float], pixel_counts: Sequence[int],
                        class_names: Sequence[str]) -> Path:
    """A JSON file that ``--class-weights FILE`` reads, with the counts behind the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "formula": FORMULA,
        "weights": [float(w) for w in weights],
        "pixels": [int(n) for n in pixel_counts],
        "classes": list(class_names),
    }, indent=1) + "\n")
    return path


def resolve_class_weights(spec: str | None, data: DataConfig, progress: bool = False
                          ) -> tuple[float, ...] | None:
    """The weights ``spec`` (``--class-weights``) asks for: None (off), computed (``auto``) or
    read from a file."""
    if not spec or spec == "none":
        return None
    if spec == "auto":
        return tuple(float(w) for w in enet_class_weights(count_training_pixels(data, progress)))
    return read_class_weights(spec, data.n_classes)


def check_resumed_class_weights(saved: Sequence[float] | None, weights: Sequence[float] | None,
                                path: str | Path) -> None:
    """Class weights define the run: resuming with others (or none) raises ValueError."""
    same = (saved is None) == (weights is None) and (
        saved is None or np.allclose(saved, weights, rtol=1e-6, atol=0))
    if not same:
        raise ValueError(f"cannot resume {path}: its class weights were {saved}, now {weights} "
                         "(--class-weights defines the run; resume with the same weights, or "
                         "start a new run)")


def describe_class_weights(weights: Sequence[float], class_names: Sequence[str]) -> str:
    """One log line: each class's weight."""
    return ", ".join(f"{name} {w:.4g}" for name, w in zip(class_names, weights, strict=True))


def class_weights_for_run(cfg: TrainConfig, is_main: bool, class_names: Sequence[str]
                          ) -> tuple[float, ...] | None:
    """The run's weights: rank 0 computes or reads them, every rank receives the same values
    (or the same error); rank 0 logs them."""
    result: tuple[float, ...] | Exception | None = None
    if is_main:
        try:
            result = resolve_class_weights(cfg.class_weights, cfg.data, progress=interactive())
        except (ValueError, FileNotFoundError) as exc:
            result = exc
    result = distributed.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    if is_main and result is not None:
        source = FORMULA if cfg.class_weights == "auto" else cfg.class_weights
        logger.info("class weights (%s): %s", source,
                                          describe_class_weights(result, class_names))
    return result
