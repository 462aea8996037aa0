"""Evaluate a diss checkpoint: single scale, crops, multi-scale-flip (see `--help`).

    python diss/evaluate.py --ckpt res/diss/model_final.pth --mode ss msf
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lib.evaluation.command import main

if __name__ == "__main__":
    main(default_ckpt="res/diss/model_final.pth", model_name="diss")
