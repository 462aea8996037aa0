import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lib.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs
from lib.toy_cityscapes import colour_baseline_miou, generate_toy_cityscapes

REPO = Path(__file__).resolve().parents[1]


def test_official_layout_deterministic_and_rich_enough(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "a", n_train=12, n_val=6, height=64, width=128)
    generate_toy_cityscapes(tmp_path / "b", n_train=12, n_val=6, height=64, width=128)
    train = find_cityscapes_pairs(root, "train")
    val = find_cityscapes_pairs(root, "val")
    assert len(train) == 12 and len(val) == 6
    assert len({p[0].parent.name for p in train}) >= 2  # several cities
    assert not {p[0].parent.name for p in train} & {p[0].parent.name for p in val}
    label_ids, train_ids = set(), set()
    for image_path, label_path in train + val:
        city = image_path.parent.name
        assert image_path.name.startswith(city + "_") and label_path.parent.name == city
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 128, 3) and image.dtype == np.uint8
        assert label.shape == (64, 128) and label.dtype == np.uint8
        assert label.max() <= 33  # label ids, not train ids or colours
        label_ids |= set(np.unique(label).tolist())
        train_ids |= set(np.unique(LABEL_ID_TO_TRAIN_ID[label]).tolist())
        for path in (image_path, label_path):  # same seed, same bytes
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(root)).read_bytes()
    assert {1, 4} <= label_ids  # void ids (ego vehicle, static) that map to ignore
    assert len(train_ids - {255}) >= 8
    other = generate_toy_cityscapes(tmp_path / "c", n_train=1, n_val=0, height=64, width=128,
                                    seed=1)
    first = find_cityscapes_pairs(other, "train")[0][0]
    assert first.read_bytes() != train[0][0].read_bytes()


def test_cities_test_split_and_command_line(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "a", n_train=3, n_val=1, n_test=2, height=32,
                                   width=64, cities={"train": ["ulm"], "test": ["mainz"]})
    assert {p.parent.name for p, _ in find_cityscapes_pairs(root, "train")} == {"ulm"}
    test = find_cityscapes_pairs(root, "test")
    assert len(test) == 2 and test[0][1] is None
    assert test[0][0].name == "mainz_000000_000019_leftImg8bit.png"
    assert not (root / "gtFine" / "test").exists()
    subprocess.run([sys.executable, "-m", "lib.toy_cityscapes", "--root", str(tmp_path / "cli"),
                    "--n-train", "3", "--n-val", "1", "--height", "32", "--width", "64",
                    "--train-cities", "ulm"], cwd=REPO, check=True, capture_output=True)
    for split in ("train", "val"):
        cli_pairs = find_cityscapes_pairs(tmp_path / "cli", split)
        for cli_pair, api_pair in zip(cli_pairs, find_cityscapes_pairs(root, split), strict=True):
            assert [p.read_bytes() for p in cli_pair] == [p.read_bytes() for p in api_pair]
    with pytest.raises(ValueError, match="at least one city"):
        generate_toy_cityscapes(tmp_path / "d", n_train=1, cities={"train": []})


def _write_pair(root, split, name, image, label):
    for folder, suffix, array in (("leftImg8bit", "leftImg8bit", image[..., ::-1]),
                                  ("gtFine", "gtFine_labelIds", label)):
        path = root / folder / split / "x" / f"x_{name}_{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.ascontiguousarray(array))


def test_colour_baseline_against_hand_computed_values(tmp_path):
    # road (id 7) red, car (id 26) blue on train; val has road in red, car half blue half red
    image = np.zeros((4, 4, 3), np.uint8)
    label = np.full((4, 4), 7, np.uint8)
    image[:] = (200, 0, 0)
    image[:, 2:] = (0, 0, 200)
    label[:, 2:] = 26
    label[0, 0] = 1  # ego vehicle: ignored
    _write_pair(tmp_path, "train", "a", image, label)
    val_image = image.copy()
    val_image[:2, 2:] = (190, 10, 0)  # car pixels coloured like road
    _write_pair(tmp_path, "val", "a", val_image, label)
    miou, iou = colour_baseline_miou(tmp_path)
    # road: 7 true + 4 false positives -> 7/11; car: 4 of 8 found -> 4/8
    assert iou[0] == pytest.approx(7 / 11) and iou[13] == pytest.approx(0.5)
    assert np.isnan(iou[[i for i in range(19) if i not in (0, 13)]]).all()
    assert miou == pytest.approx((7 / 11 + 0.5) / 2)


def test_colour_alone_cannot_segment_the_toy(tmp_path):
    root = generate_toy_cityscapes(tmp_path, n_train=30, n_val=10, height=64, width=128)
    miou, iou = colour_baseline_miou(root)
    assert np.isfinite(miou) and miou < 0.4
    assert (~np.isnan(iou)).sum() >= 8
