"""--dataset NAME and --recipe NAME: what they set, what the command line keeps, the recipes'
values against the public configurations of the published weights, evaluate.py's choice of
dataset and protocol, the readers' errors and tools/check_dataset.py on every dataset."""

import argparse
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bisenetv1.train import PRESETS as V1_PRESETS
from bisenetv1.train import RECIPE as V1_RECIPE
from bisenetv2.train import PRESETS as V2_PRESETS
from bisenetv2.train import RECIPE as V2_RECIPE
from lib.data.dataset import build_dataset, prepare_dataset
from lib.data.datasets import DATASETS
from lib.data.toy import generate_toy
from lib.evaluation.command import add_protocol_arguments, decide_dataset
from lib.training.config import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
NAMED = ["coco-stuff", "ade20k", "camvid"]

# the public configurations of the published weights (configs/bisenetv{1,2}_{coco,ade20k}.py):
# lr, weight decay, iterations, scale range, crop, evaluation crop, evaluation short side
PUBLISHED_CONFIGS = {
    ("bisenetv1", "coco"): (1e-2, 1e-4, 90_000, (0.5, 2.0), (512, 512), (512, 512), None),
    ("bisenetv2", "coco"): (5e-3, 1e-4, 180_000, (0.75, 2.0), (640, 640), (640, 640), None),
    ("bisenetv1", "ade20k"): (4e-2, 1e-4, 40_000, (0.5, 2.0), (512, 512), (512, 512), 512),
    ("bisenetv2", "ade20k"): (5e-3, 1e-4, 160_000, (0.5, 2.0), (640, 640), (640, 640), 640),
}
V2_ADE_MEAN_STD = ((0.49343230, 0.46819794, 0.43106043), (0.25680755, 0.25506608, 0.27422913))
V2_COCO_MEAN_STD = ((0.46962251, 0.4464104, 0.40718787), (0.27469736, 0.27012361, 0.28515933))


@pytest.mark.parametrize(("model", "preset"), list(PUBLISHED_CONFIGS))
def test_recipes_of_the_published_weights(model, preset):
    recipe, presets = (V1_RECIPE, V1_PRESETS) if model == "bisenetv1" else (V2_RECIPE, V2_PRESETS)
    cfg = parse_config(recipe, ["--recipe", preset], presets=presets)
    lr, wd, iters, scales, crop, eval_crop, short_side = PUBLISHED_CONFIGS[(model, preset)]
    assert (cfg.model, cfg.lr, cfg.weight_decay, cfg.max_iter) == (model, lr, wd, iters)
    assert (cfg.scale_range, cfg.crop_size) == (scales, crop)
    assert (cfg.eval_crop_size, cfg.eval_short_side) == (eval_crop, short_side)
    assert cfg.batch_size == 16 and cfg.fp16 and cfg.sync_bn and cfg.head_lr_mult == 10
    assert cfg.pretrained == "auto" and set(cfg.eval_modes) == {"ss", "msf"}
    name = {"coco": "coco-stuff", "ade20k": "ade20k"}[preset]
    assert cfg.data.dataset == name and cfg.data.n_classes == {"coco": 171, "ade20k": 150}[preset]
    mean_std = V2_COCO_MEAN_STD if preset == "coco" else V2_ADE_MEAN_STD
    assert (cfg.data.mean, cfg.data.std) == mean_std
    # the flag spelling is the same recipe; options after it still win
    assert parse_config(recipe, [f"--{preset}"], presets=presets) == cfg
    assert parse_config(recipe, ["--recipe", preset, "--lr", "0.1"], presets=presets).lr == 0.1
    with pytest.raises(SystemExit, match="choose one"):
        parse_config(recipe, ["--recipe", preset, "--camvid"], presets=presets)


@pytest.mark.parametrize("model", ["bisenetv1", "bisenetv2"])
def test_camvid_recipes_are_the_papers(model):
    recipe, presets = (V1_RECIPE, V1_PRESETS) if model == "bisenetv1" else (V2_RECIPE, V2_PRESETS)
    cfg = parse_config(recipe, ["--recipe", "camvid"], presets=presets)
    assert (cfg.data.dataset, cfg.data.n_classes, cfg.crop_size, cfg.max_iter) == (
        "camvid", 11, (720, 960), 10_000)
    assert (cfg.eval_short_side, cfg.eval_crop_size, cfg.batch_size) == (None, (720, 960), 16)
    # BiSeNetV1 paper: lr 2.5e-2, weight decay 1e-4; BiSeNetV2 paper: lr 5e-2, weight decay 5e-4
    expected = (2.5e-2, 1e-4) if model == "bisenetv1" else (5e-2, 5e-4)
    assert (cfg.lr, cfg.weight_decay) == expected


def test_dataset_option_sets_its_values_unless_given():
    for name in NAMED:
        spec = DATASETS[name]
        cfg = parse_config(TrainConfig(), ["--dataset", name])
        assert (cfg.data.n_classes, cfg.data.mean, cfg.data.std) == (
            spec.n_classes, spec.mean, spec.std)
        assert (cfg.eval_short_side, cfg.eval_crop_size) == (spec.eval_short_side,
                                                             spec.eval_crop_size)
    cfg = parse_config(TrainConfig(), ["--dataset", "ade20k", "--mean", "0.1", "0.2", "0.3",
                                       "--std", "0.4", "0.5", "0.6", "--eval-short-side", "320",
                                       "--eval-crop-size", "300", "400"])
    assert (cfg.data.mean, cfg.data.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert (cfg.eval_short_side, cfg.eval_crop_size, cfg.data.n_classes) == (320, (300, 400), 150)
    # the recipe's own dataset keeps the recipe's values (V1's ADE20K protocol is not V2's)
    cfg = parse_config(V1_RECIPE, ["--recipe", "ade20k", "--dataset", "ade20k"],
                       presets=V1_PRESETS)
    assert (cfg.eval_short_side, cfg.eval_crop_size) == (512, (512, 512))
    # custom data keeps the recipe's values
    cfg = parse_config(TrainConfig(), ["--dataset", "folders", "--n-classes", "3"])
    assert (cfg.data.n_classes, cfg.data.mean) == (3, TrainConfig().data.mean)
    with pytest.raises(ValueError, match="--dataset camvid has 11 classes, but --n-classes is 12"):
        parse_config(TrainConfig(), ["--dataset", "camvid", "--n-classes", "12"])
    with pytest.raises(ValueError, match="--dataset 'pascal' must be one of cityscapes, "
                                         "coco-stuff, ade20k, camvid, list or folders"):
        parse_config(TrainConfig(), ["--dataset", "pascal"])


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default=None)
    add_protocol_arguments(parser)
    return parser.parse_args(list(argv))


def dataset_and_protocol(args: argparse.Namespace, saved: dict, implied: str | None = None,
                         model: str | None = None):
    """(dataset, protocol, other dataset) that evaluate.py decides for a checkpoint whose saved
    config is ``saved`` (empty: a bare state dict whose class count implies ``implied``)."""
    decided = decide_dataset(args, {"config": saved, "dataset": implied, "model": model,
                                    "file": "model.pth"})
    return decided.data.dataset, decided.options(args), decided.other_dataset


def test_evaluate_takes_dataset_and_protocol_from_the_checkpoint_unless_told():
    saved = {"dataset": "ade20k", "eval_short_side": 96, "eval_crop_size": [64, 64],
             "eval_scales": [0.5, 1.0]}
    name, options, other = dataset_and_protocol(_eval_args(), saved)
    assert (name, options.short_side, options.crop_size, options.scales, other) == (
        "ade20k", 96, (64, 64), (0.5, 1.0), False)
    # another dataset: its own protocol
    name, options, other = dataset_and_protocol(_eval_args("--dataset", "camvid"), saved)
    assert (name, options.short_side, options.crop_size, other) == ("camvid", None, (720, 960),
                                                                     True)
    # a bare state dict told its dataset: that dataset's protocol; the command line wins
    name, options, _ = dataset_and_protocol(_eval_args("--dataset", "ade20k"), {})
    assert (name, options.short_side, options.crop_size) == ("ade20k", 640, (640, 640))
    _, options, _ = dataset_and_protocol(_eval_args("--dataset", "ade20k", "--short-side", "0",
                                                    "--crop-size", "32", "48"), {})
    assert (options.short_side, options.crop_size) == (None, (32, 48))
    # nothing tells the dataset (a class count that several datasets share): asked for, never
    # guessed (evaluate.py and this decision used to differ here)
    with pytest.raises(ValueError, match="model.pth .*pass --dataset"):
        dataset_and_protocol(_eval_args(), {})
    name, options, _ = dataset_and_protocol(_eval_args(), {}, implied="cityscapes")
    assert (name, options.short_side, options.crop_size) == ("cityscapes", None, (1024, 1024))


@pytest.mark.parametrize("name", NAMED)
def test_reader_errors_name_the_file(tmp_path, name):
    spec = DATASETS[name]
    root = generate_toy(name, tmp_path, n_train=4, n_val=1, height=32, width=48)
    cfg = parse_config(TrainConfig(), ["--dataset", name, "--data-root", str(root)])
    pairs = spec.find_pairs(root, "train")
    outside = {"coco-stuff": 200, "ade20k": 151, "camvid": 12}[name]
    label = cv2.imread(str(pairs[0][1]), cv2.IMREAD_UNCHANGED)
    label[3, 4] = outside
    cv2.imwrite(str(pairs[0][1]), label)
    cv2.imwrite(str(pairs[1][1]), np.zeros((16, 48), np.uint8))  # size mismatch
    pairs[2][0].write_bytes(b"not an image")
    dataset = build_dataset(cfg.data, "train")
    with pytest.raises(ValueError, match=rf"label {pairs[0][1]} holds value\(s\) \[{outside}\] "
                                         rf"outside {name}'s label values"):
        dataset[0]
    with pytest.raises(ValueError, match=rf"label {pairs[1][1]} is 48x16 but image"):
        dataset[1]
    with pytest.raises(ValueError, match=rf"cannot read image {pairs[2][0]}"):
        dataset[2]
    assert dataset[3][1].shape == (32, 48)
    with pytest.raises(ValueError, match="3 problem") as caught:
        build_dataset(cfg.data, "train", cfg.train_transform(), check_labels=True)
    for path in (pairs[0][1], pairs[1][1], pairs[2][0]):
        assert str(path) in str(caught.value)
    for image, _ in spec.find_pairs(root, "val"):
        image.unlink()  # an empty split
    with pytest.raises(FileNotFoundError, match=rf"contains no \*{spec.image_suffix} images"):
        build_dataset(cfg.data, "val")


@pytest.mark.parametrize("name", NAMED)
def test_check_dataset_tool_on_each_dataset(tmp_path, name):
    spec = DATASETS[name]
    root = generate_toy(name, tmp_path, n_train=2, n_val=1, height=32, width=48)
    command = [sys.executable, "tools/check_dataset.py", "--dataset", name, "--data-root",
               str(root), "--no-decode"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("OK"), done.stdout
    assert spec.class_names[0] in done.stdout  # the report names the dataset's classes
    label_path = spec.find_pairs(root, "val")[0][1]
    # train ids written where raw values belong: ignore (255) is no raw value except in COCO
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[0, 0] = {"coco-stuff": 182, "ade20k": 255, "camvid": 255}[name]
    cv2.imwrite(str(label_path), label)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and str(label_path) in done.stdout
    assert "1 problem(s) found" in done.stdout


def test_generate_toy_makes_the_named_dataset(tmp_path):
    cfg = parse_config(TrainConfig(), ["--dataset", "camvid", "--data-root", str(tmp_path / "c"),
                                       "--generate-toy"])
    prepare_dataset(cfg.data)
    assert len(DATASETS["camvid"].find_pairs(tmp_path / "c", "train")) == 40
    cfg = parse_config(TrainConfig(), ["--dataset", "folders", "--data-root", str(tmp_path),
                                       "--generate-toy"])
    with pytest.raises(ValueError, match="--generate-toy needs a named dataset"):
        prepare_dataset(cfg.data)


def test_bare_state_dict_gets_the_protocol_of_its_published_model():
    # the public configurations: BiSeNetV1 scored ADE20K at short side 512 with 512x512 crops and
    # COCO-Stuff with 512x512 crops; BiSeNetV2 used 640 for both
    expected = {("bisenetv1", "ade20k"): (512, (512, 512)),
                ("diss", "ade20k"): (512, (512, 512)),
                ("bisenetv2", "ade20k"): (640, (640, 640)),
                ("bisenetv1", "coco-stuff"): (None, (512, 512)),
                ("bisenetv2", "coco-stuff"): (None, (640, 640))}
    for (model, dataset), (short_side, crop) in expected.items():
        name, options, other = dataset_and_protocol(_eval_args(), {}, implied=dataset,
                                                    model=model)
        assert (name, options.short_side, options.crop_size, other) == (
            dataset, short_side, crop, True), (model, dataset)
