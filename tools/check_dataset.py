"""Check a dataset before training: counts, sizes, label values and their pixel frequencies, and
every problem found (labels out of range, size mismatches, unreadable files, duplicates, empty
splits), each naming the file. Exit status 1 when a problem is found.

    python tools/check_dataset.py --data-root data                          # Cityscapes
    python tools/check_dataset.py --dataset ade20k --data-root data/ADEChallengeData2016
    python tools/check_dataset.py --dataset folders --data-root my_data --n-classes 3
    python tools/check_dataset.py --dataset list --train-list train.txt --val-list val.txt \\
        --data-root my_data --n-classes 5 --label-map map.json
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse

from lib.data.checks import check_pairs, format_report
from lib.data.config import DataConfig
from lib.data.dataset import dataset_info, dataset_pairs
from lib.data.datasets import DATASETS
from lib.training.config import TrainConfig, build_parser

DATA_OPTIONS = ("dataset", "data_root", "train_list", "val_list", "n_classes", "ignore_index",
                "label_map", "class_names")


def main(argv=None) -> int:
    full = build_parser(TrainConfig(), __doc__)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in full._actions:  # the data options of training, with the same names and defaults
        if action.dest in DATA_OPTIONS:
            if action.dest == "n_classes":  # left out: the named dataset's class count
                action.default = None
                action.help = "number of classes (default: the dataset's, else 19)"
            parser._add_action(action)
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--no-decode", action="store_true",
                        help="read image headers only (faster; misses corrupt image data)")
    args = parser.parse_args(argv)
    if args.n_classes is None:
        spec = DATASETS.get(args.dataset)
        args.n_classes = spec.n_classes if spec else DataConfig().n_classes
    data = DataConfig(**{k: getattr(args, k) for k in DATA_OPTIONS})
    info = dataset_info(data)
    n_problems = 0
    for split in args.splits:
        try:
            pairs = dataset_pairs(data, split)
        except (FileNotFoundError, ValueError) as exc:
            print(f"[{split}] {exc}")
            n_problems += 1
            continue
        report = check_pairs(pairs, data.n_classes, data.ignore_index, info.label_lut,
                             decode_images=not args.no_decode, progress=True, split=split,
                             valid_raw=info.valid_raw, dataset_name=data.dataset)
        print(f"[{split}] " + format_report(report, info.class_names, data.ignore_index))
        n_problems += len(report.problems)
    print("OK" if n_problems == 0 else f"{n_problems} problem(s) found")
    return 0 if n_problems == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
