"""--class-weights auto|FILE: the weights from the label frequencies, the weights file, how they
combine with OHEM, and their journey through training, the checkpoint, the log and resume.

Independent computations: label files read with OpenCV and mapped with a dict here, ENet's
formula in Python floats, the OHEM selection and weighted mean in float64 NumPy, PyTorch's own
weighted cross_entropy; real training processes on the imbalanced toy set.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.data.imbalanced_toy import IMBALANCED_MAP, write_imbalanced_toy
from lib.models.checkpoint import load_checkpoint
from lib.training.class_weights import (
    count_training_pixels,
    enet_class_weights,
    read_class_weights,
)
from lib.training.config import TrainConfig, parse_config
from lib.training.loss import OhemCrossEntropy

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("imbalanced")
    return root, write_imbalanced_toy(root, n_train=6, n_val=2, height=64, width=128)


def _expected_weights(root: Path) -> list[float]:
    """Pixels per class of the training labels, read and mapped here; ENet's formula."""
    counts = [0, 0, 0, 0]
    for line in (root / "train.txt").read_text().split():
        label = cv2.imread(str(root / line.split(",")[1]), cv2.IMREAD_UNCHANGED)
        values, numbers = np.unique(label, return_counts=True)
        for raw, n in zip(values.tolist(), numbers.tolist(), strict=True):
            if raw in IMBALANCED_MAP:
                counts[IMBALANCED_MAP[raw]] += n
    total = sum(counts)
    assert counts[3] < 0.05 * total < counts[0]  # imbalanced indeed
    return [1 / math.log(1.02 + n / total) for n in counts]


def test_auto_weights_and_the_tool_follow_enet_formula(toy, tmp_path):
    root, options = toy
    expected = _expected_weights(root)
    cfg = parse_config(TrainConfig(), options)
    np.testing.assert_allclose(enet_class_weights(count_training_pixels(cfg.data)), expected,
                               rtol=1e-12)
    out = tmp_path / "weights.json"
    subprocess.run([sys.executable, "tools/compute_class_weights.py", "--dataset", "list",
                    "--data-root", str(root), "--train-list", str(root / "train.txt"),
                    "--n-classes", "4", "--label-map", str(root / "label_map.json"),
                    "--output", str(out)], cwd=REPO, check=True, capture_output=True, env=ENV)
    written = json.loads(out.read_text())
    np.testing.assert_allclose(written["weights"], expected, rtol=1e-12)
    assert read_class_weights(out, 4) == pytest.approx(expected, rel=1e-12)
    # bounded by construction: 1/ln(2.02) for a class on every pixel, 1/ln(1.02) for none
    bounds = enet_class_weights([0, 1])
    assert bounds == pytest.approx([1 / math.log(1.02), 1 / math.log(2.02)])


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "has 3 weights for 4 classes"),
    ("[1, 2, NaN, 4]", "finite and positive; class 2 has nan"),
    ('{"weights": [1, 2, 0, 4]}', "finite and positive; class 2 has 0.0"),
    ("1 2 -3 4", "finite and positive; class 2 has -3.0"),
    ("1 2 three 4", "not all values are numbers"),
    ('{"w": [1, 2, 3, 4]}', "expected a list of numbers"),
])
def test_a_bad_weights_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "w.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        read_class_weights(path, 4)


def test_weights_file_as_text_and_missing(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("# my weights\n1.5, 2\n3 # rare\n4e1\n")
    assert read_class_weights(path, 4) == (1.5, 2.0, 3.0, 40.0)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_class_weights(tmp_path / "missing.txt", 4)


def _reference_ohem(logits, labels, weights, thresh, min_kept_ratio=1 / 16, ignore=255):
    """float64: hard pixels on the unweighted CE, then sum(w_y * ce) / sum(w_y)."""
    x = logits.double().numpy().transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = labels.numpy().ravel()
    valid = y != ignore
    x, y = x[valid], y[valid]
    log_z = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    ce = log_z - x[np.arange(len(y)), y]
    n_min = max(1, int(len(y) * min_kept_ratio))
    hard = np.flatnonzero(ce > -math.log(thresh))
    if len(hard) < n_min:
        hard = np.argsort(-ce, kind="stable")[:n_min]
    w = np.asarray(weights, np.float64)[y[hard]]
    return float((w * ce[hard]).sum() / w.sum()), len(hard), ce


@pytest.mark.parametrize("thresh, branch", [(0.7, "threshold"), (0.001, "top-k")])
def test_weighted_ohem_against_float64(thresh, branch):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 24) * 2
    labels = torch.randint(0, 4, (2, 16, 24))
    labels[0, :3] = 255
    weights = [1.5, 12.9, 15.2, 32.5]
    expected, n_hard, ce = _reference_ohem(logits, labels, weights, thresh)
    n_valid = int((labels != 255).sum())
    if branch == "top-k":
        assert n_hard == max(1, n_valid // 16) and (ce > -math.log(thresh)).sum() < n_hard
        ranked = np.sort(ce)[::-1]
        assert ranked[n_hard - 1] - ranked[n_hard] > 1e-4  # the k-th largest is not a tie
    else:
        assert n_hard > n_valid // 16
    # no loss so close to the threshold or to a tie that float32 could select otherwise
    assert np.abs(ce + math.log(thresh)).min() > 1e-4
    got = OhemCrossEntropy(thresh=thresh, class_weights=weights)(logits, labels)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    unweighted = OhemCrossEntropy(thresh=thresh)(logits, labels)
    assert float(OhemCrossEntropy(thresh=thresh, class_weights=[2.0] * 4)(logits, labels)) == \
        pytest.approx(float(unweighted), rel=1e-6)
    assert float(unweighted) == pytest.approx(_reference_ohem(logits, labels, [1] * 4,
                                                              thresh)[0], rel=1e-5)


def test_weighted_ohem_with_every_pixel_hard_is_torch_weighted_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, dtype=torch.float64).float()
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[1, 0] = 255
    weights = torch.tensor([0.5, 3.0, 7.0])
    # thresh near 1: every pixel whose truth has probability below 0.999999 is hard
    got = OhemCrossEntropy(thresh=0.999999, class_weights=weights)(logits, labels)
    expected = F.cross_entropy(logits.double(), labels, weight=weights.double(),
                               ignore_index=255)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    leaf = logits.clone().requires_grad_()
    OhemCrossEntropy(thresh=0.999999, class_weights=weights)(leaf, labels).backward()
    assert torch.isfinite(leaf.grad).all()
    all_ignored = OhemCrossEntropy(class_weights=weights)(leaf, torch.full_like(labels, 255))
    assert float(all_ignored.detach()) == 0.0
    with pytest.raises(ValueError, match="finite and positive"):
        OhemCrossEntropy(class_weights=[1.0, 0.0, 2.0])


def _train(options, out, *extra):
    return subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "bisenetv2/train.py", *options,
         "--device", "cpu", "--crop-size", "64", "128", "--batch-size", "2", "--warmup-iter",
         "1", "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "1",
         "--no-eval-at-end", "--no-tensorboard", "--output-dir", str(out), *extra],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_weights_reach_the_log_and_checkpoint_and_define_the_run_on_resume(toy, tmp_path):
    root, options = toy
    expected = _expected_weights(root)
    out = tmp_path / "run"
    proc = _train(options, out, "--max-iter", "2", "--class-weights", "auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "train.log").read_text()
    line = re.search(r"class weights \(ENet: 1 / ln\(1.02 \+ class pixel frequency\)\): (.*)",
                     log)
    logged = [float(v) for v in re.findall(r"[a-z ]+ ([0-9.]+)(?:,|$)", line[1])]
    assert logged == pytest.approx(expected, rel=1e-3)  # 4 significant digits
    final = load_checkpoint(out / "model_final.pth")
    assert final["class_weights"] == pytest.approx(expected, rel=1e-12)
    assert final["config"]["class_weights"] == "auto"
    # without the weights, or with other ones, the run is not the same run
    refused = _train(options, out, "--max-iter", "3", "--resume", "auto")
    assert refused.returncode == 1
    assert "cannot resume" in refused.stderr + refused.stdout
    assert "class weights were [" in refused.stderr + refused.stdout
    other = tmp_path / "other.json"
    other.write_text(json.dumps([1.0, 2.0, 3.0, 4.0]))
    refused = _train(options, out, "--max-iter", "3", "--resume", "auto", "--class-weights",
                     str(other))
    assert refused.returncode == 1 and "cannot resume" in refused.stderr + refused.stdout
    # the same weights from a file continue the run
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"weights": final["class_weights"]}))
    resumed = _train(options, out, "--max-iter", "3", "--resume", "auto", "--class-weights",
                     str(same))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert load_checkpoint(out / "model_final.pth")["iteration"] == 3
