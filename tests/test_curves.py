"""curves.png by matplotlib: the figure's axes, scales, legends and plotted values, the PNG it
writes, and a training run where matplotlib cannot be imported (a real process whose
``sys.modules['matplotlib']`` is None), which skips curves.png with one log line."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import matplotlib.colors
import numpy as np
import pytest

from lib.common.curves import curves_figure, write_training_curves
from lib.data.toy_cityscapes import generate_toy_cityscapes

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = list(range(10, 101, 10))
LOSS = [10.0 / i for i in ITERATIONS]
LOSS[3] = float("nan")  # a diverged log line: left out of the log axis, not a crash
LR = [0.01 * (1 - i / 100) for i in ITERATIONS]


def test_figure_has_a_log_loss_axis_the_values_legends_and_ticks():
    figure = curves_figure(ITERATIONS, LOSS, LR, [50, 100], [0.2, 0.6], max_iter=100)
    loss_axes, lr_axes, miou_axes = figure.axes
    assert loss_axes.get_yscale() == "log" and lr_axes.get_yscale() == "linear"
    kept = [(i, v) for i, v in zip(ITERATIONS, LOSS, strict=True) if i != 40]
    np.testing.assert_allclose(loss_axes.lines[0].get_xydata(), kept)
    np.testing.assert_allclose(lr_axes.lines[0].get_xydata(), np.c_[ITERATIONS, LR])
    np.testing.assert_allclose(miou_axes.lines[0].get_xydata(), [[50, 20.0], [100, 60.0]])
    assert miou_axes.lines[0].get_marker() == "o"  # validation points are visible as points
    assert miou_axes.get_xlim() == (0.0, 100.0) and miou_axes.get_xlabel() == "iteration"
    for axes, words in ((loss_axes, "training loss"), (lr_axes, "learning rate"),
                        (miou_axes, "validation mIoU")):
        assert words in axes.get_legend().get_texts()[0].get_text()
        assert axes.get_ylabel()
        assert len(axes.get_yticks()) >= 2
    assert len(miou_axes.get_xticks()) >= 3


def test_png_has_the_expected_size_and_each_curve_in_its_panel(tmp_path):
    path = write_training_curves(tmp_path / "curves.png", ITERATIONS, LOSS, LR, [50, 100],
                                 [0.2, 0.6], max_iter=100)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
    assert image.shape == (900, 800, 3)  # 8 x 9 inches at 100 dpi
    third = image.shape[0] // 3
    for row, colour in enumerate(("tab:red", "tab:blue", "tab:green")):
        rgb = np.round(np.array(matplotlib.colors.to_rgb(colour)) * 255).astype(np.uint8)
        hits = (np.abs(image.astype(int) - rgb).sum(-1) <= 6).sum(axis=1)
        in_panel = hits[row * third:(row + 1) * third].sum()
        assert in_panel >= 50, colour
        assert in_panel >= 0.9 * hits.sum(), colour  # drawn in its own panel


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return generate_toy_cityscapes(tmp_path_factory.mktemp("toy"), n_train=2, n_val=1,
                                   height=64, width=128)


def test_training_without_matplotlib_skips_curves_once_and_says_why(toy_root, tmp_path):
    out = tmp_path / "run"
    launcher = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", launcher, "bisenetv2/train.py",
         "--data-root", str(toy_root), "--device", "cpu", "--output-dir", str(out),
         "--crop-size", "64", "128", "--max-iter", "2", "--warmup-iter", "1", "--batch-size",
         "2", "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "0",
         "--no-eval-at-end"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "train.log").read_text()
    skipped = [line for line in log.splitlines() if "curves.png skipped" in line]
    assert len(skipped) == 1, log
    assert "matplotlib cannot be imported" in skipped[0] and "pip install matplotlib" in skipped[0]
    assert not (out / "curves.png").exists()
    assert (out / "model_final.pth").is_file()
    assert list(out.glob("events.out.tfevents*"))  # TensorBoard does without matplotlib
