import cv2
import numpy as np
import pytest
import torch

from lib.data.datasets.cityscapes import MEAN, STD
from lib.data.transforms import (
    EvalTransform,
    TrainTransform,
    colour_jitter,
    scale_crop_flip,
    to_tensor,
)

# label k <-> a colour that no bilinear blend of two neighbouring block colours can imitate
COLOURS = np.array([[20 + 45 * k, 230 - 40 * k, 60 + 30 * (k % 3)] for k in range(5)], np.uint8)


def _blocks(height=96, width=160, block=16, seed=0):
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(COLOURS), (height // block, width // block))
    label = np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)
    return COLOURS[label], label


def _denormalise(image: torch.Tensor) -> np.ndarray:
    std = torch.tensor(STD).view(3, 1, 1) * 255
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    return (image * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("seed", range(8))
def test_image_and_label_stay_aligned_through_scale_crop_flip(seed):
    image, label = _blocks()
    transform = TrainTransform(crop_size=(64, 96), scale_range=(0.3, 2.0), jitter=0.0)
    out_image, out_label = transform(image, label, np.random.default_rng(seed))
    assert out_image.shape == (3, 64, 96) and out_label.shape == (64, 96)
    assert out_image.dtype == torch.float32 and out_label.dtype == torch.int64
    pixels = _denormalise(out_image).astype(int)
    lab = out_label.numpy().astype(np.int64)
    # only pixels whose 5x5 neighbourhood has one label: block edges blend bilinearly
    padded = np.pad(lab, 2, constant_values=-1)  # unknown beyond the crop: not interior
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
    interior = (windows == lab[..., None, None]).all((-1, -2)) & (lab != 255)
    assert interior.sum() > 300
    nearest = ((pixels[..., None, :] - COLOURS[None, None].astype(int)) ** 2).sum(-1).argmin(-1)
    assert np.array_equal(nearest[interior], lab[interior])
    # padding: black image under every ignore pixel
    assert np.all(pixels[lab == 255] == 0)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("scaled, top, left", [((150, 250), 10, 30), ((48, 80), 0, 0),
                                               ((200, 333), 136, 237), ((37, 61), 3, 5)])
def test_scale_crop_flip_equals_full_resize_then_crop(scaled, top, left, flip):
    rng = np.random.default_rng(1)
    image = cv2.resize(rng.integers(0, 256, (12, 20, 3), np.uint8), (160, 96),
                       interpolation=cv2.INTER_NEAREST)
    image = cv2.add(image, rng.integers(0, 30, image.shape, np.uint8))
    label = rng.integers(0, 19, (96, 160)).astype(np.uint8)
    out_h, out_w = min(64, scaled[0] - top), min(96, scaled[1] - left)
    got_image, got_label = scale_crop_flip(image, label, scaled, top, left, (out_h, out_w), flip)
    assert got_image.shape == (out_h, out_w, 3) and got_label.shape == (out_h, out_w)
    # reference: the whole image resized, then cropped, then flipped
    ref_image = cv2.resize(image, scaled[::-1], interpolation=cv2.INTER_LINEAR)
    ref_image = ref_image[top:top + out_h, left:left + out_w]
    src_y = (np.arange(out_h) + top + 0.5) * 96 / scaled[0]  # pixel-centre nearest neighbour
    src_x = (np.arange(out_w) + left + 0.5) * 160 / scaled[1]
    # on a tie (source coordinate on a pixel border) either neighbour is right
    candidates = [label[np.clip(np.floor(src_y + dy), 0, 95).astype(int)][
        :, np.clip(np.floor(src_x + dx), 0, 159).astype(int)]
        for dy in (-1e-3, 1e-3) for dx in (-1e-3, 1e-3)]
    if flip:
        ref_image, candidates = ref_image[:, ::-1], [c[:, ::-1] for c in candidates]
    assert np.abs(got_image.astype(int) - ref_image).max() <= 2
    assert np.any([got_label == c for c in candidates], axis=0).all()
    if scaled != (48, 80):  # (exactly half size is all ties)
        clear = np.all([c == candidates[0] for c in candidates], axis=0)
        assert clear.mean() > 0.5 and np.array_equal(got_label[clear], candidates[0][clear])


def test_small_scaled_image_is_padded_with_zero_and_ignore_at_random_places():
    image, label = _blocks(64, 64)
    transform = TrainTransform(crop_size=(96, 128), scale_range=(0.5, 0.5), jitter=0.0,
                               flip_prob=0.0)
    corners = set()
    for seed in range(6):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        kept = (out_label != 255).numpy()
        rows, cols = np.flatnonzero(kept.any(1)), np.flatnonzero(kept.any(0))
        assert len(rows) == 32 and len(cols) == 32 and kept.sum() == 32 * 32  # one 32x32 block
        assert np.all(_denormalise(out_image)[~kept] == 0)  # padded black before normalising
        top, left = rows[0], cols[0]
        expected = cv2.resize(label, (32, 32), interpolation=cv2.INTER_NEAREST_EXACT)
        assert np.array_equal(out_label.numpy()[top:top + 32, left:left + 32], expected)
        corners.add((top, left))
    assert len(corners) > 1


def test_deterministic_given_the_rng_and_different_across_seeds():
    image, label = _blocks()
    transform = TrainTransform(crop_size=(64, 96))
    a = transform(image, label, np.random.default_rng(5))
    b = transform(image, label, np.random.default_rng(5))
    c = transform(image, label, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _truncate(values: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(values, 0, 255))


def _plain_brightness_contrast(image, brightness, contrast, pivot=74.0):
    """Each step on float64 values, clipped and truncated before the next one."""
    values = _truncate(image.astype(np.float64) * brightness)
    return _truncate(pivot + (values - pivot) * contrast)


def _plain_saturation(values, saturation, fused):
    """out_c = (sum_k x_k w_kc) / 3 in float32, w = 1 + 2s on the diagonal, 1 - s elsewhere.

    Summed k = 0, 1, 2. ``fused``: each product is added to the running float32 sum with a single
    rounding (a fused multiply-add, as BLAS kernels do), emulated exactly in float64: a product
    of an integer <= 255 and a float32 weight, plus a float32 sum, needs far fewer than 53 bits.
    Otherwise every product is rounded to float32 before it is added.
    """
    diagonal, off = np.float32(1 + 2 * saturation), np.float32(1 - saturation)
    out = np.empty(values.shape, np.float32)
    for c in range(3):
        weights = [diagonal if k == c else off for k in range(3)]
        total = (values[..., 0].astype(np.float32) * weights[0]).astype(np.float32)
        for k in (1, 2):
            if fused:
                total = (total.astype(np.float64) + values[..., k] * np.float64(weights[k]))
                total = total.astype(np.float32)
            else:
                total = total + values[..., k].astype(np.float32) * weights[k]
        out[..., c] = total / np.float32(3)
    return _truncate(out).astype(np.uint8)


JITTER_FACTORS = [(1.2, 0.7, 1.3), (0.7, 1.35, 0.65), (0.6, 1.4, 1.4), (1.4, 0.6, 0.6),
                  (1.0, 1.0, 1.0), (1.0, 1.3, 1.0), (0.93, 1.0, 0.71)]


@pytest.mark.parametrize("factors", JITTER_FACTORS)
def test_colour_jitter_is_the_reference_arithmetic(factors):
    # brightness x b, then contrast around the fixed grey 74, then a blend with the plain channel
    # mean, each truncated to uint8 (the reference implementation's jitter)
    brightness, contrast, saturation = factors
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), np.uint8)
    out = colour_jitter(image, brightness, contrast, saturation)
    assert out.dtype == np.uint8 and out.shape == image.shape
    values = _plain_brightness_contrast(image, brightness, contrast)
    rounded = _plain_saturation(values, saturation, fused=False)
    fused = _plain_saturation(values, saturation, fused=True)
    # The reference's float32 matrix product fuses multiply and add or not depending on the BLAS
    # kernel (they differ by 1 where the result falls on an integer, up to ~2% of the values for
    # round factors such as 1.3); ours rounds every product, the same bits on every machine and
    # thread count, so that 1 and N processes see identical training images.
    assert np.array_equal(out, rounded)
    assert np.abs(rounded.astype(int) - fused).max() <= 1
    # the test image tells the reference apart from the common alternatives
    mean_pivot = _plain_brightness_contrast(image, brightness, contrast,
                                            pivot=float(_truncate(image * brightness).mean()))
    if contrast != 1.0:
        assert np.mean(mean_pivot != values) > 0.3
    if saturation != 1.0:
        grey = values @ np.array([0.299, 0.587, 0.114])
        luma = _truncate(saturation * values + (1 - saturation) * grey[..., None])
        assert np.mean(luma != rounded) > 0.3


def test_train_transform_draws_jitter_factors_last_in_the_reference_ranges():
    image, label = _blocks()
    seed, crop = 11, (64, 96)
    # scale 1, crop inside the image, jitter 0: only the geometric part, same random draws
    plain = TrainTransform(crop_size=crop, scale_range=(1.0, 1.0), jitter=0.0)
    jittered = TrainTransform(crop_size=crop, scale_range=(1.0, 1.0), jitter=0.4)
    geometric = _denormalise(plain(image, label, np.random.default_rng(seed))[0])
    out = _denormalise(jittered(image, label, np.random.default_rng(seed))[0])
    rng = np.random.default_rng(seed)  # scale, top, left, flip, then the three factors
    rng.uniform(1.0, 1.0), rng.integers(0, 96 - 64 + 1), rng.integers(0, 160 - 96 + 1), rng.random()
    brightness, contrast, saturation = rng.uniform(0.6, 1.4, size=3)
    values = _plain_brightness_contrast(geometric, brightness, contrast)
    assert np.array_equal(out, _plain_saturation(values, saturation, fused=False))


def test_jitter_changes_colours_but_not_labels():
    image, label = _blocks()
    plain = TrainTransform(crop_size=(64, 96), jitter=0.0)(image, label, np.random.default_rng(3))
    jittered = TrainTransform(crop_size=(64, 96), jitter=0.4)(image, label,
                                                              np.random.default_rng(3))
    assert torch.equal(plain[1], jittered[1])
    assert (plain[0] - jittered[0]).abs().max() > 0.1


def test_to_tensor_and_eval_transform_normalise_at_full_resolution():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    expected = (image.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
    expected = torch.from_numpy(expected.transpose(2, 0, 1)).float()
    # float32 table against float64 arithmetic: elementwise, a few ulps of values < 3, any CPU
    assert torch.allclose(to_tensor(image, MEAN, STD), expected, atol=1e-5)
    tensor, label = EvalTransform()(image, np.arange(35, dtype=np.uint8).reshape(5, 7))
    assert tensor.shape == (3, 5, 7) and torch.allclose(tensor, expected, atol=1e-5)
    assert label.dtype == torch.int64 and label[4, 6] == 34
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_tensor(image.astype(np.float32), MEAN, STD)
