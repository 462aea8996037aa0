"""mIoU of a colour-only baseline on the toy Cityscapes: each pixel gets the class whose mean
colour (over the train split) is nearest. A low value shows that the toy needs shape and context.

    python tools/colour_baseline.py                      # generates the default toy in a temp dir
    python tools/colour_baseline.py --root data/toy_cityscapes
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402

from lib.cityscapes import CLASS_NAMES  # noqa: E402
from lib.toy_cityscapes import colour_baseline_miou, generate_toy_cityscapes  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="toy dataset (default: generate one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or generate_toy_cityscapes(tmp)
        miou, iou = colour_baseline_miou(root)
    for name, value in zip(CLASS_NAMES, iou, strict=True):
        if value == value:  # not NaN: the class occurs
            print(f"{name:>14s} {100 * value:6.2f}")
    print(f"colour-only baseline mIoU: {100 * miou:.2f}%")


if __name__ == "__main__":
    main()
