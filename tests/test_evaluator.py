"""The evaluator against an independent, plainly written implementation of the published protocol.

``reference_scores`` below re-implements, one image, one scale and one crop at a time, the
arithmetic of the public reference implementation's evaluation script that produced the published
BiSeNet tables: whole-image passes at sizes rounded up to 32 with ``align_corners=True``, logits
resized before the softmax; crops of stride ceil(2/3 crop), centred zero padding, per-crop
``exp(softmax + flipped softmax)``, overlapping crops summed. Every mode of
``lib.evaluation.evaluator`` must
give the same scores (to float rounding) and the same confusion matrices, on small random nets
and on BiSeNetV1/V2 built from published-layout state dicts, for non-square images smaller and
larger than the crop.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port
from torch import nn
from torch.utils.data import Dataset

from lib.data.datasets.cityscapes import (
    LABEL_ID_TO_TRAIN_ID,
    MEAN,
    PALETTE,
    STD,
    TRAIN_ID_TO_LABEL_ID,
)
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.evaluation.evaluator import (
    EvalOptions,
    PredictionWriter,
    centred_padding,
    crop_windows,
    evaluate,
    predict_scores,
    start_size,
    whole_image_size,
)
from lib.evaluation.metrics import confusion_matrix, format_iou_table, iou_from_confusion
from lib.models.zoo import build_model
from tests.test_models import expected_layout, random_state_from_listing

ROOT = Path(__file__).resolve().parents[1]
C = 4
SCALES = (0.5, 1.0, 1.25)
CROP = (40, 48)
# smaller than the crop in one or both dimensions, larger in both, sizes not multiples of 32
SIZES = [(36, 60), (30, 44), (50, 70), (45, 90), (70, 52)]


def conv_net(seed: int = 0) -> nn.Module:
    """A small net whose scores depend on the position inside its input (zero padding), so
    flips, crops and padding placement all change its output."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, C, 5, padding=2))
    with torch.no_grad():
        net[2].weight.mul_(3)  # livelier scores
    return net.eval()


class MemoryDataset(Dataset):
    """Map-style dataset with Cityscapes-like ``pairs`` (files need not exist)."""

    def __init__(self, images, labels, root="data"):
        self.images, self.labels = images, labels
        self.pairs = [(Path(root) / "leftImg8bit" / "val" / f"city{i % 2}" /
                       f"city{i % 2}_000000_{i:06d}_leftImg8bit.png", None)
                      for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def random_dataset(seed: int = 0, n: int = len(SIZES)) -> MemoryDataset:
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for h, w in SIZES[:n]:
        images.append(torch.randn(3, h, w, generator=gen))
        label = torch.randint(0, C, (h, w), generator=gen)
        label[torch.rand(h, w, generator=gen) < 0.1] = 255
        labels.append(label)
    return MemoryDataset(images, labels)


# ---------------------------------------------------------------- the reference protocol
def ref_logits(net, x):
    out = net(x)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def ref_whole_image(net, image, size, scales, flip):
    """ss / msf: sum over scales of softmax(resize(logits)) (+ the same for the mirror)."""
    height, width = image.shape[-2:]
    total = torch.zeros(1, ref_logits(net, image[..., :32, :32]).shape[1], *size)
    for s in scales:
        sh = math.ceil(int(s * height) / 32) * 32
        sw = math.ceil(int(s * width) / 32) * 32
        scaled = F.interpolate(image, size=(sh, sw), mode="bilinear", align_corners=True)
        logits = F.interpolate(ref_logits(net, scaled), size=size, mode="bilinear",
                               align_corners=True)
        total = total + torch.softmax(logits, dim=1)
        if flip:
            logits = torch.flip(ref_logits(net, torch.flip(scaled, dims=(3,))), dims=(3,))
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
            total = total + torch.softmax(logits, dim=1)
    return total


def ref_crop_chip(net, chip, flip):
    prob = torch.softmax(ref_logits(net, chip), dim=1)
    if flip:
        mirrored = torch.flip(ref_logits(net, torch.flip(chip, dims=(3,))), dims=(3,))
        prob = torch.exp(prob + torch.softmax(mirrored, dim=1))
    return prob


def ref_crops(net, image, crop, flip):
    """Crops of one scaled image: centred zero padding unless larger than the crop in both
    dimensions, windows every ceil(2/3 crop), the last one moved back to the border, chip scores
    summed where they overlap, padding cut off."""
    _, channels, height, width = image.shape
    crop_h, crop_w = crop
    if crop_h < height and crop_w < width:
        padded, top, left = image, 0, 0
    else:
        pad_h, pad_w = max(crop_h, height), max(crop_w, width)
        top, left = (pad_h - height) // 2, (pad_w - width) // 2
        padded = torch.zeros(1, channels, pad_h, pad_w)
        padded[:, :, top:top + height, left:left + width] = image
    full_h, full_w = padded.shape[-2:]
    stride_h, stride_w = math.ceil(crop_h * 2 / 3), math.ceil(crop_w * 2 / 3)
    rows = math.ceil((full_h - crop_h) / stride_h) + 1
    cols = math.ceil((full_w - crop_w) / stride_w) + 1
    total = None
    for i in range(rows):
        for j in range(cols):
            end_h = min(full_h, stride_h * i + crop_h)
            end_w = min(full_w, stride_w * j + crop_w)
            st_h, st_w = end_h - crop_h, end_w - crop_w
            score = ref_crop_chip(net, padded[:, :, st_h:end_h, st_w:end_w], flip)
            if total is None:
                total = torch.zeros(1, score.shape[1], full_h, full_w)
            total[:, :, st_h:end_h, st_w:end_w] += score
    return total[:, :, top:top + height, left:left + width]


def ref_crop_modes(net, image, size, scales, crop, flip):
    height, width = image.shape[-2:]
    total = 0
    for s in scales:
        scaled = F.interpolate(image, size=(int(height * s), int(width * s)), mode="bilinear",
                               align_corners=True)
        scores = ref_crops(net, scaled, crop, flip)
        total = total + F.interpolate(scores, size=size, mode="bilinear", align_corners=True)
    return total


def reference_scores(net, image, mode, scales=SCALES, crop=CROP, flip=True, short_side=None,
                     size=None):
    """Scores of ``mode`` at ``size`` (default: the image's), the reference's arithmetic."""
    size = tuple(size or image.shape[-2:])
    if short_side is not None:
        h, w = image.shape[-2:]
        new = (short_side, int(short_side / h * w)) if h < w else (int(short_side / w * h),
                                                                     short_side)
        image = F.interpolate(image, size=new, mode="bilinear", align_corners=False)
    with torch.no_grad():
        if mode == "ss":
            return ref_whole_image(net, image, size, (1.0,), False)
        if mode == "msf":
            return ref_whole_image(net, image, size, scales, flip)
        if mode == "ssc":
            return ref_crop_modes(net, image, size, (1.0,), crop, False)
        return ref_crop_modes(net, image, size, scales, crop, flip)


def published_layout_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in the published checkpoints' layout, BatchNorms made neutral (mean 0,
    variance 1, scale 1) so that a random net still predicts many classes."""
    state = random_state_from_listing(expected_layout(name), seed=seed)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.zero_()
        elif key.endswith("running_var") or (key.endswith(".weight") and value.dim() == 1):
            value.fill_(1.0)
    return state


def ref_confusion(pred, label, n=C, ignore=255):
    conf = np.zeros((n, n), np.int64)
    for t, p in zip(label.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if t != ignore:
            conf[t, p] += 1
    return conf


def ref_miou_reference_formula(conf):
    """The reference's metric: TP / (TP + FP + FN + 1), mean over every class."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    return float(np.mean(tp / (conf.sum(0) + conf.sum(1) - tp + 1)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny convolutions: thread hand-offs cost far more than the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OPTIONS = EvalOptions(modes=("ss", "ssc", "msf", "mscf"), scales=SCALES, crop_size=CROP,
                      crop_batch=3)
RUN = dict(device="cpu", progress=False, num_workers=0)


# ---------------------------------------------------------------- confusion / IoU
def test_confusion_matrix_matches_numpy_reference():
    gen = torch.Generator().manual_seed(1)
    label = torch.randint(0, 6, (2, 30, 40), generator=gen)
    label[label == 5] = 255
    pred = torch.randint(0, 5, (2, 30, 40), generator=gen)
    conf = confusion_matrix(pred, label, 5)
    assert conf.dtype == torch.int64
    np.testing.assert_array_equal(conf.numpy(), ref_confusion(pred.numpy(), label.numpy(), 5))


def test_confusion_matrix_rejects_values_outside_the_classes():
    label = torch.tensor([[0, 1, 7]])
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        confusion_matrix(torch.zeros_like(label), label, 4)


def test_iou_of_an_absent_class_is_nan_and_excluded_from_the_mean():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent in gt and prediction
    iou, miou = iou_from_confusion(conf)
    np.testing.assert_allclose(iou[:2], [3 / 4, 2 / 3])
    assert np.isnan(iou[2])
    assert miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    # predicted but never in the ground truth: IoU 0, counted
    iou, miou = iou_from_confusion(torch.tensor([[3, 1], [0, 0]]))
    assert iou.tolist() == [0.75, 0.0] and miou == pytest.approx(0.375)
    assert math.isnan(iou_from_confusion(torch.zeros(3, 3, dtype=torch.long))[1])


def test_miou_equals_the_reference_formula_when_every_class_occurs():
    # a Cityscapes-sized confusion matrix: the reference's +1 is invisible at 0.01 points
    gen = np.random.default_rng(0)
    conf = gen.integers(0, 2_000_000, (19, 19)) + np.diag(gen.integers(10**7, 10**8, 19))
    assert 100 * abs(iou_from_confusion(conf)[1] - ref_miou_reference_formula(conf)) < 1e-4


def test_format_iou_table_has_a_column_per_mode_and_dashes_for_absent_classes():
    results = {"ss": torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]),
               "msf": torch.tensor([[4, 0, 0], [0, 2, 0], [0, 0, 0]])}
    table = format_iou_table(results, ["road", "car", "train"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()]
    # IoU per mode, then F1 (2 TP / (2 TP + FP + FN)) per mode; the other scores: test_metrics
    assert rows[0] == ["class", "ss", "msf", "F1 ss", "F1 msf"]
    assert rows[2] == ["road", "75.00", "100.00", f"{100 * 6 / 7:.2f}", "100.00"]
    assert rows[3] == ["car", "66.67", "100.00", "80.00", "100.00"]
    assert rows[4] == ["train", "-", "-", "-", "-"]
    assert rows[5] == ["mIoU", f"{100 * (0.75 + 2 / 3) / 2:.2f}", "100.00", "", ""]
    with pytest.raises(ValueError, match="class names"):
        format_iou_table(results, ["road"])


# ---------------------------------------------------------------- sizes, windows, padding
def test_sizes_windows_and_padding_of_the_protocol_worked_by_hand():
    # whole-image passes: int(scale * side), rounded up to a multiple of 32
    assert whole_image_size(1024, 2048, 0.75) == (768, 1536)
    assert whole_image_size(1024, 2048, 1.75) == (1792, 3584)
    assert whole_image_size(720, 960, 1.0) == (736, 960)  # CamVid: 720 is not a multiple of 32
    assert whole_image_size(720, 960, 0.5) == (384, 480)
    assert whole_image_size(375, 500, 1.25) == (480, 640)  # int(468.75) = 468 -> 480
    # Cityscapes crops: stride ceil(1024 * 2/3) = 683, the last window moved back to the border
    assert crop_windows(1024, 2048, (1024, 1024), 2 / 3) == [(0, 0), (0, 683), (0, 1024)]
    assert crop_windows(1536, 3072, (1024, 1024), 2 / 3) == [
        (0, 0), (0, 683), (0, 1366), (0, 2048), (512, 0), (512, 683), (512, 1366), (512, 2048)]
    assert crop_windows(640, 640, (640, 640), 2 / 3) == [(0, 0)]
    # centred padding unless larger than the crop in BOTH dimensions; odd extra goes below/right
    assert centred_padding(1024, 2048, (1024, 1024)) == (0, 0, 0, 0)
    assert centred_padding(1025, 2048, (1024, 1024)) == (0, 0, 0, 0)
    assert centred_padding(501, 700, (640, 640)) == (69, 70, 0, 0)
    assert centred_padding(700, 501, (640, 640)) == (0, 0, 69, 70)
    assert centred_padding(300, 401, (512, 512)) == (106, 106, 55, 56)
    # ADE20K / COCO-Stuff start size: short side set, long side truncated
    assert start_size(500, 700, 512) == (512, 716)
    assert start_size(700, 500, 640) == (896, 640)
    assert start_size(500, 700, None) == (500, 700)


# ---------------------------------------------------------------- scores against the reference
@pytest.mark.parametrize("size", [(36, 60), (50, 70), (70, 52)])
@pytest.mark.parametrize("flip", [True, False])
def test_every_mode_equals_the_reference_arithmetic(size, flip):
    """Tolerance 1e-5 on scores of O(1-10): the pipeline batches crops and pads differently from
    the reference, so the tiny float32 conv net sums in another order; float32 rounding is
    ~1e-7 relative per operation on any x86-64 CPU (no AMX for float32), ~1e-6 after a few
    layers and the sum over scales, crops and flips."""
    net = conv_net()
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    options = EvalOptions(modes=("ss", "ssc", "msf", "mscf"), scales=SCALES, crop_size=CROP,
                          flip=flip, crop_batch=3)
    scores = predict_scores(net, image, options, C)
    for mode in options.modes:
        expected = reference_scores(net, image, mode, flip=flip)
        assert scores[mode].shape == (1, C, *size)
        torch.testing.assert_close(scores[mode], expected, rtol=1e-5, atol=1e-5, msg=mode)


def test_scores_are_made_at_the_label_size_after_a_short_side_resize():
    """Tolerance: as in test_every_mode_equals_the_reference_arithmetic."""
    net = conv_net(1)
    image = torch.randn(1, 3, 30, 44, generator=torch.Generator().manual_seed(4))
    options = EvalOptions(modes=("ss", "ssc", "msf", "mscf"), scales=(0.75, 1.0), crop_size=CROP,
                          short_side=48, crop_batch=2)
    scores = predict_scores(net, image, options, C)
    for mode in options.modes:
        expected = reference_scores(net, image, mode, scales=(0.75, 1.0), short_side=48)
        assert scores[mode].shape == (1, C, 30, 44)
        torch.testing.assert_close(scores[mode], expected, rtol=1e-5, atol=1e-5, msg=mode)


def test_crops_are_summed_not_averaged_and_padding_is_centred():
    """Closed forms: a net returning constant logits gives each pixel (number of crops covering
    it) x softmax; with flip, that times exp(2 softmax). Default float32 tolerances (1.3e-6
    relative): a softmax, an exp and sums of at most 3 terms, each correctly rounded or within
    1 ulp (1.2e-7) of it whichever vector width computes them."""

    class Constant(nn.Module):
        def forward(self, x):
            return torch.arange(C, dtype=x.dtype).view(1, C, 1, 1).expand(x.shape[0], C,
                                                                          *x.shape[-2:])

    image = torch.randn(1, 3, 30, 100)  # padded to 40 rows (5 above, 5 below), 3 column windows
    p = torch.softmax(torch.arange(C, dtype=torch.float32), 0).view(1, C, 1, 1)
    coverage = torch.zeros(30, 100)
    for left in (0, 32, 52):  # stride ceil(48 * 2/3) = 32; last window 100 - 48
        coverage[:, left:left + 48] += 1
    net = Constant().eval()
    ssc = predict_scores(net, image, EvalOptions(modes=("ssc",), crop_size=CROP), C)["ssc"]
    torch.testing.assert_close(ssc, coverage * p)
    mscf = predict_scores(net, image, EvalOptions(modes=("mscf",), scales=(1.0,),
                                                         crop_size=CROP), C)["mscf"]
    torch.testing.assert_close(mscf, coverage * torch.exp(2 * p))


def test_a_mode_does_not_depend_on_the_others_requested():
    net, image = conv_net(), torch.randn(1, 3, 50, 70)
    together = predict_scores(net, image, OPTIONS, C)
    for mode in OPTIONS.modes:
        alone = predict_scores(net, image, EvalOptions(modes=(mode,), scales=SCALES,
                                                       crop_size=CROP, crop_batch=3), C)[mode]
        assert torch.equal(alone, together[mode]), mode


@pytest.mark.parametrize("name", ["bisenetv1", "bisenetv2"])
def test_published_layout_models_equal_the_reference_in_every_mode(name):
    """BiSeNetV1 / V2 with a state dict of the published checkpoints' layout (random values):
    every mode's confusion matrix equals the reference arithmetic's, images smaller and larger
    than the crop, not multiples of 32. Exact on any CPU: pixels whose top-2 scores are within
    1e-4 relative (100x the float32 rounding of these nets) are ignored, so no argmax can flip."""
    model = build_model(name, 19)
    model.load_state_dict(published_layout_state(name, seed=5))
    model.eval()
    gen = torch.Generator().manual_seed(6)
    sizes, crop, scales = [(48, 80), (100, 150)], (64, 64), (0.75, 1.0, 1.25)
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    refs = {mode: [reference_scores(model, img[None], mode, scales=scales, crop=crop)[0]
                   for img in images] for mode in ("ss", "ssc", "msf", "mscf")}
    labels = []
    for i in range(len(images)):  # labels: the reference's own predictions, perturbed
        label = refs["msf"][i].argmax(0)
        noise = torch.rand(label.shape, generator=gen)
        label[noise < 0.3] = torch.randint(0, 19, (int((noise < 0.3).sum()),), generator=gen)
        for scores in (r[i] for r in refs.values()):  # drop pixels within float noise of a tie
            top2 = scores.topk(2, dim=0).values
            label[(top2[0] - top2[1]) < 1e-4 * top2[0]] = 255
        labels.append(label)
    dataset = MemoryDataset(images, labels)
    options = EvalOptions(modes=("ss", "ssc", "msf", "mscf"), scales=scales, crop_size=crop)
    results = evaluate(model, dataset, 19, options, **RUN)
    for mode, preds in refs.items():
        expected = sum(ref_confusion(p.argmax(0).numpy(), lab.numpy(), 19)
                       for p, lab in zip(preds, labels, strict=True))
        np.testing.assert_array_equal(results[mode].numpy(), expected, err_msg=mode)
        assert len(np.flatnonzero(expected.sum(0))) >= 3  # the nets predict several classes


@pytest.mark.parametrize("name", ["bisenetv1", "bisenetv2"])
def test_published_format_state_dict_through_the_evaluate_command(name, tmp_path):
    """`python evaluate.py --ckpt <bare state dict> --mode ss ssc msf mscf` on real PNGs prints
    per mode the mIoU that the reference arithmetic gives on the same files (to 0.01, the
    printed precision).

    Random weights of the published layout saturate the softmax: in BiSeNetV2's crop and
    multi-scale modes ~1500 pixels have top-2 scores 1 ulp apart (1.0 vs 1 - 6e-8), which float32
    rounding of another CPU or kernel may swap. Those pixels (within 1e-4 relative of a tie in
    any mode) are made void in the label PNGs, as in the test above, so the comparison holds on
    any x86-64 CPU; exact ties (equal saturated scores) are broken by the first index, alike in
    both."""
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=0, n_val=2, height=90, width=170,
                                   seed=3)
    state = published_layout_state(name, seed=8)
    ckpt = tmp_path / f"model_final_{name}_city.pth"  # a bare state dict, as published
    torch.save(state, ckpt)
    model = build_model(name, 19)
    model.load_state_dict(state)
    model.eval()
    modes = ("ss", "ssc", "msf", "mscf")
    mean, std = np.asarray(MEAN), np.asarray(STD)
    predictions = []
    for image_path in sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")):
        rgb = cv2.imread(str(image_path), cv2.IMREAD_COLOR)[..., ::-1] / 255.0
        image = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1)).float()[None]
        label_path = str(image_path).replace("leftImg8bit", "gtFine").replace(
            "gtFine.png", "gtFine_labelIds.png")
        label_ids = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        scores = {mode: reference_scores(model, image, mode, scales=(0.75, 1.25),
                                         crop=(64, 64))[0] for mode in modes}
        for mode_scores in scores.values():
            top2 = mode_scores.topk(2, dim=0).values
            near_tie = (top2[0] > top2[1]) & (top2[0] - top2[1] < 1e-4 * top2[0].abs())
            label_ids[near_tie.numpy()] = TRAIN_ID_TO_LABEL_ID[255]
        cv2.imwrite(label_path, label_ids)
        predictions.append(({m: s.argmax(0).numpy() for m, s in scores.items()},
                            LABEL_ID_TO_TRAIN_ID[label_ids]))
    done = subprocess.run(
        [sys.executable, "evaluate.py", "--ckpt", str(ckpt), "--data-root", str(root),
         "--mode", *modes, "--crop-size", "64", "64", "--scales", "0.75",
         "1.25", "--device", "cpu", "--num-workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("|")]
    # IoU columns of the modes, then their F1 columns (tests/test_metrics.py)
    assert rows[0] == ["class", *modes, *(f"F1 {mode}" for mode in modes)]
    miou_row = next(row for row in rows if row[0] == "mIoU")
    printed = dict(zip(rows[0][1:5], miou_row[1:5], strict=True))
    for mode in modes:
        conf = sum(ref_confusion(pred[mode], label, 19) for pred, label in predictions)
        tp = np.diag(conf).astype(np.float64)
        union = conf.sum(0) + conf.sum(1) - tp
        expected = 100 * np.mean(tp[union > 0] / union[union > 0])  # present classes only
        assert float(printed[mode]) == pytest.approx(expected, abs=0.01), mode


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="'mss'"):
        EvalOptions(modes=("mss",))
    with pytest.raises(ValueError, match="scales repeated"):
        EvalOptions(modes=("msf",), scales=(1.0, 1.0))
    with pytest.raises(ValueError, match="crop_stride"):
        EvalOptions(crop_stride=0)
    image = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="outputs 4 classes but n_classes=19"):
        predict_scores(conv_net(), image, EvalOptions(), 19)
    with pytest.raises(RuntimeError, match="training mode"):
        predict_scores(conv_net().train(), image, EvalOptions(), C)


# ---------------------------------------------------------------- evaluate()
def test_perfect_model_scores_one_and_an_absent_class_keeps_miou_finite():
    class ReadsTheClass(nn.Module):  # channel 0 of the image holds the class
        def forward(self, x):
            k = torch.arange(C, dtype=x.dtype).view(1, -1, 1, 1)
            return -8 * (x[:, :1] - k) ** 2

    gen = torch.Generator().manual_seed(0)
    images, labels = [], []
    for h, w in [(32, 64), (64, 96), (96, 32)]:  # multiples of 32: ss feeds them unresized
        classes = torch.randint(0, C - 1, (h // 8 + 1, w // 8 + 1), generator=gen)  # no class 3
        classes = classes.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
        image = torch.randn(3, h, w, generator=gen)
        image[0] = classes.float()
        label = classes.clone()
        label[:, :5] = 255
        images.append(image)
        labels.append(label)
    dataset = MemoryDataset(images, labels)
    results = evaluate(ReadsTheClass(), dataset, C, EvalOptions(modes=("ss",)), **RUN)
    counts = np.bincount(torch.cat([lab.ravel() for lab in labels]).numpy(), minlength=256)[:C]
    np.testing.assert_array_equal(results["ss"].numpy(), np.diag(counts))
    iou, miou = iou_from_confusion(results["ss"])
    assert np.isnan(iou[3]) and miou == 1.0


def test_saved_predictions_are_label_ids_and_round_trip(tmp_path):
    model, dataset = conv_net(), random_dataset(n=3)
    out = tmp_path / "pred"
    writer = PredictionWriter(out, label_to_id=TRAIN_ID_TO_LABEL_ID, palette=PALETTE)
    options = EvalOptions(modes=("ss", "msf"), scales=SCALES)
    results = evaluate(model, dataset, C, options, writer=writer, **RUN)
    conf = torch.zeros(C, C, dtype=torch.long)
    written = set()
    for (image_path, _), label in zip(dataset.pairs, dataset.labels, strict=True):
        path = out / image_path.parent.name / image_path.name  # <city>/<name>_leftImg8bit.png
        saved = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert saved is not None and saved.dtype == np.uint8 and saved.shape == label.shape
        written |= set(np.unique(saved).tolist())
        train_ids = torch.from_numpy(LABEL_ID_TO_TRAIN_ID[saved].astype(np.int64))
        conf += confusion_matrix(train_ids, label, C)
        colour = cv2.imread(str(tmp_path / "pred_colour" / image_path.parent.name /
                                (image_path.stem + "_colour.png")))[..., ::-1]
        np.testing.assert_array_equal(colour, PALETTE[LABEL_ID_TO_TRAIN_ID[saved]])
    assert written <= {7, 8, 11, 12} and len(written) > 1  # labelIds of trainIds 0..3
    assert torch.equal(conf, results["msf"])  # the last mode listed is saved
    assert len(list(out.rglob("*.png"))) == len(dataset)


def test_unlabelled_split_gives_predictions_only(tmp_path):
    dataset = random_dataset(n=2)
    dataset.labels = [torch.full_like(lab, 255) for lab in dataset.labels]
    results = evaluate(conv_net(), dataset, C, EvalOptions(), writer=PredictionWriter(tmp_path),
                       **RUN)
    assert int(results["ss"].sum()) == 0
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(
        p.name for p, _ in dataset.pairs)
    saved = cv2.imread(str(next(tmp_path.rglob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert saved.max() < C  # without a label_to_id the class ids are written


def test_model_mode_is_restored_and_ddp_like_wrappers_are_unwrapped():
    model = conv_net().train()
    wrapped = nn.DataParallel(model)  # moves the model to the first GPU when there is one
    results = evaluate(wrapped, random_dataset(n=1), C, EvalOptions(),
                       **dict(RUN, device=None))
    assert model.training and int(results["ss"].sum()) > 0


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = evaluate(conv_net(), random_dataset(), C, OPTIONS, **RUN)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_exactly_the_single_process_result(tmp_path):
    # Exact on any CPU: each image is predicted alone, by the same kernels, in either set-up;
    # only integer confusion counts are summed across processes.
    mp.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = evaluate(conv_net(), random_dataset(), C, OPTIONS, **RUN)
    for rank in range(2):  # 5 images: ranks take 3 and 2; both get the sum
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for mode in single:
            assert torch.equal(multi[mode], single[mode])
