"""Segmentation datasets: the named ones (``lib.data.datasets``), annotation lists and folders.

Every dataset is a list of (image, label) file pairs read by :class:`SegmentationDataset`, which
maps raw label values to train ids with a lookup table and checks what it reads: an unreadable
image, a size mismatch, a colour label or a label value that is not a class fails with the file
named, never later as a CUDA assert in the loss.
"""

from __future__ import annotations

import csv
import json
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lib.data.checks import check_pairs, label_id_problem
from lib.data.config import DataConfig
from lib.data.datasets import DATASETS
from lib.data.palette import make_palette
from lib.data.toy import generate_toy
from lib.data.transforms import EvalTransform

Pair = tuple[Path, Path | None]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class SegmentationDataset(Dataset):
    """Reads image/label pairs; ``dataset[i]`` or ``dataset[(i, seed)]`` -> (image, label).

    ``image`` is a normalised float32 [3, H, W] tensor, ``label`` an int64 [H, W] tensor of train
    ids (all ``ignore_index`` when the pair has no label, e.g. Cityscapes' test split). With a
    ``(index, seed)`` item the transform draws its randomness from ``seed``. ``label_lut`` maps
    raw label values to train ids (e.g. Cityscapes label ids); after it every value must be a
    class (``< n_classes``) or ``ignore_index``, which is checked for every sample read.
    ``valid_raw`` (a (256,) bool table) marks the raw values a label file may hold at all
    (Cityscapes: label ids 0..33); a file holding another value is refused too.
    """

    def __init__(self, pairs: Sequence[Pair], transform, label_lut: np.ndarray | None = None,
                 n_classes: int = 19, ignore_index: int = 255,
                 valid_raw: np.ndarray | None = None, dataset_name: str = "cityscapes") -> None:
        if not pairs:
            raise ValueError("the dataset is empty: no image/label pairs were found")
        if label_lut is not None:
            label_lut = np.asarray(label_lut)
            if label_lut.shape != (256,) or label_lut.dtype != np.uint8:
                raise ValueError(f"label_lut must be a (256,) uint8 table, got {label_lut.dtype} "
                                 f"{label_lut.shape}")
        if not 0 < n_classes <= 256:
            raise ValueError(f"n_classes must be in 1..256, got {n_classes}")
        self.pairs = list(pairs)
        self.transform = transform
        self.label_lut = label_lut
        self.n_classes = n_classes
        self.ignore_index = ignore_index
        self.dataset_name = dataset_name  # named in the errors about raw label values
        # raw value -> 1 where it ends up neither a class nor ignore: one cheap lookup per label
        bad = np.ones(256, np.uint8)
        bad[:n_classes] = 0
        if 0 <= ignore_index < 256:
            bad[ignore_index] = 0
        self._bad_raw = bad if label_lut is None else bad[label_lut]
        self.valid_raw = None if valid_raw is None else np.asarray(valid_raw, bool)
        if self.valid_raw is not None:
            self._bad_raw = self._bad_raw | ~self.valid_raw
        self.decoded_cache = None  # a lib.data.cache.DecodedCache, set by attach_cache

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if self.decoded_cache is None:
            image, label = self.decode(index)
        else:  # the same arrays, decoded once (lib/data/cache.py)
            image, label = self.decoded_cache.load(index, self)
        rng = np.random.default_rng(seed) if seed is not None else None
        return self.transform(image, label, rng)

    def decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWx3 uint8 RGB, label HxW uint8 train ids) of sample ``index``, checked."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        if label_path is None:
            return image, np.full(image.shape[:2], self.ignore_index, np.uint8)
        return image, self.read_label(label_path, image.shape[:2], image_path)

    def read_label(self, path: Path, image_size: tuple[int, int], image_path: Path) -> np.ndarray:
        """HxW uint8 train ids of the label file ``path``, checked against its image."""
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if label is None:
            raise ValueError(f"cannot read label {path} (missing, corrupt or not an image)")
        if label.ndim != 2 or label.dtype != np.uint8:
            colour = label.ndim == 3 and label.shape[2] in (3, 4)
            raise ValueError(
                f"label {path} is {label.dtype} with shape {label.shape}"
                f"{' (a colour image)' if colour else ''}: labels must be single-channel 8-bit "
                "PNGs of class ids (Cityscapes: *_gtFine_labelIds.png, or *_labelTrainIds.png "
                "with train ids; not the colour *_gtFine_color.png)"
            )
        if label.shape != image_size:
            raise ValueError(f"label {path} is {label.shape[1]}x{label.shape[0]} but image "
                             f"{image_path} is {image_size[1]}x{image_size[0]}")
        # cheap per-sample guard: a value that is neither a class nor ignore crashes the loss
        if cv2.LUT(label, self._bad_raw).max():
            self._raise_bad_values(path, label)
        return label if self.label_lut is None else cv2.LUT(label, self.label_lut)

    def _raise_bad_values(self, path: Path, raw: np.ndarray) -> None:
        present = np.bincount(raw.ravel(), minlength=256) > 0
        unknown = label_id_problem(present, self.valid_raw, self.n_classes, self.ignore_index,
                                   self.dataset_name)
        if unknown:
            raise ValueError(f"label {path} {unknown}")
        values = np.flatnonzero(present * self._bad_raw)
        if self.label_lut is None:
            found = f"values {values[:10].tolist()}"
        else:
            found = ("values " + ", ".join(f"{v} (-> {self.label_lut[v]})" for v in values[:10])
                     + " after the label map")
        raise ValueError(
            f"label {path} has {found} outside 0..{self.n_classes - 1} that are not the ignore "
            f"index {self.ignore_index}; check --n-classes, --ignore-index and --label-map "
            "(Cityscapes labelIds need the labelId->trainId map; tools/check_dataset.py lists "
            "every such file)"
        )


def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB; OpenCV's silent None for unreadable files becomes an error naming it.

    The EXIF orientation of JPEGs is ignored, as it is for the labels (read unchanged): applying
    it would rotate the image but not its label.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"cannot read image {path} (missing, corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_annotation_list(path: str | Path, root: str | Path) -> list[Pair]:
    """Pairs from a file of ``image_path,label_path`` lines, relative to ``root``.

    Windows line endings and backslash separators are accepted; blank lines are skipped. A
    malformed line or a missing file fails with the list's name and the line number.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"annotation list not found: {path}")
    pairs: list[Pair] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{path}:{number}: expected 'image_path,label_path', got {line!r}")
            image, label = (root / Path(*PureWindowsPath(p).parts) for p in parts)
            for kind, file in (("image", image), ("label", label)):
                if not file.is_file():
                    raise FileNotFoundError(f"{path}:{number}: {kind} {file} does not exist")
            pairs.append((image, label))
    if not pairs:
        raise ValueError(f"annotation list {path} is empty: it has no 'image_path,label_path' "
                         "line")
    return pairs


# parts of Cityscapes-style names that are not part of the sample's name
_IMAGE_NAME_SUFFIXES = ("_leftImg8bit",)
_NOT_LABEL_SUFFIXES = ("_color", "_instanceIds")


def find_folder_pairs(image_dir: str | Path, label_dir: str | Path) -> list[Pair]:
    """Pairs of same-named files in two folders (sub-folders mirrored), sorted by image path.

    The label is a PNG with the image's stem (``x.jpg`` -> ``x.png``) or the stem followed by a
    suffix (``x_mask.png``, ``x_gtFine_labelIds.png``); a Cityscapes-style ``_leftImg8bit`` at
    the end of an image's stem is dropped first and ``*_color``/``*_instanceIds`` PNGs are not
    labels. Images without a label, or with several candidates, fail with their names.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    images = sorted(p for p in image_dir.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")

    def sample_name(image: Path) -> str:
        name = image.relative_to(image_dir).with_suffix("").as_posix()
        for suffix in _IMAGE_NAME_SUFFIXES:
            name = name.removesuffix(suffix) or name
        return name

    names = [sample_name(image) for image in images]
    known = set(names)
    # each label goes to the longest image name it starts with ("a_1_x" -> "a_1", not "a")
    owned: dict[str, list[tuple[bool, Path]]] = {}
    for label in sorted(label_dir.rglob("*.png")):
        key = label.relative_to(label_dir).with_suffix("").as_posix()
        parts = key.split("_")
        for k in range(len(parts), 0, -1):
            prefix = "_".join(parts[:k])
            if prefix in known:
                if k == len(parts) or not key.endswith(_NOT_LABEL_SUFFIXES):
                    owned.setdefault(prefix, []).append((k == len(parts), label))
                break
    pairs: list[Pair] = []
    missing, ambiguous = [], []
    for image, name in zip(images, names, strict=True):
        candidates = owned.get(name, [])
        exact = [label for is_exact, label in candidates if is_exact]
        if exact or len(candidates) == 1:
            pairs.append((image, exact[0] if exact else candidates[0][1]))
        elif candidates:
            ambiguous.append(f"{image} ({', '.join(lab.name for _, lab in candidates)})")
        else:
            missing.append(str(image))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {image_dir} have no label in {label_dir} (expected "
            f"<name>.png or <name>_<suffix>.png), e.g. {', '.join(missing[:5])}")
    if ambiguous:
        raise ValueError(f"{len(ambiguous)} image(s) in {image_dir} match several labels in "
                         f"{label_dir}; keep one per image: {'; '.join(ambiguous[:5])}")
    return pairs


def read_label_map(path: str | Path) -> np.ndarray:
    """Lookup table (256,) uint8 from a JSON ``{"raw": train_id}`` or CSV ``raw,train_id`` file.

    Raw values not listed map to 255 (ignore).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    if path.suffix.lower() == ".json":
        items = list(json.loads(path.read_text()).items())
    else:
        with open(path, newline="") as f:
            items = [tuple(row) for row in csv.reader(f) if row and not row[0].startswith("#")]
    lut = np.full(256, 255, np.uint8)
    for raw, train_id in items:
        try:
            raw_value, train_value = int(raw), int(train_id)
        except ValueError:
            raise ValueError(f"{path}: {raw!r} -> {train_id!r} is not an integer pair") from None
        if not (0 <= raw_value < 256 and 0 <= train_value < 256):
            raise ValueError(f"{path}: {raw_value} -> {train_value} is outside 0..255")
        lut[raw_value] = train_value
    return lut


# ---------------------------------------------------------------------------------------------
# Datasets from a TrainConfig (used by the trainer, the evaluate command and the tools)


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the code needs to know about a dataset's classes."""

    class_names: tuple[str, ...]
    palette: np.ndarray  # (n_classes, 3) uint8 RGB
    label_lut: np.ndarray | None  # raw label value -> train id; None when labels are train ids
    valid_raw: np.ndarray | None = None  # (256,) bool: the values a label file may hold


def dataset_info(cfg: DataConfig, class_names: Sequence[str] | None = None) -> DatasetInfo:
    """Class names, colours and label mapping of ``cfg``'s dataset."""
    if cfg.dataset in DATASETS:
        spec = DATASETS[cfg.dataset]
        if cfg.n_classes != spec.n_classes:
            raise ValueError(f"--dataset {cfg.dataset} has {spec.n_classes} classes but "
                             f"--n-classes is {cfg.n_classes}")
        return DatasetInfo(spec.class_names, spec.palette, spec.label_lut, spec.valid_raw)
    palette = None
    if cfg.class_names:
        class_names, palette = read_class_names(cfg.class_names)
    if class_names is not None and len(class_names) != cfg.n_classes:
        raise ValueError(f"{len(class_names)} class names given for {cfg.n_classes} classes")
    names = tuple(class_names) if class_names else tuple(
        f"class {i}" for i in range(cfg.n_classes))
    lut = read_label_map(cfg.label_map) if cfg.label_map else None
    return DatasetInfo(names, palette if palette is not None else make_palette(cfg.n_classes), lut)


def read_class_names(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """Class names, one per line, each optionally followed by its colour: ``name,R,G,B``.

    Returns the names and a (n, 3) uint8 palette, or None when no line gives a colour.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    names, colours = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = [p.strip() for p in line.split(",")]
        if not parts[0]:
            continue
        names.append(parts[0])
        if len(parts) == 4:
            try:
                colour = [int(v) for v in parts[1:]]
            except ValueError:
                colour = [-1]
            if not all(0 <= v <= 255 for v in colour):
                raise ValueError(f"{path}:{number}: colour {parts[1:]} is not three 0..255 values")
            colours.append(colour)
        elif len(parts) != 1:
            raise ValueError(f"{path}:{number}: expected 'name' or 'name,R,G,B', got {line!r}")
    if colours and len(colours) != len(names):
        raise ValueError(f"{path}: give a colour on every line or on none")
    return names, (np.asarray(colours, np.uint8) if colours else None)


def dataset_pairs(cfg: DataConfig, split: str) -> list[Pair]:
    """The file pairs of ``split`` for ``cfg.dataset`` (a name of ``DATASETS``, list or
    folders)."""
    root = Path(cfg.data_root)
    if cfg.dataset in DATASETS:
        return DATASETS[cfg.dataset].find_pairs(root, split)
    if cfg.dataset == "list":
        listed = {"train": cfg.train_list, "val": cfg.val_list}.get(split)
        if not listed:
            raise ValueError(f"--dataset list needs --{split}-list for the {split} split")
        return read_annotation_list(listed, root)
    return find_folder_pairs(root / "images" / split, root / "labels" / split)


def build_dataset(cfg: DataConfig, split: str, transform=None, check_labels: bool = False,
                  progress: bool = False) -> SegmentationDataset:
    """The dataset of ``split`` read through ``transform`` (default: whole images, normalised,
    as evaluated); ``check_labels`` scans every label first (``lib.data.checks``), with a
    progress bar when ``progress``."""
    info = dataset_info(cfg)
    pairs = dataset_pairs(cfg, split)
    if check_labels:
        report = check_pairs(pairs, cfg.n_classes, cfg.ignore_index, info.label_lut, split=split,
                             valid_raw=info.valid_raw, dataset_name=cfg.dataset,
                             progress=progress)
        if report.problems:
            shown = "\n  ".join(str(p) for p in report.problems[:20])
            raise ValueError(f"{len(report.problems)} problem(s) in the {split} split "
                             f"(python tools/check_dataset.py shows them all):\n  {shown}")
    if transform is None:
        transform = EvalTransform(cfg.mean, cfg.std)
    return SegmentationDataset(pairs, transform, info.label_lut, cfg.n_classes, cfg.ignore_index,
                               valid_raw=info.valid_raw, dataset_name=cfg.dataset)


def prepare_dataset(cfg: DataConfig) -> None:
    """Generate the toy dataset of ``cfg.dataset`` when asked to and ``cfg.data_root`` holds no
    training images of it yet."""
    if not cfg.generate_toy:
        return
    if cfg.dataset not in DATASETS:
        raise ValueError(f"--generate-toy needs a named dataset ({', '.join(DATASETS)}), not "
                         f"--dataset {cfg.dataset}")
    root = Path(cfg.data_root)
    if DATASETS[cfg.dataset].folders(root, "train")[0].is_dir():
        return
    logging.getLogger("bisenet").info("generating the toy %s dataset in %s", cfg.dataset, root)
    # the quickstart's toy Cityscapes, smaller sets of the others
    sizes = ({"n_train": 150, "n_val": 30, "height": 128, "width": 256}
             if cfg.dataset == "cityscapes" else {})
    generate_toy(cfg.dataset, root, **sizes)


def worker_init(worker_id: int) -> None:
    """One thread per data-loading worker: the parallelism comes from the workers.

    Workers ignore SIGINT/SIGTERM: Ctrl-C reaches the whole process group, and the main process
    stops between iterations (a worker dying on the signal would break the batch being loaded).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
