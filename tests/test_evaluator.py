"""The evaluator against straightforward, independently written computations.

Models with known outputs: a per-pixel model reading the class from the image (translation
equivariant, so crops must reproduce the whole image), a variant that is not flip-symmetric (its
scores depend on the x position inside its input), and a small random conv net checked against
explicit loops over scales, flips and crops.
"""

import math
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lib.cityscapes import LABEL_ID_TO_TRAIN_ID, PALETTE, TRAIN_ID_TO_LABEL_ID
from lib.evaluator import (
    confusion_matrix,
    evaluate,
    format_iou_table,
    iou_from_confusion,
    predict_probs,
    sliding_windows,
)

C = 4
SCALES = (0.5, 1.0, 1.25)
CROP = (32, 40)
SIZES = [(48, 96), (40, 72), (48, 96), (48, 96), (44, 80)]


class PixelClassifier(nn.Module):
    """Logits ``-4 (x0 - k)^2`` for class k: channel 0 of the image encodes the class. With
    ``ramp`` the logit of class k also gets ``ramp * k * u``, u going 0 -> 1 across the input's
    width: no longer flip-symmetric."""

    def __init__(self, n_classes: int = C, ramp: float = 0.0):
        super().__init__()
        self.sharpness = nn.Parameter(torch.tensor(4.0))
        self.n_classes, self.ramp = n_classes, ramp
        self.eval()

    def forward(self, x):
        k = torch.arange(self.n_classes, dtype=x.dtype).view(1, -1, 1, 1)
        logits = -self.sharpness * (x[:, :1] - k) ** 2
        if self.ramp:
            u = torch.linspace(0, 1, x.shape[-1]).view(1, 1, 1, -1)
            logits = logits + self.ramp * k * u
        return logits


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, C, 3, padding=1))
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


def encoded_dataset(seed: int = 0) -> MemoryDataset:
    """Blocky labels written into channel 0 of the image (ignored pixels carry some class)."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for h, w in SIZES[:3]:
        blocks = torch.randint(0, C - 1, (h // 8 + 1, w // 8 + 1), generator=gen)  # class 3 absent
        classes = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w]
        image = torch.randn(3, h, w, generator=gen)
        image[0] = classes.float()
        label = classes.clone()
        label[:, :5] = 255
        images.append(image)
        labels.append(label)
    return MemoryDataset(images, labels)


# ---------------------------------------------------------------- independent reference
def ref_window_starts(size, crop, overlap):
    stride = round(crop * (1 - overlap))
    if size <= crop:
        return [0]
    starts, pos = [], 0
    while pos + crop < size:
        starts.append(pos)
        pos += stride
    return starts + [size - crop]


def ref_crop_probs(model, img, crop, overlap, mirrored):
    h, w = img.shape[-2:]
    padded = torch.zeros(1, 3, max(h, crop[0]), max(w, crop[1]))
    padded[..., :h, :w] = img
    total = torch.zeros(1, C, *padded.shape[-2:])
    count = torch.zeros(1, 1, *padded.shape[-2:])
    for top in ref_window_starts(padded.shape[-2], crop[0], CROP_OVERLAP):
        for left in ref_window_starts(padded.shape[-1], crop[1], CROP_OVERLAP):
            piece = padded[..., top:top + crop[0], left:left + crop[1]]
            if mirrored:
                p = torch.softmax(model(torch.flip(piece, [3])), 1)
                p = torch.flip(p, [3])
            else:
                p = torch.softmax(model(piece), 1)
            total[..., top:top + crop[0], left:left + crop[1]] += p
            count[..., top:top + crop[0], left:left + crop[1]] += 1
    return (total / count)[..., :h, :w]


CROP_OVERLAP = 1 / 3


def ref_probs(model, image, mode, scales=SCALES, crop=CROP, flip=True):
    """Explicit loops over scales, flips and crops."""
    height, width = image.shape[-2:]
    if mode in ("ss", "ssc"):
        scales, flips = [1.0], [False]
    else:
        flips = [False, True] if flip else [False]
    out = torch.zeros(1, C, height, width)
    with torch.no_grad():
        for s in scales:
            h, w = math.floor(height * s + 0.5), math.floor(width * s + 0.5)
            img = image
            if (h, w) != (height, width):
                img = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
            for mirrored in flips:
                if mode in ("ssc", "mscf"):
                    p = ref_crop_probs(model, img, crop, CROP_OVERLAP, mirrored)
                elif mirrored:
                    p = torch.flip(torch.softmax(model(torch.flip(img, [3])), 1), [3])
                else:
                    p = torch.softmax(model(img), 1)
                if (h, w) != (height, width):
                    p = F.interpolate(p, size=(height, width), mode="bilinear",
                                      align_corners=False)
                out += p
    return out


def ref_confusion(pred, label, n=C, ignore=255):
    conf = np.zeros((n, n), np.int64)
    for t, p in zip(label.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if t != ignore:
            conf[t, p] += 1
    return conf


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny convolutions: thread hand-offs cost far more than the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OPTS = dict(scales=SCALES, crop_size=CROP, crop_overlap=CROP_OVERLAP, flip=True, crop_batch=3)
EVAL_OPTS = dict(OPTS, device="cpu", progress=False, num_workers=0)


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


def test_format_iou_table_has_a_column_per_mode_and_dashes_for_absent_classes():
    results = {"ss": torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]),
               "msf": torch.tensor([[4, 0, 0], [0, 2, 0], [0, 0, 0]])}
    table = format_iou_table(results, ["road", "car", "train"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()]
    assert rows[0] == ["class", "ss", "msf"]
    assert rows[2] == ["road", "75.00", "100.00"]
    assert rows[3] == ["car", "66.67", "100.00"]
    assert rows[4] == ["train", "-", "-"]
    assert rows[5] == ["mIoU", f"{100 * (0.75 + 2 / 3) / 2:.2f}", "100.00"]
    with pytest.raises(ValueError, match="class names"):
        format_iou_table(results, ["road"])


# ---------------------------------------------------------------- windows and modes
@pytest.mark.parametrize(("size", "crop"), [((48, 96), (32, 40)), ((100, 23), (30, 23)),
                                            ((1024, 2048), (1024, 1024))])
def test_sliding_windows_cover_the_image_with_the_stride(size, crop):
    windows = sliding_windows(*size, crop, 1 / 3)
    covered = np.zeros(size, int)
    for top, left in windows:
        assert top + crop[0] <= size[0] and left + crop[1] <= size[1]
        covered[top:top + crop[0], left:left + crop[1]] += 1
    assert covered.min() >= 1
    tops, lefts = sorted({t for t, _ in windows}), sorted({x for _, x in windows})
    assert tops[-1] == size[0] - crop[0] and lefts[-1] == size[1] - crop[1]
    for starts, c in ((tops, crop[0]), (lefts, crop[1])):
        steps = np.diff(starts)
        assert all(s == round(c * 2 / 3) for s in steps[:-1]) and all(steps <= round(c * 2 / 3))
    if size == (1024, 2048):
        assert lefts == [0, 683, 1024] and tops == [0]


@pytest.mark.parametrize("mode", ["ss", "ssc", "msf", "mscf"])
def test_probabilities_match_the_reference_loops(mode):
    model = conv_net()
    image = torch.randn(1, 3, 48, 96, generator=torch.Generator().manual_seed(3))
    probs = predict_probs(model, image, mode, C, **OPTS)
    expected = ref_probs(model, image, mode)
    assert probs.shape == (1, C, 48, 96)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    n_terms = 1 if mode in ("ss", "ssc") else 2 * len(SCALES)
    torch.testing.assert_close(probs.sum(1), torch.full((1, 48, 96), float(n_terms)))


def test_without_flip_and_with_scale_one_msf_is_ss():
    model = conv_net()
    image = torch.randn(1, 3, 40, 72)
    ss = predict_probs(model, image, "ss", C)
    msf = predict_probs(model, image, "msf", C, scales=(1.0,), flip=False)
    assert torch.equal(ss, msf)
    expected = ref_probs(model, image, "msf", scales=(0.75, 1.5), flip=False)
    torch.testing.assert_close(
        predict_probs(model, image, "msf", C, scales=(1.5, 0.75), flip=False), expected)


@pytest.mark.parametrize("crop", [(32, 40), (64, 128), (20, 200)])  # overlap, padding, both
def test_crops_reproduce_the_whole_image_for_a_pointwise_model(crop):
    model = PixelClassifier()
    image = torch.randn(1, 3, 48, 96) * 2 + 1.5
    opts = dict(OPTS, crop_size=crop)
    whole = predict_probs(model, image, "ss", C, **opts)
    torch.testing.assert_close(predict_probs(model, image, "ssc", C, **opts), whole)
    torch.testing.assert_close(predict_probs(model, image, "mscf", C, **opts),
                               predict_probs(model, image, "msf", C, **opts))


def test_flips_are_undone():
    model = PixelClassifier(ramp=3.0)
    image = torch.randn(1, 3, 16, 24) + 1.5
    k = torch.arange(C, dtype=torch.float32).view(1, -1, 1, 1)
    u = torch.linspace(0, 1, 24).view(1, 1, 1, -1)
    base = -4 * (image[:, :1] - k) ** 2
    # the mirrored pass sees position 1 - u at the pixel that sits at u
    expected = torch.softmax(base + 3 * k * u, 1) + torch.softmax(base + 3 * k * (1 - u), 1)
    probs = predict_probs(model, image, "msf", C, scales=(1.0,), flip=True)
    torch.testing.assert_close(probs, expected)
    # crops: each (whole-image-sized) crop mirrored and flipped back, the same closed form
    probs = predict_probs(model, image, "mscf", C, scales=(1.0,), crop_size=(16, 24))
    torch.testing.assert_close(probs, expected)


def test_bad_options_are_rejected():
    image = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="'mss'"):
        predict_probs(conv_net(), image, "mss", C)
    with pytest.raises(ValueError, match="scales repeated"):
        predict_probs(conv_net(), image, "msf", C, scales=(1.0, 1.0))
    with pytest.raises(ValueError, match="outputs 4 classes but n_classes=19"):
        predict_probs(conv_net(), image, "ss", 19)
    with pytest.raises(RuntimeError, match="training mode"):
        predict_probs(conv_net().train(), image, "ss", C)


# ---------------------------------------------------------------- evaluate()
def test_identity_model_scores_perfectly_and_absent_class_keeps_miou_finite():
    dataset = encoded_dataset()
    results = evaluate(PixelClassifier(), dataset, C, modes=("ss", "ssc"), **EVAL_OPTS)
    counts = np.bincount(torch.cat([lab.ravel() for lab in dataset.labels]).numpy(),
                         minlength=256)[:C]
    for conf in results.values():
        np.testing.assert_array_equal(conf.numpy(), np.diag(counts))
        iou, miou = iou_from_confusion(conf)
        assert np.isnan(iou[3]) and miou == 1.0  # class 3 never occurs


def _reference_dataset():
    """Random images; labels random, but ignored wherever some mode's top two classes are within
    1e-4 (there the argmax of two correct computations may legitimately differ)."""
    model, dataset = conv_net(), random_dataset()
    ref_preds = {m: [] for m in ("ss", "ssc", "msf", "mscf")}
    for i, image in enumerate(dataset.images):
        ambiguous = torch.zeros(image.shape[-2:], dtype=torch.bool)
        for mode, preds in ref_preds.items():
            probs = ref_probs(model, image[None], mode)[0]
            top2 = probs.topk(2, dim=0).values
            ambiguous |= (top2[0] - top2[1]) < 1e-4
            preds.append(probs.argmax(0))
        dataset.labels[i][ambiguous] = 255
    return model, dataset, ref_preds


def test_every_mode_matches_the_reference_and_modes_share_passes_exactly():
    model, dataset, ref_preds = _reference_dataset()
    together = evaluate(model, dataset, C, modes=("ss", "ssc", "msf", "mscf"), **EVAL_OPTS)
    for mode, preds in ref_preds.items():
        expected = sum(ref_confusion(p.numpy(), lab.numpy())
                       for p, lab in zip(preds, dataset.labels, strict=True))
        np.testing.assert_array_equal(together[mode].numpy(), expected, err_msg=mode)
        assert iou_from_confusion(together[mode])[1] == pytest.approx(
            iou_from_confusion(torch.from_numpy(expected))[1])
    for mode in ("ss", "mscf"):  # alone: bit-for-bit the same as within the group
        alone = evaluate(model, dataset, C, modes=(mode,), **EVAL_OPTS)[mode]
        assert torch.equal(alone, together[mode])


def test_saved_predictions_are_label_ids_and_round_trip(tmp_path):
    model, dataset = conv_net(), random_dataset(n=3)
    out = tmp_path / "pred"
    results = evaluate(model, dataset, C, modes=("ss", "msf"), save_pred_dir=out,
                       save_colour=True, label_to_id=TRAIN_ID_TO_LABEL_ID, palette=PALETTE,
                       **EVAL_OPTS)
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
    results = evaluate(conv_net(), dataset, C, modes=("ss",), save_pred_dir=tmp_path,
                       **EVAL_OPTS)
    assert int(results["ss"].sum()) == 0
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(
        p.name for p, _ in dataset.pairs)
    saved = cv2.imread(str(next(tmp_path.rglob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert saved.max() < C  # without a label_to_id the class ids are written


def test_model_mode_is_restored_and_ddp_like_wrappers_are_unwrapped():
    model = conv_net().train()
    wrapped = nn.DataParallel(model)  # moves the model to the first GPU when there is one
    results = evaluate(wrapped, random_dataset(n=1), C, **dict(EVAL_OPTS, device=None))
    assert model.training and int(results["ss"].sum()) > 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = evaluate(conv_net(), random_dataset(), C, modes=("ss", "mscf"), **EVAL_OPTS)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_exactly_the_single_process_result(tmp_path):
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = evaluate(conv_net(), random_dataset(), C, modes=("ss", "mscf"), **EVAL_OPTS)
    for rank in range(2):  # 5 images: ranks take 3 and 2; both get the sum
        multi = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for mode in single:
            assert torch.equal(multi[mode], single[mode])
