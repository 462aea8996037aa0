"""Training-pipeline throughput of one data-loading worker on full-size 1024x2048 PNGs.

Times, per sample, in one process with one thread (what one DataLoader worker does, see
``lib.data.dataset.worker_init``): decoding the image PNG (and BGR->RGB), decoding the label PNG
with its
value check and labelId->trainId lookup, and the full training transform (random scale in
(0.25, 2.0), crop 512x1024, flip, colour jitter, normalisation to a float tensor). Model, loss and
the DataLoader's inter-process transfer are not included.

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

from lib.data.dataset import SegmentationDataset, read_image
from lib.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.data.transforms import TrainTransform


def benchmark(root: pathlib.Path, n_samples: int, seed: int = 0) -> list[list]:
    """Rows of the result table for ``n_samples`` samples of ``root``'s train split."""
    pairs = find_cityscapes_pairs(root, "train")
    transform = TrainTransform(crop_size=(512, 1024), scale_range=(0.25, 2.0))
    dataset = SegmentationDataset(pairs, transform, LABEL_ID_TO_TRAIN_ID, n_classes=19)
    times = np.zeros(3)  # image decode, label decode + check + lookup, transform
    for i in range(-1, n_samples):  # sample -1 warms up (first calls allocate)
        image_path, label_path = pairs[i % len(pairs)]
        t0 = time.perf_counter()
        image = read_image(image_path)
        t1 = time.perf_counter()
        label = dataset.read_label(label_path, image.shape[:2], image_path)
        t2 = time.perf_counter()
        transform(image, label, np.random.default_rng([seed, i + 1]))
        t3 = time.perf_counter()
        if i >= 0:
            times += (t1 - t0, t2 - t1, t3 - t2)
    total = times.sum()
    size_mb = np.mean([p.stat().st_size for p, _ in pairs]) / 2**20
    height, width = image.shape[:2]
    return [
        ["input", f"{height}x{width} RGB PNG ({size_mb:.1f} MB on average) + label PNG"],
        ["samples timed", n_samples],
        ["samples/s per worker", f"{n_samples / total:.1f}"],
        ["ms per sample", f"{1000 * total / n_samples:.1f}"],
        ["decoding image + label", f"{100 * times[:2].sum() / total:.0f}% "
                                   f"({1000 * times[:2].sum() / n_samples:.1f} ms)"],
        ["- of which label (decode, check, id lookup)",
         f"{100 * times[1] / total:.0f}% ({1000 * times[1] / n_samples:.1f} ms)"],
        ["transform (scale, crop, flip, jitter, normalise)",
         f"{100 * times[2] / total:.0f}% ({1000 * times[2] / n_samples:.1f} ms)"],
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None,
                        help="Cityscapes-layout root (default: generate full-size toy images)")
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--images", type=int, default=8, help="toy images to generate")
    parser.add_argument("--cv2-threads", type=int, default=1,
                        help="cv2.setNumThreads value (a DataLoader worker uses 1)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(args.cv2_threads)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root:
            root = pathlib.Path(args.data_root)
        else:
            print(f"generating {args.images} toy images of 1024x2048 ...", flush=True)
            root = generate_toy_cityscapes(tmp, n_train=args.images, n_val=0, height=1024,
                                           width=2048)
        rows = benchmark(root, args.samples)
    title = f"one worker, torch 1 thread, cv2.setNumThreads({args.cv2_threads})"
    print(tabulate(rows, tablefmt="github", headers=[title, ""]))


if __name__ == "__main__":
    main()
