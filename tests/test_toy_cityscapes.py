import cv2
import numpy as np

from lib.cityscapes import LABEL_ID_TO_TRAIN_ID, find_cityscapes_pairs
from lib.toy_cityscapes import colour_baseline_miou, generate_toy_cityscapes


def test_official_layout_deterministic_and_rich_enough(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "a", n_train=12, n_val=6, height=64, width=128)
    generate_toy_cityscapes(tmp_path / "b", n_train=12, n_val=6, height=64, width=128)
    train = find_cityscapes_pairs(root, "train")
    val = find_cityscapes_pairs(root, "val")
    assert len(train) == 12 and len(val) == 6
    assert len({p[0].parent.name for p in train}) >= 2  # several cities
    label_ids, train_ids = set(), set()
    for image_path, label_path in train + val:
        image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 128, 3) and label.shape == (64, 128)
        assert label.dtype == np.uint8
        label_ids |= set(np.unique(label).tolist())
        train_ids |= set(np.unique(LABEL_ID_TO_TRAIN_ID[label]).tolist())
        twin = tmp_path / "b" / image_path.relative_to(root)
        assert image_path.read_bytes() == twin.read_bytes()  # same seed, same bytes
    assert {1, 4} & label_ids  # void label ids appear (mapped to ignore)
    assert len(train_ids - {255}) >= 8
    other = generate_toy_cityscapes(tmp_path / "c", n_train=1, n_val=0, height=64, width=128,
                                    seed=1)
    first = find_cityscapes_pairs(other, "train")[0][0]
    assert first.read_bytes() != train[0][0].read_bytes()


def test_colour_alone_cannot_segment_the_toy(tmp_path):
    root = generate_toy_cityscapes(tmp_path, n_train=30, n_val=10, height=64, width=128)
    miou, iou = colour_baseline_miou(root)
    assert np.isfinite(miou) and miou < 0.4
    assert (~np.isnan(iou)).sum() >= 8
