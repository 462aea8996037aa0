"""Training-pipeline throughput of one data-loading worker on full-size 1024x2048 PNGs, with and
without the decoded-image cache.

Times, per sample, in one process with one thread (what one DataLoader worker does, see
``lib.data.worker_init``):

* without the cache: decoding the image PNG (and BGR->RGB), decoding the label PNG with its value
  check and labelId->trainId lookup, then the training transform (random scale in (0.25, 2.0),
  crop 512x1024, flip, colour jitter, normalisation to a float tensor);
* with the cache (``--data-cache``, ``lib/data/cache.py``): the cache is built first (timed
  apart), then each sample is the memory-mapped arrays plus the same transform. The arrays were
  just written, so they are in the page cache, as they are after the first epoch of a run whose
  node has the memory for them (Cityscapes' train split: 25 GB).

It also times the transform with uint8 output (``--device-normalise``: the worker skips the
normalisation) and that normalisation done on a whole batch by the training process
(``lib.data.transforms.BatchNormaliser``) on the CPU. Model, loss and the DataLoader's inter-process
transfer are not included.

    python tools/benchmark_data.py                    # generates 8 full-size toy images first
    python tools/benchmark_data.py --data-root data   # real Cityscapes (train split)
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import tempfile
import time

import cv2
import numpy as np
import torch
from tabulate import tabulate

from lib.data.cache import DecodedCache, dataset_mapping
from lib.data.dataset import SegmentationDataset, read_image
from lib.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.data.transforms import BatchNormaliser, TrainTransform

CROP = (512, 1024)


class Clock:
    """Wall-clock and CPU (this thread's user + system) seconds accumulated per stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._marks = (0.0, 0.0)

    def start(self) -> None:
        self._marks = (time.perf_counter(), time.thread_time())

    def lap(self, stage: str, keep: bool = True) -> None:
        """Add the time since the last ``start``/``lap`` to ``stage`` (when ``keep``)."""
        now = (time.perf_counter(), time.thread_time())
        if keep:
            self.wall[stage] = self.wall.get(stage, 0.0) + now[0] - self._marks[0]
            self.cpu[stage] = self.cpu.get(stage, 0.0) + now[1] - self._marks[1]
        self._marks = now


def benchmark(root: pathlib.Path, n_samples: int, cache_dir: pathlib.Path, batch: int = 16,
              seed: int = 0) -> tuple[list[list], dict[str, float]]:
    """Rows of the result table for ``n_samples`` samples of ``root``'s train split, and the
    per-worker samples/s (wall clock) without and with the cache.

    The paths are interleaved sample by sample (decode + transform, cached read + transform,
    cached read + uint8 transform), so that a machine whose load changes affects them alike.
    """
    pairs = find_cityscapes_pairs(root, "train")
    transform = TrainTransform(crop_size=CROP, scale_range=(0.25, 2.0))
    uint8_transform = TrainTransform(crop_size=CROP, scale_range=(0.25, 2.0), uint8_output=True)
    dataset = SegmentationDataset(pairs, transform, LABEL_ID_TO_TRAIN_ID, n_classes=19)
    cache = DecodedCache(cache_dir, pairs, dataset_mapping(dataset))
    clock = Clock()
    clock.start()
    for index in range(len(pairs)):
        cache.load(index, dataset)
    clock.lap("build")
    crops = []
    for i in range(-1, n_samples):  # sample -1 warms up (first calls allocate)
        keep = i >= 0
        image_path, label_path = pairs[i % len(pairs)]
        clock.start()
        image = read_image(image_path)
        clock.lap("decode image", keep)
        label = dataset.read_label(label_path, image.shape[:2], image_path)
        clock.lap("decode label", keep)
        transform(image, label, np.random.default_rng([seed, i + 1]))
        clock.lap("transform", keep)
        image, label = cache.load(i % len(pairs), dataset)
        clock.lap("cache read", keep)
        transform(image, label, np.random.default_rng([seed, i + 1]))
        clock.lap("cached transform", keep)
        crop, _ = uint8_transform(image, label, np.random.default_rng([seed, i + 1]))
        clock.lap("uint8 transform", keep)
        crops.append(crop)

    # normalisation of a uint8 batch by the training process (--device-normalise on the CPU)
    normaliser = BatchNormaliser(transform.mean, transform.std)
    stacked = torch.stack((crops * batch)[:batch])
    normaliser(stacked)
    clock.start()
    for _ in range(3):
        normaliser(stacked)
    clock.lap("batch normalise")

    n = n_samples

    def per_sample(*stages: str) -> tuple[float, float]:
        return (sum(clock.wall[s] for s in stages) / n, sum(clock.cpu[s] for s in stages) / n)

    def row(name: str, *stages: str) -> list:
        wall, cpu = per_sample(*stages)
        return [name, f"{1000 * wall:.1f}", f"{1000 * cpu:.1f}"]

    plain = ("decode image", "decode label", "transform")
    cached = ("cache read", "cached transform")
    rates = {"plain": 1 / per_sample(*plain)[0], "cached": 1 / per_sample(*cached)[0],
             "plain_cpu": 1 / per_sample(*plain)[1], "cached_cpu": 1 / per_sample(*cached)[1]}
    size_mb = np.mean([p.stat().st_size for p, _ in pairs]) / 2**20
    cache_mb = sum(f.stat().st_size for f in cache.folder.glob("*.npy")) / len(pairs) / 2**20
    height, width = image.shape[:2]
    rows = [
        [f"{len(pairs)} {height}x{width} RGB PNGs ({size_mb:.1f} MB on average) + label PNGs, "
         f"{n} samples", "", ""],
        row("PNGs decoded each time (no cache): one sample", *plain),
        row("- decoding the image PNG", "decode image"),
        row("- decoding the label PNG, value check, label-id lookup", "decode label"),
        row("- transform (scale, crop, flip, jitter, normalise)", "transform"),
        row("decoded cache: one sample", *cached),
        row("- memory-mapping the cached arrays", "cache read"),
        row("- transform", "cached transform"),
        row("decoded cache, uint8 output (--device-normalise): one sample", "cache read",
            "uint8 transform"),
        ["building the cache (decode + write, once per sample)",
         f"{1000 * clock.wall['build'] / len(pairs):.1f}",
         f"{1000 * clock.cpu['build'] / len(pairs):.1f}"],
        [f"training process: normalising a uint8 batch of {batch} (CPU, "
         f"{torch.get_num_threads()} thread)", f"{1000 * clock.wall['batch normalise'] / 3:.1f}",
         f"{1000 * clock.cpu['batch normalise'] / 3:.1f}"],
        ["samples/s per worker, no cache", f"{rates['plain']:.2f}", f"{rates['plain_cpu']:.2f}"],
        ["samples/s per worker, decoded cache", f"{rates['cached']:.2f}",
         f"{rates['cached_cpu']:.2f}"],
        ["speed-up of the cache", f"{rates['cached'] / rates['plain']:.1f}x",
         f"{rates['cached_cpu'] / rates['plain_cpu']:.1f}x"],
        [f"cache size per sample: {cache_mb:.1f} MiB", "", ""],
    ]
    return rows, rates


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None,
                        help="Cityscapes-layout root (default: generate full-size toy images)")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--images", type=int, default=8, help="toy images to generate")
    parser.add_argument("--height", type=int, default=1024, help="toy image height")
    parser.add_argument("--width", type=int, default=2048, help="toy image width")
    parser.add_argument("--cache-dir", default=None,
                        help="where to build the decoded cache (default: a temporary folder)")
    parser.add_argument("--cv2-threads", type=int, default=1,
                        help="cv2.setNumThreads value (a DataLoader worker uses 1)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(args.cv2_threads)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root:
            root = pathlib.Path(args.data_root)
        else:
            print(f"generating {args.images} toy images of {args.height}x{args.width} ...",
                  flush=True)
            root = generate_toy_cityscapes(pathlib.Path(tmp) / "toy", n_train=args.images,
                                           n_val=0, height=args.height, width=args.width)
        cache_dir = pathlib.Path(args.cache_dir) if args.cache_dir else pathlib.Path(tmp) / "c"
        rows, rates = benchmark(root, args.samples, cache_dir)
    title = f"one worker, torch 1 thread, cv2.setNumThreads({args.cv2_threads})"
    print(tabulate(rows, tablefmt="github", headers=[title, "wall ms", "CPU ms"]))
    return rates


if __name__ == "__main__":
    main()
