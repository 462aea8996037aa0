"""Checks of a segmentation dataset that catch, before training, what would otherwise fail late.

Bad labels are the usual cause of a CUDA "device-side assert" deep inside the loss, of NaN losses
and of silently poor results (colour PNGs or ``labelIds`` where train ids were expected). Every
problem found names the file.

``check_pairs(..., decode_images=False)`` is the start-up check of training: it reads every label
and only the header of every image; ``tools/check_dataset.py`` also decodes the images.
"""

from __future__ import annotations

import argparse
import struct
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lib.data.datasets import DATASETS

Pair = tuple[Path, Path | None]


@dataclass
class Problem:
    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class DatasetReport:
    n_images: int = 0
    image_sizes: Counter = field(default_factory=Counter)  # (H, W) -> count
    raw_label_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    train_id_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) read from a PNG or JPEG header without decoding the pixels; None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                return height, width
            if head[:2] == b"\xff\xd8":
                return _jpeg_size(f)
    except OSError:
        return None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # other formats: decode
    return None if image is None else image.shape[:2]


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(2)
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if marker[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                         0xCF):
            data = f.read(5)
            if len(data) < 5:
                return None
            height, width = struct.unpack(">HH", data[1:5])
            return height, width
        f.seek(length - 2, 1)


def _check_one(pair: Pair, n_classes: int, ignore_index: int, label_lut: np.ndarray | None,
               decode_images: bool, valid_raw: np.ndarray | None = None,
               dataset_name: str = "cityscapes"):
    image_path, label_path = pair
    problems: list[Problem] = []
    raw_counts = np.zeros(256, np.int64)
    size = None
    if not image_path.is_file():
        return None, raw_counts, [Problem("missing image", str(image_path), "no such file")]
    if decode_images:
        # orientation ignored, as in training (the labels have none)
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        size = None if image is None else image.shape[:2]
    else:
        size = image_size(image_path)
    if size is None:
        problems.append(Problem("unreadable image", str(image_path),
                                "cannot be decoded (corrupt or not an image)"))
    if label_path is None:
        return size, raw_counts, problems
    if not label_path.is_file():
        problems.append(Problem("missing label", str(label_path), f"label of {image_path.name}"))
        return size, raw_counts, problems
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    if label is None:
        problems.append(Problem("unreadable label", str(label_path), "cannot be decoded"))
        return size, raw_counts, problems
    if label.ndim == 3:
        problems.append(Problem(
            "colour label", str(label_path),
            f"has {label.shape[2]} channels; labels must be single-channel PNGs of class ids "
            "(for Cityscapes the *_gtFine_labelIds.png files, not *_color.png)"))
        return size, raw_counts, problems
    if label.dtype != np.uint8:
        problems.append(Problem("label type", str(label_path),
                                f"is {label.dtype}; expected 8-bit class ids"))
        return size, raw_counts, problems
    raw_counts = np.bincount(label.ravel(), minlength=256)
    if size is not None and label.shape[:2] != size:
        problems.append(Problem("size mismatch", str(label_path),
                                f"label is {label.shape[1]}x{label.shape[0]}, image "
                                f"{image_path.name} is {size[1]}x{size[0]}"))
    unknown = label_id_problem(raw_counts > 0, valid_raw, n_classes, ignore_index, dataset_name)
    if unknown:
        kind = "train-id label" if unknown.startswith("looks like") else "unknown label id"
        problems.append(Problem(kind, str(label_path), unknown))
        return size, raw_counts, problems
    train_counts = _to_train_ids(raw_counts, label_lut)
    bad = [v for v in np.flatnonzero(train_counts) if v >= n_classes and v != ignore_index]
    if bad:
        raw_bad = [int(v) for v in np.flatnonzero(raw_counts)
                   if (label_lut[v] if label_lut is not None else v) in bad]
        problems.append(Problem(
            "label out of range", str(label_path),
            f"values {raw_bad[:10]} are neither classes 0..{n_classes - 1} nor the ignore index "
            f"{ignore_index} (check --n-classes, --ignore-index and --label-map)"))
    return size, raw_counts, problems


def _to_train_ids(raw_counts: np.ndarray, label_lut: np.ndarray | None) -> np.ndarray:
    if label_lut is None:
        return raw_counts
    mapped = np.zeros(256, np.int64)
    np.add.at(mapped, label_lut.astype(np.int64), raw_counts)
    return mapped


def check_pairs(
    pairs: Sequence[Pair], n_classes: int, ignore_index: int = 255,
    label_lut: np.ndarray | None = None, decode_images: bool = False, progress: bool = False,
    split: str = "", workers: int = 4, valid_raw: np.ndarray | None = None,
    dataset_name: str = "cityscapes",
) -> DatasetReport:
    """Check every pair; returns counts, pixel frequencies and the problems found.

    ``valid_raw`` marks the values a label file may hold (Cityscapes: label ids 0..33) and
    ``dataset_name`` names that dataset in the problems found.
    """
    report = DatasetReport(n_images=len(pairs))
    if not pairs:
        report.problems.append(Problem("empty split", split or "dataset", "no image/label pairs"))
        return report
    for name, paths in (("image", [p[0] for p in pairs]),
                        ("label", [p[1] for p in pairs if p[1] is not None])):
        for path, count in Counter(paths).items():
            if count > 1:
                report.problems.append(
                    Problem(f"duplicate {name}", str(path), f"listed {count} times"))
    with ThreadPoolExecutor(workers) as pool:  # cv2 decodes without holding the GIL
        results = pool.map(lambda p: _check_one(p, n_classes, ignore_index, label_lut,
                                                decode_images, valid_raw, dataset_name),
                           pairs)
        for size, raw_counts, problems in tqdm(results, total=len(pairs), disable=not progress,
                                               desc=f"checking {split}".strip()):
            if size is not None:
                report.image_sizes[size] += 1
            report.raw_label_pixels += raw_counts
            report.problems.extend(problems)
    report.train_id_pixels = _to_train_ids(report.raw_label_pixels, label_lut)
    return report


def format_report(report: DatasetReport, class_names: Sequence[str], ignore_index: int) -> str:
    from tabulate import tabulate

    lines = [f"{report.n_images} images; sizes (HxW: count): " + ", ".join(
        f"{h}x{w}: {n}" for (h, w), n in report.image_sizes.most_common(5))]
    total = max(int(report.train_id_pixels.sum()), 1)
    rows = [[i, name, int(report.train_id_pixels[i]), 100 * report.train_id_pixels[i] / total]
            for i, name in enumerate(class_names)]
    rows.append(["ignore", str(ignore_index), int(report.train_id_pixels[ignore_index]),
                 100 * report.train_id_pixels[ignore_index] / total])
    lines.append(tabulate(rows, headers=["id", "class", "pixels", "%"], floatfmt=".2f"))
    absent = [name for i, name in enumerate(class_names) if report.train_id_pixels[i] == 0]
    if absent:
        lines.append(f"classes with no pixel: {', '.join(absent)}")
    lines.append(f"{len(report.problems)} problem(s)" + (":" if report.problems else ""))
    lines.extend(f"  {p}" for p in report.problems)
    return "\n".join(lines)


def dataset_parser(description: str) -> argparse.ArgumentParser:
    """The command line of the tools that read a dataset's training split: --dataset,
    --data-root, --train-list."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cityscapes",
                        choices=[*DATASETS, "list", "folders"])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--train-list", default=None)
    return parser


def compute_mean_std(image_paths: Sequence[Path], progress: bool = False
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel RGB mean and std of [0, 1] images, over all pixels of all images."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in tqdm(image_paths, disable=not progress, desc="mean/std"):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read image {path}")
        pixels = image[..., ::-1].reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    if count == 0:
        raise ValueError("no images to compute the mean and std of")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def label_id_problem(present: np.ndarray, valid_raw: np.ndarray | None, n_classes: int,
                     ignore_index: int, dataset_name: str = "cityscapes") -> str | None:
    """Why a label file whose values are ``present`` (a (256,) bool table) is not a raw label file.

    A file holding a value that no raw label may hold is refused; when every value it holds is
    already a train id (``0..n_classes-1`` or the ignore index), it is a train-id PNG given where
    raw ids (Cityscapes labelIds, ADE20K's 0..150) were expected, which is said with the fix.
    """
    if valid_raw is None:
        return None
    invalid = np.flatnonzero(present & ~valid_raw)
    if not len(invalid):
        return None
    train_ids = np.zeros(256, bool)
    train_ids[:n_classes] = True
    if 0 <= ignore_index < 256:
        train_ids[ignore_index] = True
    values = np.flatnonzero(present).tolist()[:20]
    if dataset_name != "cityscapes":
        spec = DATASETS[dataset_name]
        if not (present & ~train_ids).any():
            return (f"looks like a train-id PNG (values {values} are all train ids "
                    f"0..{n_classes - 1} or {ignore_index}, and {invalid.tolist()[:5]} is no "
                    f"{dataset_name} label value): --dataset {dataset_name} reads the dataset's "
                    "own label files, so use those, or train on train-id PNGs with --dataset "
                    "folders or list (no --label-map)")
        return (f"holds value(s) {invalid.tolist()[:10]} outside {dataset_name}'s label values "
                f"({spec.describe_raw_values()}); check how the file was made")
    if not (present & ~train_ids).any():
        return (f"looks like a *_labelTrainIds.png (values {values}"
                f" are all train ids 0..{n_classes - 1} or {ignore_index}, and "
                f"{invalid.tolist()[:5]} is no label id): --dataset cityscapes reads "
                "*_gtFine_labelIds.png, so use the gtFine labelIds files, or train on train-id "
                "PNGs with --dataset folders or list (no --label-map)")
    return (f"holds value(s) {invalid.tolist()[:10]} that are not Cityscapes label ids (0..33); "
            "labelIds PNGs hold label ids only (check how the file was made)")
