"""Class weights on deliberately imbalanced data: the same short run without and with
``--class-weights auto``, both evaluated the same way.

The toy (``lib.data.imbalanced_toy``): the toy street scenes reduced to background / car / person /
traffic sign (about 88 / 6 / 5 / 1% of the labelled pixels), read as custom data. Both runs use
the quickstart recipe with small crops and the same seed; only the class weights differ. Each
final model is evaluated single scale on the validation images and the table shows the
per-class IoU, the mIoU, the pixel accuracy and the macro F1 of each.

    python tools/class_weights_study.py --work-dir /tmp/cw --max-iter 300
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import os
import subprocess
import time
from pathlib import Path

from tabulate import tabulate

from lib.data.dataset import build_dataset
from lib.data.imbalanced_toy import IMBALANCED_CLASSES, write_imbalanced_toy
from lib.deployment.inference import to_inference_form
from lib.evaluation.evaluator import EvalOptions, evaluate
from lib.evaluation.metrics import segmentation_metrics
from lib.models.checkpoint import load_model
from lib.training.config import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="training seed of both runs")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    data_options = write_imbalanced_toy(work / "toy", n_train=40, n_val=12)
    common = [*data_options, "--device", "cpu", "--crop-size", "64", "128", "--scale-range",
              "0.75", "1.25", "--batch-size", "4", "--max-iter", str(args.max_iter),
              "--warmup-iter", "20", "--lr", "1e-2", "--jitter", "0", "--num-workers", "0",
              "--log-every", "25", "--checkpoint-every", "0", "--no-eval-at-end",
              "--no-tensorboard", "--seed", str(args.seed)]
    rows, cfg = [], parse_config(TrainConfig(), data_options)
    val_set = build_dataset(cfg.data, "val")
    for name, extra in (("unweighted", []), ("weighted (auto)", ["--class-weights", "auto"])):
        out = work / f"{name.split()[0]}_seed{args.seed}"
        tic = time.time()
        subprocess.run([sys.executable, "bisenetv2/train.py", *common, "--output-dir", str(out),
                        *extra], cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.time() - tic
        model = to_inference_form(load_model(out / "model_final.pth")[0])
        conf = evaluate(model, val_set, len(IMBALANCED_CLASSES), EvalOptions(modes=("ss",)),
                        device="cpu", progress=False, num_workers=0)["ss"]
        scores = segmentation_metrics(conf)
        rows.append([name, *(100 * scores.iou), 100 * scores.miou, 100 * scores.pixel_accuracy,
                     100 * scores.macro_f1, f"{seconds:.0f}"])
        print(tabulate(rows, headers=["run", *IMBALANCED_CLASSES, "mIoU", "pixel acc.",
                                      "macro F1", "s"], floatfmt=".2f"), flush=True)


if __name__ == "__main__":
    main()
