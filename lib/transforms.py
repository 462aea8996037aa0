"""Training and evaluation transforms, on uint8 numpy arrays until the final tensor.

The training transform follows the seed's recipe: random scale of the full image, random crop
(image padded with 0, label with the ignore index where the scaled image is smaller), horizontal
flip, colour jitter, normalisation. Scale, crop and flip are one affine warp computed only for the
pixels the crop keeps, so a 2x upscaled 1024x2048 image never exists in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from lib.cityscapes import MEAN, STD


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32, normalised with ``mean``/``std`` of [0, 1] images."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = np.asarray(mean, np.float32) * 255.0
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    out = chw.float()
    out.sub_(torch.from_numpy(shift).view(3, 1, 1)).mul_(torch.from_numpy(scale).view(3, 1, 1))
    return out


def colour_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float
                  ) -> np.ndarray:
    """Brightness, contrast and saturation factors applied in that order, in uint8.

    Brightness and contrast compose to one affine map of the values, applied as a lookup table;
    saturation blends each pixel with its grey value.
    """
    grey_mean = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean()) * brightness
    values = np.arange(256, dtype=np.float32) * (brightness * contrast) + (1 - contrast) * grey_mean
    lut = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    image = cv2.LUT(image, lut)
    if saturation != 1.0:
        grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        image = cv2.addWeighted(image, saturation, grey, 1.0 - saturation, 0.0)
    return image


def scale_crop_flip(
    image: np.ndarray, label: np.ndarray, scale: float, top: int, left: int,
    crop_size: tuple[int, int], flip: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Same as resizing by ``scale``, then cropping ``crop_size`` at (top, left), then flipping.

    Only the kept window is computed: one ``warpAffine`` per array maps output pixels back to the
    source (the same pixel-centre convention as ``cv2.resize``); image bilinear, label nearest.
    """
    height, width = image.shape[:2]
    scaled_h, scaled_w = round(height * scale), round(width * scale)
    crop_h, crop_w = crop_size
    keep_h, keep_w = min(crop_h, scaled_h - top), min(crop_w, scaled_w - left)
    inv = 1.0 / scale
    # source = (output + offset + 0.5) / scale - 0.5; flipping mirrors the output x first
    x_gain, x_shift = (-inv, (keep_w - 1 + left + 0.5) * inv - 0.5) if flip else (
        inv, (left + 0.5) * inv - 0.5)
    matrix = np.array([[x_gain, 0.0, x_shift], [0.0, inv, (top + 0.5) * inv - 0.5]], np.float64)
    flags = cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(image, matrix, (keep_w, keep_h), flags=flags | cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    label = cv2.warpAffine(label, matrix, (keep_w, keep_h), flags=flags | cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_REPLICATE)
    return image, label


def pad_to(image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to ``size``: the image with 0, the label with ``ignore_index``."""
    pad_h, pad_w = size[0] - image.shape[0], size[1] - image.shape[1]
    if pad_h <= 0 and pad_w <= 0:
        return image, label
    image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT,
                               value=ignore_index)
    return image, label


class TrainTransform:
    """Random scale, crop, flip and colour jitter, then normalisation (the seed's recipe)."""

    def __init__(
        self,
        crop_size: Sequence[int] = (512, 1024),
        scale_range: Sequence[float] = (0.25, 2.0),
        flip_prob: float = 0.5,
        jitter: float = 0.4,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        ignore_index: int = 255,
    ) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = flip_prob
        self.jitter = jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[:2]
        scale = rng.uniform(*self.scale_range)
        scaled_h, scaled_w = round(height * scale), round(width * scale)
        top = int(rng.integers(0, max(scaled_h - self.crop_size[0], 0) + 1))
        left = int(rng.integers(0, max(scaled_w - self.crop_size[1], 0) + 1))
        flip = rng.random() < self.flip_prob
        image, label = scale_crop_flip(image, label, scale, top, left, self.crop_size, flip)
        if self.jitter > 0:
            low, high = max(0.0, 1 - self.jitter), 1 + self.jitter
            image = colour_jitter(image, *rng.uniform(low, high, size=3))
        image, label = pad_to(image, label, self.crop_size, self.ignore_index)
        return to_tensor(image, self.mean, self.std), torch.from_numpy(label).long()


class EvalTransform:
    """Full resolution: normalisation only."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(image, self.mean, self.std), torch.from_numpy(label).long()
