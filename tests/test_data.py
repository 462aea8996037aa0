import json

import cv2
import numpy as np
import pytest
import torch

from lib.data import (
    SegmentationDataset,
    find_folder_pairs,
    read_annotation_list,
    read_label_map,
)
from lib.transforms import EvalTransform


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


@pytest.fixture
def pair(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (12, 20, 3), np.uint8)
    label = np.tile(np.arange(20, dtype=np.uint8) % 3, (12, 1))
    return (_write(tmp_path / "a.png", image[..., ::-1]), _write(tmp_path / "a_label.png", label),
            image, label)


def test_reads_rgb_image_and_maps_labels_through_the_lut(pair):
    image_path, label_path, image, label = pair
    lut = np.full(256, 255, np.uint8)
    lut[[0, 1, 2]] = [2, 0, 1]
    dataset = SegmentationDataset([(image_path, label_path)], EvalTransform(mean=(0, 0, 0),
                                  std=(1, 1, 1)), lut, n_classes=3)
    tensor, target = dataset[0]
    assert torch.allclose(tensor, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert torch.equal(target, torch.from_numpy(lut[label]).long())
    # a (index, seed) item is accepted too (the sampler's form)
    assert torch.equal(dataset[(0, 123)][1], target)


def test_unlabelled_pair_gives_all_ignore(pair):
    dataset = SegmentationDataset([(pair[0], None)], EvalTransform())
    assert (dataset[0][1] == 255).all()


def test_errors_name_the_file(pair, tmp_path):
    image_path, label_path, _, _ = pair
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    small = _write(tmp_path / "small.png", np.zeros((5, 5), np.uint8))
    colour = _write(tmp_path / "colour.png", np.zeros((12, 20, 3), np.uint8))
    out_of_range = _write(tmp_path / "range.png", np.full((12, 20), 7, np.uint8))
    cases = [((corrupt, label_path), "cannot read image .*corrupt.png"),
             ((image_path, small), "small.png is 5x5 but image .*a.png is 20x12"),
             ((image_path, colour), "colour.png .*single-channel"),
             ((image_path, out_of_range), r"range.png has values \[7\] outside 0..2")]
    for item, message in cases:
        with pytest.raises(ValueError, match=message):
            SegmentationDataset([item], EvalTransform(), n_classes=3)[0]
    with pytest.raises(ValueError, match="empty"):
        SegmentationDataset([], EvalTransform())


def test_annotation_list_accepts_crlf_and_backslashes(pair, tmp_path):
    sub = tmp_path / "imgs" / "x"
    image = _write(sub / "b.png", np.zeros((4, 4, 3), np.uint8))
    label = _write(sub / "b_l.png", np.zeros((4, 4), np.uint8))
    listing = tmp_path / "train.txt"
    listing.write_bytes(b"a.png,a_label.png\r\n\r\nimgs\\x\\b.png, imgs\\x\\b_l.png\r\n")
    pairs = read_annotation_list(listing, tmp_path)
    assert pairs == [(pair[0], pair[1]), (image, label)]


def test_annotation_list_errors_name_file_and_line(tmp_path):
    listing = tmp_path / "bad.txt"
    listing.write_text("only_one_column.png\n")
    with pytest.raises(ValueError, match="bad.txt:1: expected 'image_path,label_path'"):
        read_annotation_list(listing, tmp_path)
    listing.write_text("\n\n")
    with pytest.raises(ValueError, match="bad.txt is empty"):
        read_annotation_list(listing, tmp_path)
    listing.write_text("x.png,y.png\n")
    with pytest.raises(FileNotFoundError, match="bad.txt:1: image .*x.png does not exist"):
        read_annotation_list(listing, tmp_path)


def test_folder_pairs_by_name(tmp_path):
    for name in ("p", "q"):
        _write(tmp_path / "images" / f"{name}.jpg", np.zeros((4, 4, 3), np.uint8))
    _write(tmp_path / "labels" / "p.png", np.zeros((4, 4), np.uint8))
    _write(tmp_path / "labels" / "q_mask.png", np.zeros((4, 4), np.uint8))
    pairs = find_folder_pairs(tmp_path / "images", tmp_path / "labels")
    assert [(i.name, lab.name) for i, lab in pairs] == [("p.jpg", "p.png"), ("q.jpg", "q_mask.png")]
    _write(tmp_path / "images" / "r.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="1 image.*have no label.*r.jpg"):
        find_folder_pairs(tmp_path / "images", tmp_path / "labels")


def test_label_map_from_json_and_csv(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"0": 255, "10": 0, "20": 1}))
    (tmp_path / "m.csv").write_text("# raw,train\n10,0\n20,1\n")
    for name in ("m.json", "m.csv"):
        lut = read_label_map(tmp_path / name)
        assert (lut[10], lut[20], lut[0], lut[5]) == (0, 1, 255, 255)
    (tmp_path / "bad.csv").write_text("10,zero\n")
    with pytest.raises(ValueError, match="bad.csv: '10' -> 'zero'"):
        read_label_map(tmp_path / "bad.csv")
