import numpy as np
import pytest
import torch

from lib.cityscapes import MEAN, STD
from lib.transforms import EvalTransform, TrainTransform, colour_jitter

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
    transform = TrainTransform(crop_size=(64, 96), scale_range=(0.5, 2.0), jitter=0.0)
    out_image, out_label = transform(image, label, np.random.default_rng(seed))
    assert out_image.shape == (3, 64, 96) and out_label.shape == (64, 96)
    assert out_image.dtype == torch.float32 and out_label.dtype == torch.int64
    pixels = _denormalise(out_image).astype(int)
    lab = out_label.numpy().astype(np.int64)
    # only pixels whose 5x5 neighbourhood has one label: block edges blend bilinearly
    padded = np.pad(lab, 2, constant_values=-1)  # unknown beyond the crop: not interior
    windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5))
    interior = (windows == lab[..., None, None]).all((-1, -2)) & (lab != 255)
    assert interior.sum() > 500
    nearest = ((pixels[..., None, :] - COLOURS[None, None].astype(int)) ** 2).sum(-1).argmin(-1)
    assert np.array_equal(nearest[interior], lab[interior])


def test_small_scaled_image_is_padded_with_zero_and_ignore():
    image, label = _blocks(64, 64)
    transform = TrainTransform(crop_size=(96, 128), scale_range=(0.5, 0.5), jitter=0.0,
                               flip_prob=0.0)
    out_image, out_label = transform(image, label, np.random.default_rng(0))
    assert (out_label[32:, :] == 255).all() and (out_label[:, 32:] == 255).all()
    assert (out_label[:32, :32] != 255).all()
    assert np.all(_denormalise(out_image)[40:, 40:] == 0)  # padded black before normalising


def test_deterministic_given_the_rng_and_different_across_seeds():
    image, label = _blocks()
    transform = TrainTransform(crop_size=(64, 96))
    a = transform(image, label, np.random.default_rng(5))
    b = transform(image, label, np.random.default_rng(5))
    c = transform(image, label, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_colour_jitter_matches_float_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), np.uint8)
    out = colour_jitter(image, 1.2, 0.7, 1.3).astype(float)
    grey = lambda x: x @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    x = image.astype(float) * 1.2
    x = np.clip((x - grey(image.astype(float)).mean() * 1.2) * 0.7 + grey(image).mean() * 1.2, 0,
                255)
    g = grey(np.round(x))[..., None]
    expected = np.clip(g + (np.round(x) - g) * 1.3, 0, 255)
    assert np.abs(out - expected).max() <= 2


def test_eval_transform_normalises_at_full_resolution():
    image = np.full((5, 7, 3), 128, np.uint8)
    tensor, label = EvalTransform()(image, np.zeros((5, 7), np.uint8))
    expected = (128 / 255 - np.array(MEAN)) / np.array(STD)
    assert tensor.shape == (3, 5, 7)
    assert np.allclose(tensor[:, 0, 0].numpy(), expected, atol=1e-5)
    assert label.dtype == torch.int64
