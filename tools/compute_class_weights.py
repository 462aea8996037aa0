"""Compute per-class loss weights from the training labels, for --class-weights FILE.

    python tools/compute_class_weights.py --dataset folders --data-root my_data --n-classes 5 \
        --output my_data/class_weights.json
    python bisenetv2/train.py --dataset folders --data-root my_data --n-classes 5 \
        --class-weights my_data/class_weights.json

Counts every class's pixels over the training split after the dataset's label mapping (the
ignore index left out) and weighs class c by ENet's 1 / ln(1.02 + p_c), p_c its pixel frequency:
bounded between 1.42 and 50.5 (lib/training/class_weights.py says why this formula).
``--class-weights auto`` computes the same numbers at the start of training.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


from tabulate import tabulate

from lib.data.checks import dataset_parser
from lib.data.config import DataConfig, dataset_defaults
from lib.data.dataset import dataset_info
from lib.training.class_weights import (
    FORMULA,
    count_training_pixels,
    enet_class_weights,
    write_class_weights,
)


def main(argv=None) -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--n-classes", type=int, default=None,
                        help="class count (default: the named dataset's)")
    parser.add_argument("--ignore-index", type=int, default=255)
    parser.add_argument("--label-map", default=None, help="JSON/CSV raw label -> train id map")
    parser.add_argument("--class-names", default=None, help="file with one class name per line")
    parser.add_argument("--output", required=True, help="JSON file for --class-weights")
    args = parser.parse_args(argv)
    n_classes = args.n_classes or dataset_defaults(args.dataset).get("n_classes")
    if n_classes is None:
        raise SystemExit(f"error: --dataset {args.dataset} needs --n-classes")
    data = DataConfig(dataset=args.dataset, data_root=args.data_root,
                      train_list=args.train_list, n_classes=n_classes,
                      ignore_index=args.ignore_index, label_map=args.label_map,
                      class_names=args.class_names)
    try:
        names = dataset_info(data).class_names
        counts = count_training_pixels(data, progress=True)
        weights = enet_class_weights(counts)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    total = counts.sum()
    print(tabulate([[i, name, int(n), 100 * n / total, w]
                    for i, (name, n, w) in enumerate(zip(names, counts, weights, strict=True))],
                   headers=["id", "class", "pixels", "%", "weight"], floatfmt=".4g"))
    path = write_class_weights(args.output, weights, counts, names)
    print(f"weights ({FORMULA}) written to {path}; train with --class-weights {path}")


if __name__ == "__main__":
    main()
