"""The decoded-image cache (lib/data/cache.py), the loader built around it
(lib/training/pipeline.py) and device-side normalisation: real PNGs, real DataLoader workers, real
files on disk."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lib.data.cache import CacheSpaceError, attach_cache, check_room
from lib.data.dataset import build_dataset, worker_init
from lib.data.sampler import InfiniteShardedSampler
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.data.transforms import BatchNormaliser, TrainTransform
from lib.training.config import TrainConfig
from lib.training.pipeline import auto_num_workers, build_train_loader

REPO = Path(__file__).resolve().parents[1]
# Cityscapes' public labelId -> trainId table, written out here independently of the code's
TRAINED_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    generate_toy_cityscapes(root, n_train=6, n_val=0, height=96, width=192, seed=0)
    return root


def _config(root: Path, cache: str) -> TrainConfig:
    return TrainConfig().replace(data_root=str(root), crop_size=(64, 96),
                                 scale_range=(0.25, 1.5), batch_size=3, data_cache=cache)


def _train_set(cfg: TrainConfig):
    return build_dataset(cfg.data, "train", cfg.train_transform())


def _batches(dataset, n_batches: int, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sampler = InfiniteShardedSampler(len(dataset), 3, seed=7)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=workers,
                        worker_init_fn=worker_init)
    batches = iter(loader)
    return [next(batches) for _ in range(n_batches)]


def test_same_batches_with_and_without_the_cache(toy_root, tmp_path):
    plain = _train_set(_config(toy_root, "off"))
    cached = _train_set(_config(toy_root, str(tmp_path)))
    assert attach_cache(plain, "off") is None
    cache = attach_cache(cached, str(tmp_path))
    assert cache is not None and cache.folder.parent == tmp_path
    # 4 batches of 3 from 6 images: the second epoch reads every sample from the cache
    expected = _batches(plain, 4, workers=2)
    got = _batches(cached, 4, workers=2)
    for (image_a, label_a), (image_b, label_b) in zip(expected, got, strict=True):
        assert image_a.dtype == torch.float32 and label_a.dtype == torch.int64
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    usage = cache.survey()
    assert (usage.cached, usage.total, usage.missing_bytes) == (6, 6, 0)
    files = sorted(cache.folder.glob("*.npy"))
    assert len(files) == 12
    assert usage.cached_bytes == sum(f.stat().st_size for f in files)


def test_cached_arrays_are_the_decoded_image_and_mapped_label(toy_root, tmp_path):
    dataset = _train_set(_config(toy_root, "off"))
    cache = attach_cache(dataset, str(tmp_path))
    lut = np.full(256, 255, np.uint8)
    lut[TRAINED_LABEL_IDS] = np.arange(19)
    for index, (image_path, label_path) in enumerate(dataset.pairs):
        cache.load(index, dataset)  # decodes and writes
        image, label = cache.load(index, dataset)  # reads
        assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
        # decoded by PIL here, by OpenCV in the code
        np.testing.assert_array_equal(image, np.asarray(Image.open(image_path).convert("RGB")))
        np.testing.assert_array_equal(label, lut[np.asarray(Image.open(label_path))])
        assert label.dtype == np.uint8 and set(np.unique(label)) <= set(range(19)) | {255}


def test_a_changed_source_file_is_decoded_again(toy_root, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    dataset = _train_set(_config(root, "off"))
    cache = attach_cache(dataset, str(tmp_path / "cache"))
    _, label = cache.load(0, dataset)
    old_files = set(cache.folder.glob("000000.*"))
    assert len(old_files) == 2 and not (np.asarray(label) == 13).all()
    label_path = dataset.pairs[0][1]
    raw = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    raw[:] = 26  # car (train id 13) everywhere
    cv2.imwrite(str(label_path), raw)
    os.utime(label_path, ns=(1, 1))  # another mtime even on a coarse-grained clock
    _, label = cache.load(0, dataset)
    assert (np.asarray(label) == 13).all()
    new_files = set(cache.folder.glob("000000.*"))
    assert len(new_files) == 2 and not new_files & old_files  # the stale arrays are gone


def test_a_bad_label_fails_with_its_name_and_is_not_cached(toy_root, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root)
    dataset = _train_set(_config(root, "off"))
    cache = attach_cache(dataset, str(tmp_path / "cache"))
    label_path = dataset.pairs[1][1]
    raw = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    raw[0, 0] = 200  # no Cityscapes label id
    cv2.imwrite(str(label_path), raw)
    with pytest.raises(ValueError, match=str(label_path.name)):
        dataset[(1, 0)]
    assert not list(cache.folder.glob("000001.*"))


def test_too_little_room_is_refused_naming_folder_and_bytes(toy_root, tmp_path):
    dataset = _train_set(_config(toy_root, "off"))
    cache = attach_cache(dataset, str(tmp_path))
    usage = cache.survey()
    pixels = sum(np.prod(Image.open(image).size) for image, _ in dataset.pairs)
    # 3 bytes of image and 1 of label per pixel, plus at most a header and a block per file
    assert 4 * pixels <= usage.missing_bytes <= 4 * pixels + 2 * 8192 * len(dataset.pairs)
    free = shutil.disk_usage(tmp_path).free
    assert abs(usage.free_bytes - free) < 2**26  # other processes write meanwhile
    check_room(usage)  # the default spare gigabyte: this disk has room for a few kilobytes
    with pytest.raises(CacheSpaceError) as failure:
        check_room(usage, reserve=usage.free_bytes)
    message = str(failure.value)
    assert str(cache.folder) in message
    assert str(usage.missing_bytes) in message and str(usage.free_bytes) in message


def _uint8_and_float_crops(root: Path, seeds: range) -> tuple[list, list]:
    """The same random crops of a toy sample as uint8 and as the workers' normalised floats."""
    dataset = _train_set(_config(root, "off"))
    image, label = dataset.decode(0)
    uint8_transform = TrainTransform((64, 96), (0.25, 1.5), uint8_output=True)
    float_transform = TrainTransform((64, 96), (0.25, 1.5))
    return ([uint8_transform(image, label, np.random.default_rng(s)) for s in seeds],
            [float_transform(image, label, np.random.default_rng(s)) for s in seeds])


def test_device_normalisation_is_bit_identical_to_the_workers(toy_root):
    small, reference = _uint8_and_float_crops(toy_root, range(12))
    mean, std = TrainConfig().data.mean, TrainConfig().data.std
    normaliser = BatchNormaliser(mean, std, "cpu")
    padded = 0
    for (small_image, small_label), (ref_image, ref_label) in zip(small, reference, strict=True):
        assert small_image.dtype == torch.uint8 and small_label.dtype == torch.uint8
        out = normaliser(small_image[None])[0]
        assert torch.equal(out, ref_image)
        assert torch.equal(small_label.long(), ref_label)
        padded += int((small_label == 255).all(dim=1).any())  # a whole column of padding
        # and the formula itself, in float64
        exact = ((small_image.double() / 255 - torch.tensor(mean).double().view(3, 1, 1))
                 / torch.tensor(std).double().view(3, 1, 1))
        assert (out.double() - exact).abs().max() < 1e-5
    assert padded  # scales down to 0.25 of 96x192: some crops were padded


@pytest.mark.cuda
def test_cuda_normalisation_is_bit_identical_to_the_workers(toy_root):
    small, reference = _uint8_and_float_crops(toy_root, range(8))
    normaliser = BatchNormaliser(TrainConfig().data.mean, TrainConfig().data.std, "cuda")
    out = normaliser(torch.stack([image for image, _ in small]).cuda()).cpu()
    assert torch.equal(out, torch.stack([image for image, _ in reference]))


def test_the_pipeline_sends_uint8_and_normalises_on_the_device(toy_root, tmp_path):
    cfg = _config(toy_root, str(tmp_path)).replace(num_workers=1, device_normalise=True)
    reference = _train_set(cfg.replace(data_cache="off"))
    dataset = build_dataset(cfg.data, "train", cfg.train_transform())
    sampler = InfiniteShardedSampler(len(dataset), 3, seed=7)
    pipeline = build_train_loader(cfg, dataset, sampler, torch.device("cpu"), 1)
    assert pipeline.cache is not None and pipeline.num_workers == 1
    raw_images, raw_labels = next(iter(pipeline.loader))
    assert raw_images.dtype == torch.uint8 and raw_labels.dtype == torch.uint8
    images, labels = pipeline.to_device(raw_images, raw_labels)
    expected_images, expected_labels = _batches(reference, 1, workers=0)[0]
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_auto_workers_follow_affinity_and_processes_per_node():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from lib.training.pipeline import auto_num_workers; print(auto_num_workers()[0])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_WORLD_SIZE", None)
    one_cpu = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
    assert one_cpu.stdout.strip() == "1"  # never 0: at least one worker
    cpus = len(os.sched_getaffinity(0))
    workers, why = auto_num_workers()
    assert f"{cpus} CPUs" in why
    if cpus >= 3:
        assert workers == cpus - 1


def test_build_cache_tool_fills_the_folder_training_reads(toy_root, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "tools/build_cache.py", "--data-root", str(toy_root), "--data-cache",
         str(cache_dir), "--jobs", "2"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    # what training with the same options finds: every sample cached, the same arrays
    dataset = _train_set(_config(toy_root, "off"))
    cache = attach_cache(dataset, str(cache_dir))
    usage = cache.survey()
    assert (usage.cached, usage.total, usage.missing_bytes) == (6, 6, 0)
    assert str(cache.folder) in proc.stdout + proc.stderr
    image, _ = cache.load(5, dataset)
    assert isinstance(image, np.memmap)
    np.testing.assert_array_equal(image, np.asarray(Image.open(dataset.pairs[5][0])))
