"""Data mistakes that used to pass silently: train-id PNGs where Cityscapes labelIds are read,
values that are no Cityscapes label id, JPEG EXIF rotations, and ``dataset[i]`` on every split.
Real PNG/JPEG files."""

import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lib.data.checks import check_pairs
from lib.data.dataset import build_dataset, dataset_info, dataset_pairs, read_image
from lib.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def toy(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=3, n_val=1, n_test=1, height=64,
                                   width=128)
    return TrainConfig().replace(data_root=str(root), crop_size=(64, 128), check_data=True)


def _labels(cfg, split="train"):
    return [label for _, label in dataset_pairs(cfg.data, split)]


def _check(cfg, split="train"):
    info = dataset_info(cfg.data)
    return check_pairs(dataset_pairs(cfg.data, split), cfg.data.n_classes, cfg.data.ignore_index,
    info.label_lut,
                       valid_raw=info.valid_raw, workers=1)


def test_train_id_png_given_as_labelids_is_reported_with_the_fix(toy):
    label = _labels(toy)[1]
    # what cityscapesscripts' createTrainIdLabelImgs writes, under the labelIds name
    raw = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    train_ids = LABEL_ID_TO_TRAIN_ID[raw]
    assert set(np.unique(train_ids)) <= set(range(19)) | {255} and 255 in train_ids
    cv2.imwrite(str(label), train_ids)

    (problem,) = _check(toy).problems
    assert problem.kind == "train-id label" and problem.path == str(label)
    assert "looks like a *_labelTrainIds.png" in problem.detail
    assert "--dataset folders" in problem.detail  # the fix
    with pytest.raises(ValueError, match=r"(?s)1 problem\(s\) in the train split.*labelTrainIds"):
        build_dataset(toy.data, "train", toy.train_transform(), check_labels=True)
    # reading the sample (no start-up scan) says the same, naming the file
    dataset = build_dataset(toy.data, "train", toy.train_transform(), check_labels=False)
    with pytest.raises(ValueError, match=re.escape(str(label)) + ".*labelTrainIds"):
        dataset[1]


def test_value_that_is_no_cityscapes_label_id_is_reported_with_file_and_value(toy):
    label = _labels(toy, "val")[0]
    raw = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    raw[:4, :4] = 200  # used to map silently to "ignore"
    cv2.imwrite(str(label), raw)
    (problem,) = _check(toy, "val").problems
    assert problem.kind == "unknown label id" and problem.path == str(label)
    assert "[200]" in problem.detail and "not Cityscapes label ids" in problem.detail
    dataset = build_dataset(toy.data, "val")
    with pytest.raises(ValueError, match=re.escape(str(label)) + r".*\[200\]"):
        dataset[0]


def test_genuine_labelids_pass(toy):
    assert _check(toy).ok and _check(toy, "val").ok


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment holding only the Orientation tag after the SOI marker."""
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0))
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_jpeg_exif_rotation_is_ignored_like_for_the_png_label(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), np.uint8)
    label = np.zeros((48, 64), np.uint8)
    label[:, 32:] = 1
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
        (tmp_path / "images" / split / "a.jpg").write_bytes(_with_exif_orientation(jpeg, 6))
        cv2.imwrite(str(tmp_path / "labels" / split / "a.png"), label)
    path = tmp_path / "images" / "val" / "a.jpg"
    # the tag is real: OpenCV's default reading rotates the picture to 64x48
    assert cv2.imread(str(path), cv2.IMREAD_COLOR).shape[:2] == (64, 48)
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(read_image(path), decoded)  # as stored, like the label

    cfg = TrainConfig().replace(dataset="folders", data_root=str(tmp_path), n_classes=2,
                      crop_size=(48, 64), scale_range=(1.0, 1.0))
    image_t, label_t = build_dataset(cfg.data, "val", check_labels=True)[0]
    assert image_t.shape == (3, 48, 64) and torch.equal(label_t, torch.from_numpy(label).long())
    info = dataset_info(cfg.data)
    report = check_pairs(dataset_pairs(cfg.data, "train"), 2, 255, info.label_lut,
                         decode_images=True, workers=1)
    assert report.ok, report.problems


def test_plain_integer_indexing_works_on_every_split(toy):
    for split, train in (("train", True), ("val", False), ("test", False)):
        image, label = build_dataset(toy.data, split, toy.train_transform() if train else None)[0]
        assert image.shape == (3, 64, 128) and label.shape == (64, 128)
        assert image.dtype == torch.float32 and label.dtype == torch.int64
    assert (build_dataset(toy.data, "test")[0][1] == 255).all()


def test_pytorch_floor_is_the_same_in_readme_and_requirements():
    requirement = (REPO / "requirements.txt").read_text()
    floor = re.search(r"^torch>=([\d.]+)", requirement, re.M)[1]
    assert tuple(map(int, floor.split("."))) >= (2, 5)  # onnx.export(dynamo=) came with 2.5
    assert f"PyTorch {floor}+" in (REPO / "README.md").read_text()
