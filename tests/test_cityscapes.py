import cv2
import numpy as np
import pytest

from lib.cityscapes import (
    CLASS_NAMES,
    LABEL_ID_TO_TRAIN_ID,
    PALETTE,
    TRAIN_ID_TO_LABEL_ID,
    find_cityscapes_pairs,
)


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
    (tmp_path / "leftImg8bit/train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="contains no"):
        find_cityscapes_pairs(tmp_path, "train")
    _touch(tmp_path / "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png")
    assert find_cityscapes_pairs(tmp_path, "test")[0][1] is None
