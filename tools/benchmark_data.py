"""Training-pipeline throughput of one data-loading worker on full-size 1024x2048 PNGs.

Times, per sample and in one process with one thread (what one DataLoader worker does): decoding
the image and label PNGs, mapping label ids to train ids, and the full training transform
(random scale, crop 512x1024, flip, colour jitter, normalisation to a float tensor).

    python tools/benchmark_data.py                    # generates 8 full-size toy images first
    python tools/benchmark_data.py --data-root data   # real Cityscapes
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from lib.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs  # noqa: E402
from lib.data import read_image  # noqa: E402
from lib.toy_cityscapes import generate_toy_cityscapes  # noqa: E402
from lib.transforms import TrainTransform  # noqa: E402


def benchmark(root: pathlib.Path, n_samples: int, seed: int = 0) -> list[list]:
    pairs = find_cityscapes_pairs(root, "train")
    transform = TrainTransform(crop_size=(512, 1024), scale_range=(0.25, 2.0))
    rng = np.random.default_rng(seed)
    decode = transform_time = 0.0
    for i in range(n_samples):
        image_path, label_path = pairs[i % len(pairs)]
        start = time.perf_counter()
        image = read_image(image_path)
        label = cv2.LUT(cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED), LABEL_ID_TO_TRAIN_ID)
        middle = time.perf_counter()
        transform(image, label, rng)
        end = time.perf_counter()
        decode += middle - start
        transform_time += end - middle
    total = decode + transform_time
    size = image.shape[:2]
    return [
        ["input", f"{size[0]}x{size[1]} PNG image + label PNG"],
        ["samples", n_samples],
        ["samples/s per worker", f"{n_samples / total:.1f}"],
        ["ms per sample", f"{1000 * total / n_samples:.1f}"],
        ["decoding (image + label)", f"{100 * decode / total:.0f}%"],
        ["transform (scale, crop, flip, jitter, normalise)",
         f"{100 * transform_time / total:.0f}%"],
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None,
                        help="Cityscapes-layout root (default: generate full-size toy images)")
    parser.add_argument("--samples", type=int, default=60)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.data_root) if args.data_root else generate_toy_cityscapes(
            tmp, n_train=8, n_val=0, height=1024, width=2048)
        rows = benchmark(root, args.samples)
    print(tabulate(rows, tablefmt="github", headers=["one worker, one thread", ""]))


if __name__ == "__main__":
    main()
