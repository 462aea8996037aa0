"""Every recipe trains through the one trainer on the CPU, writes a checkpoint that the evaluate
scripts reload; the quickstart preset runs as documented (shortened); and BiSeNetV2 overfits a
few toy images."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bisenetv2.train import QUICKSTART
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.checkpoint import load_checkpoint, load_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
MIOU = re.compile(r"\| mIoU\s+\|\s+([0-9.]+)")


def _run(*cmd: str, timeout: int = 900) -> str:
    # the timeout only guards against a hang: every run here is bounded by its iterations
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script, model, fp16", [("diss/train.py", "diss", False),
                                                 ("fp16/train.py", "bisenetv1", True)])
def test_recipe_trains_saves_and_evaluates(script, model, fp16, toy_root, tmp_path):
    out = tmp_path / "run"
    _run(script, "--pretrained", "none", "--data-root", str(toy_root), "--device", "cpu",
         "--output-dir", str(out), "--crop-size", "64", "128", "--max-iter", "3",
         "--warmup-iter", "1", "--batch-size", "2", "--num-workers", "0", "--no-eval-at-end")
    ckpt = load_checkpoint(out / "model_final.pth")
    assert ckpt["model"] == model and ckpt["iteration"] == 3 and ckpt["config"]["fp16"] is fp16
    for evaluate in ("evaluate.py", f"{model}/evaluate.py"):
        log = _run(evaluate, "--ckpt", str(out / "model_final.pth"), "--data-root",
                   str(toy_root), "--device", "cpu", "--num-workers", "0")
        assert MIOU.search(log), log


def test_quickstart_preset_generates_the_toy_data_trains_and_evaluates(tmp_path):
    # the documented command, shortened to 3 iterations and pointed at temporary folders
    overrides = {"max_iter": 3, "warmup_iter": 1, "checkpoint_every": 0,
                 "data_root": str(tmp_path / "toy"), "output_dir": str(tmp_path / "out")}
    log = _run("bisenetv2/train.py", "--quickstart", "--max-iter", "3", "--warmup-iter", "1",
               "--checkpoint-every", "0", "--data-root", overrides["data_root"],
               "--output-dir", overrides["output_dir"])
    # the preset generated the toy Cityscapes itself (150 train / 30 val images by default)
    assert len(list((tmp_path / "toy" / "leftImg8bit" / "train").rglob("*.png"))) == 150
    assert len(list((tmp_path / "toy" / "gtFine" / "val").rglob("*_labelIds.png"))) == 30
    ckpt = load_checkpoint(tmp_path / "out" / "model_final.pth")
    # every other value is the preset's (crop, scales, batch, lr, head lr, workers, ...)
    expected = {**QUICKSTART.as_flat_dict(), **overrides}
    assert ckpt["config"] == expected
    assert ckpt["iteration"] == 3 and ckpt["model"] == "bisenetv2"
    assert "iter 3/3 |" in log and "samples 24" in log  # batch 8 of the preset
    assert MIOU.search(log), log  # evaluated on the toy val split at the end
    assert (tmp_path / "out" / "example_prediction.png").is_file()
    model, _ = load_model(tmp_path / "out" / "model_final.pth")
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 128, 256)).shape == (1, 19, 128, 256)


def test_bisenetv2_overfits_a_few_toy_images(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=2, n_val=0, height=64, width=128)
    for kind in ("leftImg8bit", "gtFine"):  # validate on the training images themselves
        shutil.copytree(root / kind / "train", root / kind / "val")
    # 300 iterations whatever the machine's speed; the timeout is only a hang guard
    log = _run("bisenetv2/train.py", "--data-root", str(root), "--device", "cpu",
               "--output-dir", str(tmp_path / "run"), "--crop-size", "64", "128",
               "--scale-range", "1", "1", "--jitter", "0", "--max-iter", "300", "--warmup-iter",
               "10", "--batch-size", "2", "--lr", "0.03", "--head-lr-mult", "1",
               "--num-workers", "0", "--log-every", "50", "--checkpoint-every", "0",
               timeout=1800)
    assert "iter 300/300 |" in log
    # far above chance and the colour-only baseline (3%); thin poles limit it at 64x128
    assert float(MIOU.search(log).group(1)) > 70.0, log
