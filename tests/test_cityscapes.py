import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from lib.common.visualize import colourise
from lib.data.datasets.cityscapes import (
    CLASS_NAMES,
    LABEL_ID_TO_TRAIN_ID,
    PALETTE,
    TRAIN_ID_TO_LABEL_ID,
    find_cityscapes_pairs,
)
from lib.data.palette import cityscapes_palette, make_palette


def test_label_table_equals_the_official_one_for_every_id():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    for label in labels.labels:  # ids 0..33 and -1 (stored as 255 in uint8)
        train_id = 255 if label.trainId in (-1, 255) else label.trainId
        assert LABEL_ID_TO_TRAIN_ID[label.id & 0xFF] == train_id, label.name
        if train_id != 255:
            assert CLASS_NAMES[train_id] == label.name
            assert tuple(PALETTE[train_id]) == label.color
            assert TRAIN_ID_TO_LABEL_ID[train_id] == label.id
    assert np.all(LABEL_ID_TO_TRAIN_ID[34:] == 255)


def _touch(path, shape=(4, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros(shape, np.uint8))


def test_pairs_are_sorted_and_matched(tmp_path):
    for city, name in [("zurich", "zurich_000001_000019"), ("aachen", "aachen_000000_000019"),
                       ("aachen", "aachen_000002_000019")]:
        _touch(tmp_path / "leftImg8bit/train" / city / f"{name}_leftImg8bit.png")
        _touch(tmp_path / "gtFine/train" / city / f"{name}_gtFine_labelIds.png")
    pairs = find_cityscapes_pairs(tmp_path, "train")
    assert [p[0].name for p in pairs] == ["aachen_000000_000019_leftImg8bit.png",
                                          "aachen_000002_000019_leftImg8bit.png",
                                          "zurich_000001_000019_leftImg8bit.png"]
    assert all(lab.name == img.name.replace("leftImg8bit", "gtFine_labelIds")
               for img, lab in pairs)


def test_missing_label_empty_split_and_test_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="unpack leftImg8bit_trainvaltest.zip"):
        find_cityscapes_pairs(tmp_path, "val")
    _touch(tmp_path / "leftImg8bit/val/bonn/bonn_000000_000019_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match="missing label for .*bonn_000000_000019"):
        find_cityscapes_pairs(tmp_path, "val")
    _touch(tmp_path / "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match=r"bonn_000000_000019.*and 1 more"):
        find_cityscapes_pairs(tmp_path, "val")
    (tmp_path / "leftImg8bit/train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train contains no .*expected "
                       r".*leftImg8bit/train/<city>/<name>_leftImg8bit.png and "
                       r".*gtFine/train/<city>/<name>_gtFine_labelIds.png"):
        find_cityscapes_pairs(tmp_path, "train")
    _touch(tmp_path / "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png")
    assert find_cityscapes_pairs(tmp_path, "test")[0][1] is None


def test_palettes_and_colourise():
    assert np.array_equal(cityscapes_palette(), PALETTE) and cityscapes_palette() is not PALETTE
    assert np.array_equal(make_palette(19), PALETTE)
    for n in (1, 3, 150, 256):
        palette = make_palette(n)
        assert palette.shape == (n, 3) and palette.dtype == np.uint8
        assert len({tuple(c) for c in palette}) == n  # distinct colours
        assert not (palette == 0).all(1).any()  # black is the ignore colour
        assert np.array_equal(palette, make_palette(n))  # deterministic
    label = np.array([[0, 1, 255], [2, 1, 7]], np.uint8)
    palette = make_palette(3)
    rgb = colourise(label, palette)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for (y, x), value in np.ndenumerate(label):
        expected = palette[value] if value < 3 else (0, 0, 0)  # ignore / unknown id: black
        assert tuple(rgb[y, x]) == tuple(expected)
    assert tuple(colourise(label, palette, ignore_index=1)[0, 1]) == (0, 0, 0)


def test_product_does_not_need_cityscapesscripts():
    code = ("import sys; sys.modules['cityscapesscripts'] = None\n"
            "import lib.data.datasets.cityscapes, lib.data.dataset, lib.data.toy_cityscapes, "
            "lib.data.transforms, lib.common.visualize")
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # an import of cityscapesscripts fails here
