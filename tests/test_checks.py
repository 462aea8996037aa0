import cv2
import numpy as np
import pytest

from lib.data.checks import check_pairs, compute_mean_std, image_size


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


@pytest.fixture
def good_pairs(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(3):
        image = _write(tmp_path / f"img{i}.png", rng.integers(0, 255, (20, 30, 3), np.uint8))
        label = _write(tmp_path / f"lab{i}.png", rng.integers(0, 3, (20, 30), np.uint8))
        pairs.append((image, label))
    return pairs


def test_clean_dataset_counts_sizes_and_pixel_frequencies(good_pairs):
    report = check_pairs(good_pairs, n_classes=3, decode_images=True)
    assert report.ok and report.n_images == 3 and report.image_sizes == {(20, 30): 3}
    expected = sum(np.bincount(cv2.imread(str(lab), 0).ravel(), minlength=256)
                   for _, lab in good_pairs)
    assert np.array_equal(report.train_id_pixels, expected)


def test_each_problem_is_found_and_names_the_file(good_pairs, tmp_path):
    (img0, lab0), (img1, lab1), (img2, lab2) = good_pairs
    _write(lab0, np.full((20, 30), 7, np.uint8))  # out of range for 3 classes
    _write(lab1, np.zeros((10, 30), np.uint8))  # wrong size
    img2.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # corrupt image
    colour = _write(tmp_path / "colour.png", np.zeros((20, 30, 3), np.uint8))
    missing = tmp_path / "missing.png"
    pairs = [*good_pairs, (img0, colour), (img1, missing), (img1, lab1)]
    report = check_pairs(pairs, n_classes=3, decode_images=True)
    found = {(p.kind, p.path) for p in report.problems}
    assert ("label out of range", str(lab0)) in found
    assert ("size mismatch", str(lab1)) in found
    assert ("unreadable image", str(img2)) in found
    assert ("colour label", str(colour)) in found
    assert ("missing label", str(missing)) in found
    assert ("duplicate image", str(img1)) in found and ("duplicate label", str(lab1)) in found
    out_of_range = next(p for p in report.problems if p.kind == "label out of range")
    assert "[7]" in out_of_range.detail and "--n-classes" in out_of_range.detail


def test_ignore_index_and_label_map_are_respected(good_pairs):
    _write(good_pairs[0][1], np.full((20, 30), 255, np.uint8))
    assert check_pairs(good_pairs, n_classes=3, ignore_index=255).ok
    # raw values 0..2 mapped to 10..12 would be out of range; mapped to 0..2 they are fine
    lut = np.full(256, 255, np.uint8)
    lut[[0, 1, 2]] = [10, 11, 12]
    assert not check_pairs(good_pairs, n_classes=3, label_lut=lut).ok
    lut[[0, 1, 2]] = [2, 1, 0]
    assert check_pairs(good_pairs, n_classes=3, label_lut=lut).ok


def test_empty_split_is_a_problem():
    report = check_pairs([], n_classes=3, split="val")
    assert [(p.kind, p.path) for p in report.problems] == [("empty split", "val")]


def test_header_sizes_match_decoded_sizes(tmp_path):
    image = np.zeros((37, 53, 3), np.uint8)
    for ext in ("png", "jpg", "bmp"):
        assert image_size(_write(tmp_path / f"a.{ext}", image)) == (37, 53)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff")
    assert image_size(tmp_path / "bad.jpg") is None


def test_mean_std_equal_a_direct_computation(good_pairs):
    images = [p[0] for p in good_pairs]
    mean, std = compute_mean_std(images)
    pixels = np.concatenate([cv2.imread(str(p))[..., ::-1].reshape(-1, 3) / 255 for p in images])
    # float64 sums, reported rounded to 4 decimals: the rounding (5e-5) is the difference
    assert np.allclose(mean, pixels.mean(0), atol=1e-4)
    assert np.allclose(std, pixels.std(0), atol=1e-4)
