import dataclasses
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lib.data.datasets import DATASETS, DatasetSpec, dataset_for_class_count, generate_palette
from lib.data.datasets.base import raw_value_table
from lib.data.toy import generate_toy

REPO = Path(__file__).resolve().parents[1]
COCO, ADE, CAMVID = DATASETS["coco-stuff"], DATASETS["ade20k"], DATASETS["camvid"]


def test_registry_class_counts_and_names():
    assert set(DATASETS) == {"cityscapes", "coco-stuff", "ade20k", "camvid"}
    for name, n in (("cityscapes", 19), ("coco-stuff", 171), ("ade20k", 150), ("camvid", 11)):
        spec = DATASETS[name]
        assert spec.name == name and spec.n_classes == n == len(set(spec.class_names))
        assert spec.palette.shape == (n, 3) and spec.palette.dtype == np.uint8
        assert len({tuple(c) for c in spec.palette}) == n
        assert not (spec.palette == 0).all(1).any()  # black is the ignore colour
        assert len(spec.mean) == len(spec.std) == 3 and spec.ignore_index == 255
    assert COCO.class_names[:3] == ("person", "bicycle", "car")
    assert COCO.class_names[79:81] == ("toothbrush", "banner") and COCO.class_names[-1] == "wood"
    assert ADE.class_names[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE.class_names[-2:] == ("clock", "flag")
    assert CAMVID.class_names == ("Sky", "Building", "Pole", "Road", "Sidewalk", "Tree",
                                  "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist")
    assert (ADE.eval_short_side, ADE.eval_crop_size) == (640, (640, 640))
    assert (COCO.eval_short_side, COCO.eval_crop_size) == (None, (640, 640))
    assert (CAMVID.eval_short_side, CAMVID.eval_crop_size) == (None, (720, 960))


def test_dataset_for_class_count():
    assert dataset_for_class_count(19).name == "cityscapes"
    assert dataset_for_class_count(171).name == "coco-stuff"
    assert dataset_for_class_count(150).name == "ade20k"
    assert dataset_for_class_count(11).name == "camvid"
    assert dataset_for_class_count(3) is None


def test_predictions_map_back_to_each_dataset_own_values():
    # train id -> raw value, written out independently of the lookup tables
    coco_used = [i for i in range(182) if i not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)]
    expected = {
        "cityscapes": [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33],
        "coco-stuff": coco_used, "ade20k": list(range(1, 151)), "camvid": list(range(11)),
    }
    for name, raw in expected.items():
        table = DATASETS[name].train_to_raw()
        assert table.dtype == np.uint8 and table[: len(raw)].tolist() == raw, name
    assert COCO.describe_raw_values() == "0..181, 255"
    assert ADE.describe_raw_values() == "0..150"


def test_coco_stuff_lut_against_plain_table():
    unused = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]  # zero-based ids without annotations
    k = 0
    for raw in range(182):
        if raw in unused:
            assert COCO.label_lut[raw] == 255, raw
        else:
            assert COCO.label_lut[raw] == k, raw
            k += 1
    assert k == 171
    assert (COCO.label_lut[182:] == 255).all()
    # a few names by their one-based COCO ids (zero-based id + 1)
    for one_based, name in ((1, "person"), (13, "stop sign"), (90, "toothbrush"), (92, "banner"),
                            (96, "building-other"), (124, "grass"), (157, "sky-other"),
                            (169, "tree"), (182, "wood")):
        assert COCO.class_names[COCO.label_lut[one_based - 1]] == name


def test_ade20k_lut_against_plain_table():
    assert ADE.label_lut[0] == 255
    for raw in range(1, 151):
        assert ADE.label_lut[raw] == raw - 1
    assert (ADE.label_lut[151:] == 255).all()
    for raw, name in ((1, "wall"), (3, "sky"), (13, "person"), (21, "car"), (150, "flag")):
        assert ADE.class_names[ADE.label_lut[raw]] == name


def test_camvid_lut_against_plain_table():
    for raw in range(11):
        assert CAMVID.label_lut[raw] == raw
    assert CAMVID.label_lut[11] == 255  # void
    assert (CAMVID.label_lut[12:] == 255).all()


def test_values_outside_each_dataset_range_are_errors():
    assert COCO.out_of_range_values(np.array([0, 11, 90, 91, 181, 255], np.uint8)) == []
    assert COCO.out_of_range_values(np.array([[182, 3], [200, 254]], np.uint8)) == [182, 200, 254]
    assert ADE.out_of_range_values(np.array([0, 1, 150], np.uint8)) == []
    assert ADE.out_of_range_values(np.array([0, 151, 255], np.uint8)) == [151, 255]
    assert CAMVID.out_of_range_values(np.array([0, 10, 11], np.uint8)) == []
    assert CAMVID.out_of_range_values(np.array([12, 255], np.uint8)) == [12, 255]
    # the table a reader applies with cv2.LUT: nonzero exactly at those values
    label = np.array([[0, 151], [150, 7]], np.uint8)
    assert cv2.LUT(label, ADE.bad_raw_table()).tolist() == [[0, 1], [0, 0]]


def test_specs_are_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CAMVID.name = "other"
    with pytest.raises(ValueError):
        CAMVID.palette[0, 0] = 1  # read-only arrays: the spec cannot be changed through them
    with pytest.raises(TypeError):
        CAMVID.splits["train"] = "elsewhere"
    fields = dict(name="x", class_names=("a", "b"), palette=generate_palette(2), mean=(0, 0, 0),
                  std=(1, 1, 1), label_lut=None, valid_raw=raw_value_table([0, 1, 255]),
                  splits={"train": "train"}, image_dir="{split}", label_dir="{split}_labels",
                  image_suffix=".png", unpack_hint="")
    assert DatasetSpec(**fields).n_classes == 2
    with pytest.raises(ValueError, match="palette"):
        DatasetSpec(**{**fields, "palette": generate_palette(3)})
    with pytest.raises(ValueError, match="distinct"):
        DatasetSpec(**{**fields, "class_names": ("a", "a")})
    bad_lut = np.full(256, 255, np.uint8)
    bad_lut[1] = 2  # a valid raw value mapped past the last class
    with pytest.raises(ValueError, match="label_lut"):
        DatasetSpec(**{**fields, "label_lut": bad_lut})


def test_generated_palettes_are_distinct_and_deterministic():
    for n in (1, 2, 11, 150, 171, 256):
        palette = generate_palette(n)
        assert palette.shape == (n, 3) and palette.dtype == np.uint8
        assert len({tuple(c) for c in palette}) == n
        assert not (palette == 0).all(1).any()
        assert np.array_equal(palette, generate_palette(n))
    # neighbouring ids differ clearly (not only in a rounding step)
    palette = generate_palette(150).astype(int)
    assert np.abs(np.diff(palette, axis=0)).sum(1).min() > 40


@pytest.mark.parametrize("name", ["coco-stuff", "ade20k", "camvid"])
def test_toy_layout_values_and_determinism(tmp_path, name):
    spec = DATASETS[name]
    n_test = 2 if name == "camvid" else 0
    root = generate_toy(name, tmp_path / "a", n_train=4, n_val=2, n_test=n_test, height=32,
                        width=48, seed=3)
    generate_toy(name, tmp_path / "b", n_train=4, n_val=2, n_test=n_test, height=32, width=48,
                 seed=3)
    other = generate_toy(name, tmp_path / "c", n_train=1, n_val=0, height=32, width=48, seed=4)
    raw_values = set()
    ego_vehicle = {"coco-stuff": 255, "ade20k": 0, "camvid": 11}[name]
    for split, count in (("train", 4), ("val", 2), ("test", n_test)):
        if not count:
            continue
        pairs = spec.find_pairs(root, split)
        image_dir, label_dir = spec.folders(root, split)
        assert len(pairs) == count and pairs == sorted(pairs)
        assert sorted(image_dir.iterdir()) == [image for image, _ in pairs]  # every image paired
        for image_path, label_path in pairs:
            assert image_path.suffix == spec.image_suffix
            assert label_path == label_dir / f"{image_path.stem}.png"
            image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
            label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
            assert image.shape == (32, 48, 3) and label.shape == (32, 48)
            assert label.dtype == np.uint8 and spec.out_of_range_values(label) == []
            raw_values |= set(np.unique(label).tolist())
            assert (label[-1] == ego_vehicle).all()  # the scenes' bottom row is void
            for path in (image_path, label_path):  # same arguments, same bytes
                assert path.read_bytes() == (tmp_path / "b" / path.relative_to(root)).read_bytes()
        if spec.image_suffix == ".jpg":
            assert pairs[0][0].read_bytes()[:2] == b"\xff\xd8"  # really JPEG
    void = {"coco-stuff": {255, 11}, "ade20k": {0}, "camvid": {11}}[name]
    assert void <= raw_values  # raw void values, mapped to ignore by the table
    train_ids = set(spec.label_lut[sorted(raw_values)].tolist())
    assert len(train_ids - {255}) >= 8
    first = spec.find_pairs(root, "train")[0][0]
    assert (other / first.relative_to(root)).read_bytes() != first.read_bytes()


def test_toy_command_line_matches_the_function(tmp_path):
    api = generate_toy("ade20k", tmp_path / "api", n_train=2, n_val=1, height=32, width=48)
    subprocess.run([sys.executable, "-m", "lib.data.toy", "--dataset", "ade20k", "--root",
                    str(tmp_path / "cli"), "--n-train", "2", "--n-val", "1", "--height", "32",
                    "--width", "48"], cwd=REPO, check=True, capture_output=True)
    files = sorted(p.relative_to(api) for p in api.rglob("*") if p.is_file())
    assert len(files) == 6
    for rel in files:
        assert (tmp_path / "cli" / rel).read_bytes() == (api / rel).read_bytes()
    with pytest.raises(ValueError, match="no test split"):
        generate_toy("ade20k", tmp_path / "x", n_train=1, n_val=0, n_test=1)
    with pytest.raises(ValueError, match="unknown dataset"):
        generate_toy("pascal", tmp_path / "x")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((4, 6), np.uint8))


def test_find_pairs_errors_name_the_layout_and_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no ade20k images at .*images/validation: "
                       r"unzip ADEChallengeData2016.zip.*expected .*images/validation/<name>"
                       r"\.jpg and .*annotations/validation/<name>\.png"):
        ADE.find_pairs(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"stuffthingmaps_trainval2017.zip"):
        COCO.find_pairs(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"trainannot/.*expected .*/train/<name>\.png "
                       r"and .*/trainannot/<name>\.png"):
        CAMVID.find_pairs(tmp_path, "train")
    (tmp_path / "images/training").mkdir(parents=True)
    _touch(tmp_path / "images/training/notes.png")  # not a .jpg: not an ADE20K image
    with pytest.raises(FileNotFoundError, match=r"images/training contains no \*\.jpg images"):
        ADE.find_pairs(tmp_path, "train")
    _touch(tmp_path / "images/training/ADE_train_00000002.jpg")
    with pytest.raises(FileNotFoundError, match=r"missing label for .*ADE_train_00000002\.jpg: "
                       r"expected .*annotations/training/ADE_train_00000002\.png$"):
        ADE.find_pairs(tmp_path, "train")
    _touch(tmp_path / "images/training/ADE_train_00000001.jpg")
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000001\.jpg.*and 1 more"):
        ADE.find_pairs(tmp_path, "train")
    _touch(tmp_path / "annotations/training/ADE_train_00000001.png")
    _touch(tmp_path / "annotations/training/ADE_train_00000002.png")
    pairs = ADE.find_pairs(tmp_path, "train")
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("ADE_train_00000001.jpg", "ADE_train_00000001.png"),
        ("ADE_train_00000002.jpg", "ADE_train_00000002.png")]
    with pytest.raises(ValueError, match="coco-stuff has no 'test' split here; splits: train, val"):
        COCO.find_pairs(tmp_path, "test")
