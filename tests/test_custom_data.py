"""Your own data: a two-folder dataset with 3 classes trains, evaluates and demos; bad data is
refused before training with the file named; fine-tuning across class counts; NaN losses stop."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.models import build_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def _run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def _make_folders(root: Path, n: int = 4) -> Path:
    """Images of coloured disks on a striped background: classes 0 (background), 1, 2."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, ::4] = 90
            label = np.zeros((48, 64), np.uint8)
            for cls in (1, 2):
                cy, cx = rng.integers(10, 38), rng.integers(10, 54)
                cv2.circle(label, (int(cx), int(cy)), 8, cls, -1)
            image[label == 1] = (200, 40, 40)
            image[label == 2] = (40, 40, 200)
            label[:2] = 255  # some ignored pixels
            for kind, array in (("images", image), ("labels", label)):
                path = root / kind / split / f"img{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), array)
    (root / "classes.txt").write_text("background,0,0,0\nred disk,255,0,0\nblue disk,0,0,255\n")
    return root


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["bisenetv2/train.py", "--dataset", "folders", "--data-root", str(root),
            "--n-classes", "3", "--class-names", str(root / "classes.txt"), "--device", "cpu",
            "--output-dir", str(out), "--crop-size", "48", "64", "--scale-range", "1", "1",
            "--max-iter", "4", "--warmup-iter", "1", "--batch-size", "2", "--num-workers", "0",
            *extra]


def test_three_class_folder_dataset_trains_evaluates_and_demos(tmp_path):
    root = _make_folders(tmp_path / "data")
    log = _run(*_train_args(root, tmp_path / "run")).stdout
    assert "red disk" in log and "blue disk" in log  # the IoU table uses the class names
    ckpt = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert ckpt["n_classes"] == 3 and ckpt["class_names"][1] == "red disk"
    assert ckpt["palette"][2] == [0, 0, 255]
    evaluated = _run("evaluate.py", "--ckpt", str(tmp_path / "run" / "model_final.pth"),
                     "--dataset", "folders", "--data-root", str(root), "--device", "cpu",
                     "--num-workers", "0").stdout
    assert "blue disk" in evaluated and "mIoU" in evaluated
    _run("demo.py", "--ckpt", str(tmp_path / "run" / "model_final.pth"), "--img_path",
         str(root / "images" / "val"), "--output", str(tmp_path / "demo"), "--device", "cpu",
         "--layout", "mask")
    masks = sorted((tmp_path / "demo").glob("*.png"))
    assert len(masks) == 4
    colours = {tuple(c) for c in cv2.imread(str(masks[0]))[..., ::-1].reshape(-1, 3)}
    assert colours <= {(0, 0, 0), (255, 0, 0), (0, 0, 255)}  # the dataset's own colours


def test_bad_labels_are_refused_before_training_with_the_file_named(tmp_path):
    root = _make_folders(tmp_path / "data")
    bad = root / "labels" / "train" / "img2.png"
    cv2.imwrite(str(bad), np.full((48, 64), 5, np.uint8))  # 5 is not a class of 3
    proc = _run(*_train_args(root, tmp_path / "run"), ok=False)
    out = proc.stdout + proc.stderr
    assert "label out of range" in out and "img2.png" in out and "[5]" in out
    assert "iter 1/" not in out  # refused before the first iteration
    check = _run("tools/check_dataset.py", "--dataset", "folders", "--data-root", str(root),
                 "--n-classes", "3", ok=False).stdout
    assert "img2.png" in check and "1 problem(s) found" in check


def test_finetune_across_class_counts_reinitialises_only_the_classifiers(tmp_path):
    root = _make_folders(tmp_path / "data")
    torch.manual_seed(0)
    source = build_model("bisenetv2", 19, aux_heads=True)
    save_checkpoint(tmp_path / "v2_city.pth", {"state_dict": source.state_dict()})  # bare
    log = _run(*_train_args(root, tmp_path / "run", "--finetune-from",
                            str(tmp_path / "v2_city.pth"), "--max-iter", "2",
                            "--no-eval-at-end")).stdout
    assert "class layers re-initialised for 3 classes" in log and "head.conv_out.1.weight" in log


def test_nan_loss_stops_with_iteration_and_last_checkpoint(tmp_path):
    root = _make_folders(tmp_path / "data")
    proc = _run(*_train_args(root, tmp_path / "run", "--lr", "1e12", "--max-iter", "20",
                             "--checkpoint-every", "1", "--no-eval-at-end"), ok=False)
    out = proc.stdout + proc.stderr
    assert "loss is nan" in out.lower() or "loss is inf" in out.lower(), out
    assert "last good checkpoint" in out and "checkpoint_iter" in out
    # no checkpoint is ever written from the non-finite state
    assert not (tmp_path / "run" / "model_final.pth").exists()
    saved = list((tmp_path / "run").glob("checkpoint_iter*.pth"))
    assert saved and all(torch.isfinite(t).all() for p in saved
                         for t in load_checkpoint(p)["state_dict"].values()
                         if t.is_floating_point())


@pytest.mark.parametrize("layout", ["list"])
def test_annotation_list_dataset_with_label_map(tmp_path, layout):
    root = _make_folders(tmp_path / "data")
    for split in ("train", "val"):  # raw values 10/20/30 mapped to 0/1/2 by a JSON map
        lines = []
        for i in range(4):
            label = root / "labels" / split / f"img{i}.png"
            raw = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
            mapped = np.where(raw == 255, 255, (raw.astype(int) + 1) * 10).astype(np.uint8)
            cv2.imwrite(str(root / "labels" / split / f"raw{i}.png"), mapped)
            lines.append(f"images\\\\{split}\\\\img{i}.png,labels/{split}/raw{i}.png")
        (root / f"{split}.txt").write_text("\r\n".join(lines) + "\r\n")
    (root / "map.json").write_text('{"10": 0, "20": 1, "30": 2}')
    _run("bisenetv2/train.py", "--dataset", layout, "--data-root", str(root), "--train-list",
         str(root / "train.txt"), "--val-list", str(root / "val.txt"), "--label-map",
         str(root / "map.json"), "--n-classes", "3", "--device", "cpu", "--output-dir",
         str(tmp_path / "run"), "--crop-size", "48", "64", "--max-iter", "2", "--warmup-iter",
         "1", "--batch-size", "2", "--num-workers", "0")
