"""Compute the RGB mean and std of a dataset's training images, for --mean/--std.

    python tools/compute_mean_std.py --dataset folders --data-root my_data
    python tools/compute_mean_std.py --dataset camvid --data-root data/camvid
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse

from lib.data.checks import compute_mean_std
from lib.data.config import DataConfig
from lib.data.dataset import dataset_pairs
from lib.data.datasets import DATASETS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cityscapes",
                        choices=[*DATASETS, "list", "folders"])
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--train-list", default=None)
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    data = DataConfig(dataset=args.dataset, data_root=args.data_root, train_list=args.train_list)
    try:
        pairs = dataset_pairs(data, args.split)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    mean, std = compute_mean_std([image for image, _ in pairs], progress=True)
    print(f"{len(pairs)} images")
    print(f"--mean {' '.join(map(str, mean))} --std {' '.join(map(str, std))}")


if __name__ == "__main__":
    main()
