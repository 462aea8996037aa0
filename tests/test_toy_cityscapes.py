import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lib.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs
from lib.data.toy_cityscapes import colour_baseline_miou, generate_toy_cityscapes

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
    subprocess.run([sys.executable, "-m", "lib.data.toy_cityscapes", "--root", str(tmp_path /
    "cli"),
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
    # road: 7 true + 4 false positives -> 7/11; car: 4 of 8 found -> 4/8 (integer counts,
    # float64 ratios: exact on any CPU)
    assert iou[0] == pytest.approx(7 / 11) and iou[13] == pytest.approx(0.5)
    assert np.isnan(iou[[i for i in range(19) if i not in (0, 13)]]).all()
    assert miou == pytest.approx((7 / 11 + 0.5) / 2)


def test_colour_alone_cannot_segment_the_toy(tmp_path):
    root = generate_toy_cityscapes(tmp_path, n_train=30, n_val=10, height=64, width=128)
    miou, iou = colour_baseline_miou(root)
    assert np.isfinite(miou) and miou < 0.4
    assert (~np.isnan(iou)).sum() >= 8


def _label_arrays(root, split="train"):
    return [cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
            for _, label in find_cityscapes_pairs(root, split)]


def test_variant_options_are_deterministic_and_reach_the_command_line(tmp_path):
    options = dict(class_colour_prob=0.5, object_density=1.5, texture_strength=0.5)
    size = dict(n_train=4, n_val=2, height=64, width=128, seed=3)
    a = generate_toy_cityscapes(tmp_path / "a", **size, **options)
    b = generate_toy_cityscapes(tmp_path / "b", **size, **options)
    default = generate_toy_cityscapes(tmp_path / "default", **size)
    subprocess.run([sys.executable, "-m", "lib.data.toy_cityscapes", "--root", str(tmp_path /
    "cli"),
                    "--n-train", "4", "--n-val", "2", "--height", "64", "--width", "128",
                    "--seed", "3", "--class-colour-prob", "0.5", "--object-density", "1.5",
                    "--texture-strength", "0.5"], cwd=REPO, check=True, capture_output=True)
    for split in ("train", "val"):
        pairs = find_cityscapes_pairs(a, split)
        assert len(pairs) == size[f"n_{split}"]
        for pair in pairs:
            for path in pair:
                rel = path.relative_to(a)
                assert path.read_bytes() == (b / rel).read_bytes()
                assert path.read_bytes() == (tmp_path / "cli" / rel).read_bytes()
    first = find_cityscapes_pairs(a, "train")[0][0].relative_to(a)
    assert (a / first).read_bytes() != (default / first).read_bytes()
    with pytest.raises(ValueError, match="class_colour_prob"):
        generate_toy_cityscapes(tmp_path / "bad", n_train=1, class_colour_prob=1.5)


def test_class_colours_make_colour_informative(tmp_path):
    size = dict(n_train=30, n_val=10, height=64, width=128, seed=7)
    shared, _ = colour_baseline_miou(generate_toy_cityscapes(tmp_path / "shared", **size))
    partly, _ = colour_baseline_miou(
        generate_toy_cityscapes(tmp_path / "partly", class_colour_prob=0.6, **size))
    mostly, _ = colour_baseline_miou(
        generate_toy_cityscapes(tmp_path / "mostly", class_colour_prob=0.9, **size))
    # measured values: about 0.04, 0.25 and 0.53
    assert shared < 0.12 and partly > shared + 0.1 and mostly > partly + 0.05


def test_object_density_and_texture_strength(tmp_path):
    size = dict(n_train=12, n_val=0, height=64, width=128, seed=5)
    objects = np.isin(np.arange(256), [17, 20, 24, 26])  # pole, sign, person, car label ids

    def object_fraction(root):
        return np.mean([objects[label].mean() for label in _label_arrays(root)])

    sparse = generate_toy_cityscapes(tmp_path / "sparse", object_density=0.5, **size)
    dense = generate_toy_cityscapes(tmp_path / "dense", object_density=2.0, **size)
    assert object_fraction(dense) > 1.3 * object_fraction(sparse)
    # texture strength changes the pixels only: same random draws, same labels
    default = generate_toy_cityscapes(tmp_path / "default", **size)
    flat = generate_toy_cityscapes(tmp_path / "flat", texture_strength=0.0, **size)
    for x, y in zip(_label_arrays(default), _label_arrays(flat), strict=True):
        assert np.array_equal(x, y)

    def sidewalk_spread(root):
        # one colour per sidewalk, so its spread within an image is tiles, light and noise
        spreads = []
        for (image_path, _), label in zip(find_cityscapes_pairs(root, "train"),
                                          _label_arrays(root), strict=True):
            if (label == 8).sum() > 50:
                pixels = cv2.imread(str(image_path))[label == 8].astype(float)
                spreads.append(pixels.std(0).mean())  # per channel, then averaged
        return np.mean(spreads)

    spread = [sidewalk_spread(default), sidewalk_spread(flat)]
    assert spread[1] < 0.8 * spread[0]
