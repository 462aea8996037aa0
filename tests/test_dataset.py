import json

import cv2
import numpy as np
import pytest
import torch

from lib.data.dataset import (
    SegmentationDataset,
    find_folder_pairs,
    read_annotation_list,
    read_label_map,
)
from lib.data.transforms import EvalTransform, TrainTransform


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
    # the normalisation table against a division: elementwise float32, within an ulp on any CPU
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
    wide = _write(tmp_path / "wide.png", np.zeros((12, 20), np.uint16))
    out_of_range = _write(tmp_path / "range.png", np.full((12, 20), 7, np.uint8))
    cases = [((corrupt, label_path), "cannot read image .*corrupt.png"),
             ((tmp_path / "gone.png", label_path), "cannot read image .*gone.png"),
             ((image_path, corrupt), "cannot read label .*corrupt.png"),
             ((image_path, small), "small.png is 5x5 but image .*a.png is 20x12"),
             ((image_path, colour), "colour.png .*colour image.*single-channel.*labelIds.*"
                                    "labelTrainIds"),
             ((image_path, wide), "wide.png is uint16"),
             ((image_path, out_of_range), r"range.png has values \[7\] outside 0..2")]
    for item, message in cases:
        with pytest.raises(ValueError, match=message):
            SegmentationDataset([item], EvalTransform(), n_classes=3)[0]
    with pytest.raises(ValueError, match="empty"):
        SegmentationDataset([], EvalTransform())


def test_label_values_are_checked_after_the_label_map(tmp_path):
    image = _write(tmp_path / "i.png", np.zeros((6, 9, 3), np.uint8))
    raw = np.zeros((6, 9), np.uint8)
    raw[0, :3] = [7, 26, 0]  # Cityscapes road, car, unlabeled
    label = _write(tmp_path / "l.png", raw)
    lut = np.full(256, 255, np.uint8)
    lut[7], lut[26] = 0, 13
    target = SegmentationDataset([(image, label)], EvalTransform(), lut, n_classes=19)[0][1]
    assert target[0, :3].tolist() == [0, 13, 255] and (target[1:] == 255).all()
    lut[0] = 40  # a map sending a raw value beyond the classes
    with pytest.raises(ValueError, match=r"l.png has values 0 \(-> 40\) after the label map"):
        SegmentationDataset([(image, label)], EvalTransform(), lut, n_classes=19)[0]
    # without a map, raw Cityscapes label ids are not train ids: 26 > 18 fails, 255 is fine
    with pytest.raises(ValueError, match=r"values \[26\] outside 0..18"):
        SegmentationDataset([(image, label)], EvalTransform(), None, n_classes=19)[0]
    raw[0, 1] = 255
    _write(tmp_path / "l.png", raw)
    target = SegmentationDataset([(image, label)], EvalTransform(), None, n_classes=19)[0][1]
    assert torch.equal(target, torch.from_numpy(raw).long())


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
    for name in ("p", "q", "sub/r_leftImg8bit", "a", "a_1"):
        _write(tmp_path / "images" / f"{name}.jpg", np.zeros((4, 4, 3), np.uint8))
    for name in ("p", "p_mask", "q_mask", "sub/r_gtFine_labelIds", "sub/r_gtFine_color",
                 "a_label", "a_1_label"):
        _write(tmp_path / "labels" / f"{name}.png", np.zeros((4, 4), np.uint8))
    pairs = find_folder_pairs(tmp_path / "images", tmp_path / "labels")
    got = [(i.relative_to(tmp_path / "images").as_posix(),
            lab.relative_to(tmp_path / "labels").as_posix()) for i, lab in pairs]
    assert got == [("a.jpg", "a_label.png"), ("a_1.jpg", "a_1_label.png"), ("p.jpg", "p.png"),
                   ("q.jpg", "q_mask.png"),
                   ("sub/r_leftImg8bit.jpg", "sub/r_gtFine_labelIds.png")]
    _write(tmp_path / "labels" / "q_other.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"several labels.*q.jpg \(q_mask.png, q_other.png\)"):
        find_folder_pairs(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "labels" / "q_other.png").unlink()
    _write(tmp_path / "images" / "s.jpg", np.zeros((4, 4, 3), np.uint8))
    _write(tmp_path / "images" / "t.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="2 image.*have no label.*s.jpg, .*t.png"):
        find_folder_pairs(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .*empty"):
        find_folder_pairs(tmp_path / "empty", tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match="folder not found: .*nowhere"):
        find_folder_pairs(tmp_path / "images", tmp_path / "nowhere")


def test_label_map_from_json_and_csv(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"0": 255, "10": 0, "20": 1}))
    (tmp_path / "m.csv").write_text("# raw,train\n10,0\n20,1\n")
    for name in ("m.json", "m.csv"):
        lut = read_label_map(tmp_path / name)
        assert (lut[10], lut[20], lut[0], lut[5]) == (0, 1, 255, 255)
    (tmp_path / "bad.csv").write_text("10,zero\n")
    with pytest.raises(ValueError, match="bad.csv: '10' -> 'zero'"):
        read_label_map(tmp_path / "bad.csv")


def test_seeded_item_drives_the_train_transform(pair):
    image_path, label_path, image, label = pair
    transform = TrainTransform(crop_size=(8, 16), scale_range=(0.5, 1.5))
    dataset = SegmentationDataset([(image_path, label_path)], transform, None, n_classes=3)
    for seed in (1, 2):
        got = dataset[(0, seed)]
        expected = transform(image, label, np.random.default_rng(seed))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(dataset[(0, 1)][0], dataset[(0, 2)][0])
