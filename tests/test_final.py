"""The table printed when training ends is the one `evaluate.py` prints for the saved model.

Both go through the same evaluator and the same (BatchNorm-folded) inference form; the recipe's
evaluation protocol (modes, crop, scales) travels in the checkpoint, so `evaluate.py` without
protocol options computes exactly what training printed.
"""

import os
import subprocess
import sys
from pathlib import Path

from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def _table(text: str) -> list[list[str]]:
    """Rows of the last per-class IoU table in ``text``."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| class"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|--"):
            rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def test_training_ends_with_the_numbers_evaluate_py_prints(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=4, n_val=2, height=64, width=128)
    out = tmp_path / "run"
    # V1's recipe ends with ss and mscf; small crops keep mscf cheap on toy images
    train = subprocess.run(
        [sys.executable, "bisenetv1/train.py", "--pretrained", "none", "--data-root", str(root),
         "--device", "cpu", "--output-dir", str(out), "--crop-size", "64", "128", "--max-iter",
         "2", "--warmup-iter", "1", "--batch-size", "2", "--num-workers", "0",
         "--eval-crop-size", "48", "64", "--eval-scales", "0.75", "1.25"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert train.returncode == 0, train.stderr
    trained = _table(train.stdout + train.stderr)
    assert trained[0] == ["class", "ss", "mscf", "F1 ss", "F1 mscf"]  # IoU, then F1 columns

    saved = load_checkpoint(out / "model_final.pth")["config"]
    assert list(saved["eval_crop_size"]) == [48, 64] and list(saved["eval_scales"]) == [0.75, 1.25]
    evaluated = subprocess.run(
        [sys.executable, "evaluate.py", "--ckpt", str(out / "model_final.pth"), "--data-root",
         str(root), "--mode", "ss", "mscf", "--device", "cpu", "--num-workers", "0"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert _table(evaluated.stdout) == trained  # every class, both modes, to the printed digit
    # and the protocol really was the saved one: a different crop changes the mscf column
    other = subprocess.run(
        [sys.executable, "evaluate.py", "--ckpt", str(out / "model_final.pth"), "--data-root",
         str(root), "--mode", "mscf", "--crop-size", "64", "128", "--scales", "1.0", "--device",
         "cpu", "--num-workers", "0"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert other.returncode == 0, other.stderr
    assert [row[1] for row in _table(other.stdout)] != [row[2] for row in trained]
