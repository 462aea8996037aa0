"""Training and evaluation transforms, on uint8 numpy arrays until the final tensor.

The training transform follows the seed's recipe (BiSeNetV2 tips 1 and 3): random scale of the
full image in (0.25, 2.0), random crop of 512x1024 (image padded with 0, label with the ignore
index where the scaled image is smaller), horizontal flip, colour jitter, normalisation.

Why it is fast: scale, crop and flip are one affine warp evaluated only for the pixels the crop
keeps (a 2x upscaled 1024x2048 image never exists in memory), jitter works on uint8 with lookup
tables, and normalisation is one lookup per channel from uint8 straight into the float tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from lib.data.datasets.cityscapes import MEAN, STD


def normalisation_tables(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: ``table[c, v] = (v / 255 - mean[c]) / std[c]``.

    Computed as ``(v - 255 mean) * (1 / (255 std))`` in float32, the arithmetic of a plain
    float pass over the image, so both give bit-identical tensors.
    """
    shift = np.asarray(mean, np.float32)[:, None] * np.float32(255)
    scale = np.float32(1) / (np.float32(255) * np.asarray(std, np.float32)[:, None])
    return (np.arange(256, dtype=np.float32)[None] - shift) * scale


def _normalise_into(image: np.ndarray, out: np.ndarray, tables: np.ndarray) -> None:
    """Write normalised channels of HxWx3 uint8 ``image`` into ``out`` (3xHxW float32 view)."""
    # one pass per channel, uint8 -> float32 through the table: no float temporaries
    for c, channel in enumerate(cv2.split(np.ascontiguousarray(image))):
        np.take(tables[c], channel, out=out[c], mode="clip")  # uint8: never clipped


class BatchNormaliser:
    """Nx3xHxW uint8 batches on ``device`` -> float32, normalised with ``mean``/``std``.

    The arithmetic of ``normalisation_tables`` (two float32 operations per value, a subtraction
    then a product, which no fused multiply-add can merge), so the result is bit-identical to the
    workers' lookup whichever device computes it.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu") -> None:
        f32 = np.float32
        shift = np.asarray(mean, f32) * f32(255)
        scale = f32(1) / (f32(255) * np.asarray(std, f32))
        # made once: a host-to-device copy per batch would cost a synchronisation
        self.shift, self.scale = (torch.from_numpy(t).view(1, 3, 1, 1).to(device)
                                  for t in (shift, scale))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an Nx3xHxW uint8 batch, got {images.dtype} "
                             f"{tuple(images.shape)}")
        return (images.float() - self.shift) * self.scale


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32, normalised with ``mean``/``std`` of [0, 1] images."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    out = np.empty((3, *image.shape[:2]), np.float32)
    _normalise_into(image, out, normalisation_tables(mean, std))
    return torch.from_numpy(out)


# Fixed grey level the contrast factor stretches around (the reference implementation's value).
CONTRAST_PIVOT = 74


def jitter_tables(brightness: float, contrast: float) -> np.ndarray:
    """(256,) uint8: brightness then contrast, each truncated to uint8 as applied in turn.

    Brightness maps v to ``v * b``, contrast maps v to ``74 + (v - 74) * c``; each result is
    clipped to [0, 255] and truncated (not rounded). Both act on single values, so indexing the
    contrast table with the brightness table gives exactly the two steps one after the other.
    """
    values = np.arange(256, dtype=np.float64)
    bright = np.clip(values * brightness, 0, 255).astype(np.uint8)
    contrasted = np.clip(CONTRAST_PIVOT + (values - CONTRAST_PIVOT) * contrast, 0, 255)
    return contrasted.astype(np.uint8)[bright]


def saturation_matrix(saturation: float) -> np.ndarray:
    """(3, 3) float32 M with ``x @ M / 3 = s * x + (1 - s) * mean(x)`` for a pixel row x."""
    matrix = np.full((3, 3), 1 - saturation)
    np.fill_diagonal(matrix, 1 + 2 * saturation)  # entries rounded to float32 once, from float64
    return matrix.astype(np.float32)


def colour_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float
                  ) -> np.ndarray:
    """Brightness, contrast and saturation factors applied in that order, in uint8.

    The reference implementation's arithmetic: brightness scales each value; contrast stretches
    values around the fixed grey level 74 (not the image mean); saturation blends each pixel with
    the plain mean of its three channels (not luma), computed as a float32 product with
    ``saturation_matrix`` divided by 3. Every step clips to [0, 255] and truncates to uint8.
    Brightness and contrast are one lookup table; the formulas treat RGB and BGR alike.
    """
    if brightness != 1.0 or contrast != 1.0:
        image = cv2.LUT(image, jitter_tables(brightness, contrast))
    if saturation != 1.0:
        # out_c = (x_0 w_0c + x_1 w_1c + x_2 w_2c) / 3 as separate float32 operations: the same
        # bits whatever the BLAS library or thread count (a matrix product may fuse multiply-adds
        # in some kernels and not others, which would make 1 and N processes see other images)
        weights = saturation_matrix(saturation)
        planes = [channel.astype(np.float32) for channel in cv2.split(image)]
        mixed = []
        for c in range(3):
            total = planes[0] * weights[0, c]
            total += planes[1] * weights[1, c]
            total += planes[2] * weights[2, c]
            total /= np.float32(3)
            mixed.append(np.clip(total, 0, 255).astype(np.uint8))
        image = cv2.merge(mixed)
    return image


def scale_crop_flip(
    image: np.ndarray, label: np.ndarray, scaled_size: tuple[int, int], top: int, left: int,
    out_size: tuple[int, int], flip: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Same as ``cv2.resize`` to ``scaled_size`` (h, w), crop ``out_size`` at (top, left), flip.

    Only the kept window is computed: one ``warpAffine`` per array maps each output pixel back to
    the source with ``cv2.resize``'s pixel-centre convention; image bilinear, label nearest.
    """
    height, width = image.shape[:2]
    out_h, out_w = out_size
    if top < 0 or left < 0 or top + out_h > scaled_size[0] or left + out_w > scaled_size[1]:
        raise ValueError(f"crop {out_size} at ({top}, {left}) leaves the scaled size {scaled_size}")
    inv_y, inv_x = height / scaled_size[0], width / scaled_size[1]
    # source = (output + offset + 0.5) * inv - 0.5 on each axis
    matrix = np.array([[inv_x, 0.0, (left + 0.5) * inv_x - 0.5],
                       [0.0, inv_y, (top + 0.5) * inv_y - 0.5]])
    flags = cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(image, matrix, (out_w, out_h), flags=flags | cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    label = cv2.warpAffine(label, matrix, (out_w, out_h), flags=flags | cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_REPLICATE)
    if flip:  # after the warp, not in its matrix: nearest-neighbour ties then break alike
        image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    return image, label


class TrainTransform:
    """Random scale, crop, flip and colour jitter, then normalisation (the seed's recipe).

    ``__call__(image HxWx3 uint8 RGB, label HxW uint8 train ids, rng)`` returns a float32
    [3, crop_h, crop_w] tensor and an int64 [crop_h, crop_w] tensor; the same ``rng`` state gives
    the same output. Where the scaled image is smaller than the crop it is placed at a random
    offset inside the crop (as cropping a padded image does) and the rest is padding.
    """

    def __init__(
        self,
        crop_size: Sequence[int] = (512, 1024),
        scale_range: Sequence[float] = (0.25, 2.0),
        flip_prob: float = 0.5,
        jitter: float = 0.4,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        ignore_index: int = 255,
        uint8_output: bool = False,
    ) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range {scale_range} must be increasing positive numbers")
        if min(self.crop_size) < 1:
            raise ValueError(f"crop_size {crop_size} must be positive")
        self.flip_prob = flip_prob
        self.jitter = jitter
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index
        # uint8 image (and uint8 label when the ignore index fits): BatchNormaliser on the device
        self.uint8_output = uint8_output
        self._tables = normalisation_tables(self.mean, self.std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if rng is None:  # dataset[int]: fresh randomness (the sampler passes seeds instead)
            rng = np.random.default_rng()
        height, width = image.shape[:2]
        crop_h, crop_w = self.crop_size
        scale = rng.uniform(*self.scale_range)
        scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
        keep_h, keep_w = min(crop_h, scaled_h), min(crop_w, scaled_w)
        top = int(rng.integers(0, scaled_h - keep_h + 1))  # crop window in scaled coordinates
        left = int(rng.integers(0, scaled_w - keep_w + 1))
        # where a window smaller than the crop lands inside it (drawn only then)
        pad_top = int(rng.integers(0, crop_h - keep_h + 1)) if keep_h < crop_h else 0
        pad_left = int(rng.integers(0, crop_w - keep_w + 1)) if keep_w < crop_w else 0
        flip = bool(rng.random() < self.flip_prob)
        factors = rng.uniform(max(0.0, 1 - self.jitter), 1 + self.jitter, size=3)

        image, label = scale_crop_flip(image, label, (scaled_h, scaled_w), top, left,
                                       (keep_h, keep_w), flip)
        if self.jitter > 0:
            image = colour_jitter(image, *factors)

        rows, cols = slice(pad_top, pad_top + keep_h), slice(pad_left, pad_left + keep_w)
        if self.uint8_output:
            out_image = np.zeros((3, crop_h, crop_w), np.uint8)  # padding is black (0)
            out_image[:, rows, cols] = image.transpose(2, 0, 1)
        else:
            out_image = np.empty((3, crop_h, crop_w), np.float32)
            if (keep_h, keep_w) != (crop_h, crop_w):
                out_image[:] = self._tables[:, :1, None]  # padding is black (0) before normalising
            _normalise_into(image, out_image[:, rows, cols], self._tables)
        small_label = self.uint8_output and 0 <= self.ignore_index < 256
        out_label = np.full((crop_h, crop_w), self.ignore_index,
                            np.uint8 if small_label else np.int64)
        out_label[rows, cols] = label
        return torch.from_numpy(out_image), torch.from_numpy(out_label)


class EvalTransform:
    """Full resolution: normalisation only."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._tables = normalisation_tables(self.mean, self.std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        out = np.empty((3, *image.shape[:2]), np.float32)
        _normalise_into(image, out, self._tables)
        return torch.from_numpy(out), torch.from_numpy(label.astype(np.int64))
