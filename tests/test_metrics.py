"""The reference's scores from the confusion matrix, each against scikit-learn on the same random
labels (with classes absent from both, and one predicted but never true), in the table, the JSON
of evaluate.py, validation's log and TensorBoard."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, jaccard_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.evaluation.metrics import confusion_matrix, format_iou_table, segmentation_metrics
from lib.models.checkpoint import save_checkpoint
from lib.models.zoo import build_model

REPO = Path(__file__).resolve().parents[1]
C = 7  # classes 5 and 6 absent from labels and predictions; class 4 only predicted


def _random_labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.choice(4, size=(3, 20, 30), p=[0.6, 0.25, 0.1, 0.05])
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 5, truth.shape))
    truth[0, :2] = 255  # ignored pixels
    return truth, pred


def _sklearn_scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    valid = truth != 255
    y, p = truth[valid], pred[valid]
    labels = list(range(C))
    absent = [c for c in labels if c not in y and c not in p]
    iou = jaccard_score(y, p, labels=labels, average=None, zero_division=0.0)
    iou[absent] = np.nan
    return {
        "conf": sk_confusion_matrix(y, p, labels=labels),
        "iou": iou,
        "miou": np.nanmean(iou),
        # support-weighted IoU: the frequency-weighted IoU
        "fw_iou": jaccard_score(y, p, labels=labels, average="weighted", zero_division=0.0),
        "f1": f1_score(y, p, labels=labels, average=None, zero_division=np.nan),
        "macro_f1": f1_score(y, p, labels=labels, average="macro", zero_division=np.nan),
        "micro_f1": f1_score(y, p, labels=labels, average="micro"),
        "pixel_accuracy": accuracy_score(y, p),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_score_against_scikit_learn(seed):
    truth, pred = _random_labels(seed)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), C)
    expected = _sklearn_scores(truth, pred)
    np.testing.assert_array_equal(conf.numpy(), expected["conf"])
    got = segmentation_metrics(conf)
    np.testing.assert_allclose(got.iou, expected["iou"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got.f1, expected["f1"], rtol=1e-12, equal_nan=True)
    assert np.isnan(got.f1[5:]).all() and got.f1[4] == 0.0 and got.iou[4] == 0.0
    for name in ("miou", "fw_iou", "macro_f1", "micro_f1", "pixel_accuracy"):
        value = getattr(got, name)
        assert not np.isnan(value), name  # absent classes never make a mean NaN
        assert value == pytest.approx(expected[name], rel=1e-12), name
    empty = segmentation_metrics(np.zeros((3, 3)))
    assert np.isnan([empty.miou, empty.macro_f1, empty.pixel_accuracy]).all()


def _cells(table: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in table.splitlines() if line.startswith("|")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_table_shows_each_score_of_each_mode():
    truth, pred = _random_labels(0)
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), C)
    other = torch.eye(C, dtype=torch.long) * 5
    names = [f"c{i}" for i in range(C)]
    table = format_iou_table({"ss": conf, "msf": other}, names)
    rows = _cells(table)
    expected = _sklearn_scores(truth, pred)
    assert rows["class"] == ["ss", "msf", "F1 ss", "F1 msf"]
    for c in range(5):
        assert rows[f"c{c}"][0] == f"{100 * expected['iou'][c]:.2f}"
        assert rows[f"c{c}"][2] == f"{100 * expected['f1'][c]:.2f}"
    assert rows["c5"] == ["-", "100.00", "-", "100.00"]
    assert rows["mIoU"][:2] == [f"{100 * expected['miou']:.2f}", "100.00"]
    for label, key in (("frequency-weighted IoU", "fw_iou"), ("pixel accuracy",
                       "pixel_accuracy"), ("macro F1", "macro_f1"), ("micro F1", "micro_f1")):
        assert rows[label] == [f"{100 * expected[key]:.2f}", "100.00"], label


def test_evaluate_writes_every_score_to_json(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=1, n_val=2, height=64, width=128)
    torch.manual_seed(0)
    model = build_model("bisenetv2", 19, aux_heads=False)
    ckpt = save_checkpoint(tmp_path / "m.pth", {"model": "bisenetv2", "n_classes": 19,
                                                "state_dict": model.state_dict()})
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(ckpt), "--data-root",
                           str(root), "--device", "cpu", "--num-workers", "0", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scores = json.loads(out.read_text())["modes"]["ss"]
    rows = _cells(proc.stdout)
    # the same numbers as the printed table, which the tests above check against scikit-learn
    assert f"{100 * scores['mIoU']:.2f}" == rows["mIoU"][0]
    assert f"{100 * scores['pixel_accuracy']:.2f}" == rows["pixel accuracy"][0]
    assert f"{100 * scores['macro_F1']:.2f}" == rows["macro F1"][0]
    assert f"{100 * scores['micro_F1']:.2f}" == rows["micro F1"][0]
    assert f"{100 * scores['fwIoU']:.2f}" == rows["frequency-weighted IoU"][0]
    assert scores["micro_F1"] == pytest.approx(scores["pixel_accuracy"], rel=1e-12)
    for name, value in scores["f1"].items():
        cell = rows[name][1]
        assert cell == ("-" if value is None else f"{100 * value:.2f}"), name
    valid_means = [v for v in scores["iou"].values() if v is not None]
    assert scores["mIoU"] == pytest.approx(np.mean(valid_means), rel=1e-12)
    assert re.search(r"scores written to \S*scores.json", proc.stderr + proc.stdout)
