"""mIoU of a colour-only baseline on the toy Cityscapes: each pixel gets the class whose mean
colour (over the train split) is nearest; scored on val over the classes present there. A low
value shows that the toy's classes need texture, shape and context, not colour.

    python tools/colour_baseline.py                      # generates the default toy in a temp dir
    python tools/colour_baseline.py --root data/toy_cityscapes
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import tempfile

from tabulate import tabulate

from lib.data.datasets.cityscapes import CLASS_NAMES
from lib.data.toy_cityscapes import colour_baseline_miou, generate_toy_cityscapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="toy dataset (default: generate one)")
    parser.add_argument("--n-train", type=int, default=150, help="when generating")
    parser.add_argument("--n-val", type=int, default=30, help="when generating")
    parser.add_argument("--height", type=int, default=128, help="when generating")
    parser.add_argument("--width", type=int, default=256, help="when generating")
    parser.add_argument("--seed", type=int, default=0, help="when generating")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.root:
            root, source = args.root, args.root
        else:
            root = generate_toy_cityscapes(tmp, n_train=args.n_train, n_val=args.n_val,
                                           height=args.height, width=args.width, seed=args.seed)
            source = (f"generated toy: {args.n_train} train / {args.n_val} val images of "
                      f"{args.height}x{args.width}, seed {args.seed}")
        miou, iou = colour_baseline_miou(root)
    rows = [[name, f"{100 * value:.2f}"] for name, value in zip(CLASS_NAMES, iou, strict=True)
            if value == value]  # not NaN: the class occurs in val
    print(source)
    print(tabulate(rows, headers=["class", "IoU %"], tablefmt="github"))
    print(f"colour-only baseline mIoU: {100 * miou:.2f}% over {len(rows)} classes")


if __name__ == "__main__":
    main()
