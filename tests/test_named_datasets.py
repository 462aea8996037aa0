"""COCO-Stuff, ADE20K and CamVid end to end from the command line, on toy trees in the official
layouts: train a few iterations with the dataset's recipe, evaluate (ss and msf, protocol and
dataset read from the checkpoint), save predictions, demo. Expected values come from tables and
arithmetic written out here, not from the code under test."""

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.data.dataset import build_dataset
from lib.data.datasets import DATASETS
from lib.data.toy import generate_toy
from lib.deployment.inference import to_inference_form
from lib.models.checkpoint import load_checkpoint, load_model
from lib.training.config import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 96  # multiples of 32: the demo feeds whole images to the model

COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_USED = [i for i in range(182) if i not in COCO_UNUSED]


def raw_to_train(name: str, raw: np.ndarray) -> np.ndarray:
    """The published label conventions, written out: 255 = ignore."""
    raw = raw.astype(np.int64)
    if name == "coco-stuff":
        out = np.full(raw.shape, 255)
        for k, used in enumerate(COCO_USED):
            out[raw == used] = k
        return out
    if name == "ade20k":
        return np.where(raw == 0, 255, raw - 1)
    return np.where(raw == 11, 255, raw)  # camvid: 11 is void


def train_to_raw(name: str, train_ids: np.ndarray) -> np.ndarray:
    if name == "coco-stuff":
        return np.asarray(COCO_USED)[train_ids]
    return train_ids + 1 if name == "ade20k" else train_ids


def reference_ss(model, image_rgb: np.ndarray, mean, std, short_side: int | None) -> np.ndarray:
    """Single-scale prediction by the published protocol: short side resized (bilinear,
    align_corners=False), size rounded up to 32 (bilinear, align_corners=True), logits back to the
    label's size (bilinear, align_corners=True)."""
    x = torch.from_numpy(image_rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    h, w = image_rgb.shape[:2]
    if short_side:
        size = (short_side, int(short_side / h * w)) if h < w else (int(short_side / w * h),
                                                                    short_side)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    padded = [-(-side // 32) * 32 for side in x.shape[-2:]]
    x = F.interpolate(x, size=padded, mode="bilinear", align_corners=True)
    with torch.inference_mode():
        logits = model(x)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
    return logits.argmax(1)[0].numpy()


def miou(preds, labels, n_classes: int) -> float:
    """Mean IoU over the classes present in the labels or the predictions, with explicit sums."""
    ious = []
    for c in range(n_classes):
        pairs = list(zip(preds, labels, strict=True))
        inter = sum(int(((p == c) & (lab == c)).sum()) for p, lab in pairs)
        union = sum(int((((p == c) | (lab == c)) & (lab != 255)).sum()) for p, lab in pairs)
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # a hang guard only
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def table_miou(output: str, mode: str) -> float:
    header = next(line for line in output.splitlines() if line.startswith("| class"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in output.splitlines() if line.startswith("| mIoU"))
    return float([c.strip() for c in row.strip("|").split("|")][columns.index(mode)]) / 100


# (dataset, training script, preset, explicit evaluation short side)
CASES = [
    ("coco-stuff", "bisenetv2/train.py", "coco", None),
    ("ade20k", "bisenetv1/train.py", "ade20k", 96),  # the recipe's 512, scaled to the toy
    ("camvid", "bisenetv2/train.py", "camvid", None),
]


@pytest.mark.parametrize(("name", "script", "preset", "short_side"), CASES,
                         ids=[c[0] for c in CASES])
def test_train_evaluate_save_and_demo_from_the_command_line(tmp_path, name, script, preset,
                                                           short_side):
    spec = DATASETS[name]
    root = generate_toy(name, tmp_path / "data", n_train=2, n_val=2, height=HEIGHT, width=WIDTH)

    # the labels reach the loss and the evaluator mapped by the dataset's published convention
    cfg = parse_config(TrainConfig(), ["--dataset", name, "--data-root", str(root)])
    assert (cfg.data.n_classes, cfg.data.mean, cfg.data.std) == (
        spec.n_classes, spec.mean, spec.std)
    val_set = build_dataset(cfg.data, "val")
    raw_labels = [cv2.imread(str(label), cv2.IMREAD_UNCHANGED) for _, label in val_set.pairs]
    for i, raw in enumerate(raw_labels):
        assert np.array_equal(val_set[i][1].numpy(), raw_to_train(name, raw))
    # training batches: whole images at scale 1, so the label is the mapped file, maybe mirrored
    cfg = parse_config(TrainConfig(), ["--dataset", name, "--data-root", str(root),
                                       "--crop-size", str(HEIGHT), str(WIDTH), "--scale-range",
                                       "1", "1"])
    train_set = build_dataset(cfg.data, "train", cfg.train_transform())
    for i, (_, label_path) in enumerate(train_set.pairs):
        expected = raw_to_train(name, cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED))
        for seed in range(3):
            label = train_set[(i, seed)][1].numpy()
            assert np.array_equal(label, expected) or np.array_equal(label, expected[:, ::-1])

    run_dir = tmp_path / "run"
    train_args = [script, "--recipe", preset, "--data-root", str(root), "--output-dir",
                  str(run_dir), "--max-iter", "2", "--batch-size", "2", "--crop-size", "64", "64",
                  "--pretrained", "none", "--warmup-iter", "1", "--num-workers", "0",
                  "--device", "cpu", "--no-fp16", "--no-eval-at-end", "--checkpoint-every", "0"]
    if short_side:
        train_args += ["--eval-short-side", str(short_side)]
    run(*train_args)
    ckpt = run_dir / "model_final.pth"
    saved = load_checkpoint(ckpt)
    assert saved["n_classes"] == spec.n_classes and saved["config"]["dataset"] == name
    assert saved["class_names"] == list(spec.class_names)
    assert np.array_equal(saved["palette"], spec.palette)

    # evaluation: dataset, data root and protocol from the checkpoint; ss saved (listed last)
    pred_dir = tmp_path / "pred"
    out = run("evaluate.py", "--ckpt", str(ckpt), "--mode", "msf", "ss", "--scales", "0.75", "1.5",
              "--device", "cpu", "--num-workers", "0", "--save-pred", str(pred_dir))
    assert f"short side {short_side}" in out if short_side else "short side" not in out
    model, meta = load_model(ckpt)
    model = to_inference_form(model)
    preds = []
    for (image_path, _), raw in zip(val_set.pairs, raw_labels, strict=True):
        rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        pred = reference_ss(model, rgb, spec.mean, spec.std, short_side)
        preds.append(pred)
        saved_pred = cv2.imread(str(pred_dir / image_path.parent.name / f"{image_path.stem}.png"),
                                cv2.IMREAD_UNCHANGED)
        assert saved_pred.shape == raw.shape
        assert np.array_equal(saved_pred, train_to_raw(name, pred))  # the dataset's own values
    labels = [raw_to_train(name, raw) for raw in raw_labels]
    # the table prints the mIoU rounded (abs 6e-5 covers it); both count the same saved labels
    assert table_miou(out, "ss") == pytest.approx(miou(preds, labels, spec.n_classes), abs=6e-5)
    assert 0 <= table_miou(out, "msf") <= 1
    for class_name in spec.class_names[:3]:  # the table names the dataset's classes
        assert re.search(rf"^\| {re.escape(class_name)} ", out, re.M)

    # demo: the dataset's colours of the prediction, and its class names
    image_path = val_set.pairs[0][0]
    out = run("demo.py", "--ckpt", str(ckpt), "--img-path", str(image_path), "--output",
              str(tmp_path / "demo"), "--layout", "mask", "--device", "cpu",
              "--runtime", "torch")  # fp32: `auto` may pick bf16 (99.5% agreement, not 100%)
    rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
         - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        pred = model(x).argmax(1)[0].numpy()
    colour = cv2.cvtColor(cv2.imread(str(tmp_path / "demo" / f"{image_path.stem}.png")),
                          cv2.COLOR_BGR2RGB)
    assert np.array_equal(colour, spec.palette[pred])
    top = np.bincount(pred.ravel()).argmax()
    assert f"{image_path.name}: {spec.class_names[top]} " in out
