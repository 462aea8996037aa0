"""Decoded-image cache: each training image and label is decoded once, then memory-mapped.

Decoding a 1024x2048 image PNG and its label takes most of a data-loading worker's time per
sample; the training transform (scale, crop, flip, jitter) is a small part. The cache keeps the
decoded uint8 arrays as ``.npy`` files on a local disk (or ``/dev/shm``) and the workers read
them with ``np.load(mmap_mode="r")``: the operating system's page cache then holds each array
once for every worker and every process of the node, and the transform reads only the pages it
needs.

* What is cached: the image as HxWx3 uint8 RGB (``lib.data.read_image``) and the label *after*
  the dataset's value check and label-id -> train-id lookup (``SegmentationDataset.read_label``),
  so a cached sample is the exact pair of arrays the dataset would decode, and its label was
  checked when it was written (a bad label file fails with its name, cache or not).
* Where: one folder per dataset under ``$BISENET_CACHE`` or ``~/.cache/bisenet``, subfolder
  ``decoded`` (``--data-cache auto``), under ``/dev/shm/bisenet/decoded`` (``shm``) or under a
  folder of your choice. The dataset's folder is named by a digest of its file list and its label
  mapping (lookup table, valid raw values, class count, ignore index), so another split, dataset
  or mapping never reads these arrays.
* When a source file changes: every entry's name holds a digest of both files' paths, sizes and
  modification times, checked on every read (two ``stat`` calls); a changed file gives another
  name, so the sample is decoded again and the stale arrays are removed.
* Concurrency: entries are written to a temporary file and renamed into place (atomic on a local
  file system), so any number of workers and processes may build the cache at once, on the fly,
  or ``tools/build_cache.py`` builds it ahead with all CPUs.
* Room: before training, the bytes still to write are summed from the image headers and compared
  with the free space; when it lacks, the cache is refused with the folder and both numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("bisenet")

# bump when the layout or the meaning of the cached arrays changes
CACHE_VERSION = 1
# free space left untouched on the cache's disk, beyond what the cache needs
RESERVE_BYTES = 1 << 30
# what a .npy header and file-system block rounding add per file, at most
_FILE_OVERHEAD = 8192


class CacheSpaceError(ValueError):
    """The disk of the cache folder has too little free space for the decoded arrays."""


def default_cache_root() -> Path:
    """``$BISENET_CACHE`` or ``~/.cache/bisenet``, subfolder ``decoded``."""
    root = os.environ.get("BISENET_CACHE") or Path.home() / ".cache" / "bisenet"
    return Path(root) / "decoded"


SHM_ROOT = Path("/dev/shm/bisenet/decoded")


def cache_root(option: str) -> Path | None:
    """The folder that ``--data-cache`` names: None for ``off``."""
    if option == "off":
        return None
    if option == "auto":
        return default_cache_root()
    if option == "shm":
        return SHM_ROOT
    return Path(option).expanduser()


def _stamp(path: Path | None) -> str:
    if path is None:
        return "-"
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _digest(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


@dataclass
class CacheUsage:
    """What :meth:`DecodedCache.survey` found: entries present and the bytes still to write."""

    folder: Path
    cached: int
    total: int
    cached_bytes: int
    missing_bytes: int
    free_bytes: int

    def describe(self) -> str:
        gib = 2.0**30
        return (f"decoded-image cache {self.folder}: {self.cached} of {self.total} samples "
                f"cached ({self.cached_bytes / gib:.2f} GiB), {self.missing_bytes / gib:.2f} GiB "
                f"more to write as samples are first read, {self.free_bytes / gib:.1f} GiB free")


class DecodedCache:
    """The decoded arrays of one dataset (its ``pairs`` and label mapping) under ``root``.

    ``load(index, dataset)`` returns the memory-mapped (image, label) of sample ``index``,
    decoding it with ``dataset.decode(index)`` and writing it first when it is missing or stale.
    Picklable (DataLoader workers receive a copy); it holds no open file.
    """

    def __init__(self, root: str | Path, pairs: Sequence[tuple[Path, Path | None]],
                 mapping: Sequence[str | bytes]) -> None:
        self.root = Path(root)
        self.pairs = [(Path(image), None if label is None else Path(label))
                      for image, label in pairs]
        listing = "\n".join(f"{image.resolve()},{label and label.resolve()}"
                            for image, label in self.pairs)
        self.folder = self.root / _digest(f"v{CACHE_VERSION}", listing, *mapping)

    def _entry(self, index: int) -> str:
        image, label = self.pairs[index]
        return f"{index:06d}.{_digest(_stamp(image), _stamp(label))}"

    def _paths(self, entry: str) -> tuple[Path, Path]:
        return self.folder / f"{entry}.image.npy", self.folder / f"{entry}.label.npy"

    def load(self, index: int, dataset) -> tuple[np.ndarray, np.ndarray]:
        """(image HxWx3 uint8, label HxW uint8 train ids) of sample ``index``, memory-mapped."""
        entry = self._entry(index)
        image_path, label_path = self._paths(entry)
        try:
            image = np.load(image_path, mmap_mode="r")
            if self.pairs[index][1] is None:  # no label file: all ignore, cheap to make
                return image, np.full(image.shape[:2], dataset.ignore_index, np.uint8)
            return image, np.load(label_path, mmap_mode="r")
        except FileNotFoundError:
            pass
        image, label = dataset.decode(index)
        self.folder.mkdir(parents=True, exist_ok=True)
        # the label first: an entry whose image exists is complete
        if self.pairs[index][1] is not None:
            _write_atomic(label_path, label)
        _write_atomic(image_path, image)
        for stale in self.folder.glob(f"{index:06d}.*.npy"):
            if not stale.name.startswith(entry + "."):
                stale.unlink(missing_ok=True)  # another process may have removed it already
        return image, label

    def survey(self) -> CacheUsage:
        """Count the entries present and the bytes the missing ones need (from image headers)."""
        cached = cached_bytes = missing_bytes = 0
        for index, (image, label) in enumerate(self.pairs):
            image_path, label_path = self._paths(self._entry(index))
            if image_path.is_file():
                cached += 1
                cached_bytes += image_path.stat().st_size
                cached_bytes += label_path.stat().st_size if label_path.is_file() else 0
                continue
            with Image.open(image) as header:  # reads the header only
                width, height = header.size
            missing_bytes += height * width * 3 + 2 * _FILE_OVERHEAD
            if label is not None:
                missing_bytes += height * width
        probe = self.folder
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        return CacheUsage(self.folder, cached, len(self.pairs), cached_bytes, missing_bytes, free)


def check_room(usage: CacheUsage, reserve: int = RESERVE_BYTES) -> None:
    """Refuse a cache whose missing entries would leave less than ``reserve`` bytes free."""
    if usage.missing_bytes + reserve > usage.free_bytes:
        raise CacheSpaceError(
            f"the decoded-image cache needs {usage.missing_bytes} more bytes "
            f"({usage.missing_bytes / 2**30:.2f} GiB) in {usage.folder}, but its disk has "
            f"{usage.free_bytes} bytes ({usage.free_bytes / 2**30:.2f} GiB) free and "
            f"{reserve / 2**30:.1f} GiB are kept spare: free some space, point --data-cache "
            "at a folder on a larger local disk (or shm for /dev/shm), or use --data-cache off")


def _write_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``path`` (.npy) so that readers see the whole file or none."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(handle, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dataset_mapping(dataset) -> list[str | bytes]:
    """What of a SegmentationDataset decides its cached labels (part of the folder's name)."""
    lut = b"-" if dataset.label_lut is None else dataset.label_lut.tobytes()
    valid = b"-" if dataset.valid_raw is None else dataset.valid_raw.tobytes()
    return [lut, valid, str(dataset.n_classes), str(dataset.ignore_index),
            dataset.dataset_name]


def attach_cache(dataset, option: str) -> DecodedCache | None:
    """Give ``dataset`` (a SegmentationDataset) the decoded cache that ``--data-cache`` names.

    Logs where it is and how large. When the disk lacks room, a folder that was asked for
    (``shm`` or a path) is refused (CacheSpaceError); the default (``auto``) logs why and the
    dataset decodes every sample as it would without a cache.
    """
    root = cache_root(option)
    if root is None:
        return None
    cache = DecodedCache(root, dataset.pairs, dataset_mapping(dataset))
    usage = cache.survey()
    try:
        check_room(usage)
    except CacheSpaceError as exc:
        if option != "auto":
            raise
        logger.warning("%s; training without it (every sample is decoded each time)", exc)
        return None
    logger.info("%s", usage.describe())
    dataset.decoded_cache = cache
    return cache
