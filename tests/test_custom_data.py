"""Your own data: a two-folder dataset with 3 classes trains, evaluates and demos; bad data is
refused before training with the file named; fine-tuning across class counts; NaN losses stop."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from lib.data.dataset import build_dataset
from lib.data.sampler import InfiniteShardedSampler
from lib.data.transforms import to_tensor
from lib.models.checkpoint import load_checkpoint, load_finetune_weights, save_checkpoint
from lib.models.zoo import build_model
from lib.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


def _about(key: str):
    """assert_close message: the tensor's name, then torch's description of the mismatch."""
    return lambda message: f"{key}: {message}"


def _run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)  # a hang guard: runs are a few iterations
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def _make_folders(root: Path, n: int = 4) -> Path:
    """Images of coloured disks on a striped background: classes 0 (background), 1, 2."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, ::4] = 90
            label = np.zeros((48, 64), np.uint8)
            for cls in (1, 2):
                cy, cx = rng.integers(10, 38), rng.integers(10, 54)
                cv2.circle(label, (int(cx), int(cy)), 8, cls, -1)
            image[label == 1] = (200, 40, 40)
            image[label == 2] = (40, 40, 200)
            label[:2] = 255  # some ignored pixels
            for kind, array in (("images", image), ("labels", label)):
                path = root / kind / split / f"img{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), array)
    (root / "classes.txt").write_text("background,0,0,0\nred disk,255,0,0\nblue disk,0,0,255\n")
    return root


def _train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["bisenetv2/train.py", "--dataset", "folders", "--data-root", str(root),
            "--n-classes", "3", "--class-names", str(root / "classes.txt"), "--device", "cpu",
            "--output-dir", str(out), "--crop-size", "48", "64", "--scale-range", "1", "1",
            "--max-iter", "4", "--warmup-iter", "1", "--batch-size", "2", "--num-workers", "0",
            *extra]


def test_three_class_folder_dataset_trains_evaluates_and_demos(tmp_path):
    root = _make_folders(tmp_path / "data")
    log = _run(*_train_args(root, tmp_path / "run")).stdout
    assert "red disk" in log and "blue disk" in log  # the IoU table uses the class names
    ckpt = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert ckpt["n_classes"] == 3 and ckpt["class_names"][1] == "red disk"
    assert ckpt["palette"][2] == [0, 0, 255]
    evaluated = _run("evaluate.py", "--ckpt", str(tmp_path / "run" / "model_final.pth"),
                     "--dataset", "folders", "--data-root", str(root), "--device", "cpu",
                     "--num-workers", "0").stdout
    assert "blue disk" in evaluated and "mIoU" in evaluated
    _run("demo.py", "--ckpt", str(tmp_path / "run" / "model_final.pth"), "--img_path",
         str(root / "images" / "val"), "--output", str(tmp_path / "demo"), "--device", "cpu",
         "--layout", "mask")
    masks = sorted((tmp_path / "demo").glob("*.png"))
    assert len(masks) == 4
    colours = {tuple(c) for c in cv2.imread(str(masks[0]))[..., ::-1].reshape(-1, 3)}
    assert colours <= {(0, 0, 0), (255, 0, 0), (0, 0, 255)}  # the dataset's own colours


def test_bad_labels_are_refused_before_training_with_the_file_named(tmp_path):
    root = _make_folders(tmp_path / "data")
    bad = root / "labels" / "train" / "img2.png"
    cv2.imwrite(str(bad), np.full((48, 64), 5, np.uint8))  # 5 is not a class of 3
    proc = _run(*_train_args(root, tmp_path / "run"), ok=False)
    out = proc.stdout + proc.stderr
    assert "label out of range" in out and "img2.png" in out and "[5]" in out
    assert "iter 1/" not in out  # refused before the first iteration
    check = _run("tools/check_dataset.py", "--dataset", "folders", "--data-root", str(root),
                 "--n-classes", "3", ok=False).stdout
    assert "img2.png" in check and "1 problem(s) found" in check


# BiSeNetV2's class layers: the 1x1 classifiers of the main head and the four booster heads
V2_CLASS_LAYERS = {f"{head}.conv_out.1.{kind}"
                   for head in ("head", "aux2", "aux3", "aux4", "aux5_4")
                   for kind in ("weight", "bias")}


def _random_city_model(path: Path) -> dict[str, torch.Tensor]:
    """A bare 19-class BiSeNetV2 state dict whose every tensor is random (BatchNorm buffers
    included), so that no value can equal a fresh model's by coincidence."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in build_model("bisenetv2", 19, aux_heads=True).state_dict().items():
        if value.is_floating_point():
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:  # num_batches_tracked
            state[key] = torch.randint(10, 1000, value.shape, generator=gen)
    save_checkpoint(path, {"state_dict": state})
    return state


def test_finetune_loads_every_tensor_but_the_class_layers(tmp_path):
    source = _random_city_model(tmp_path / "v2_city.pth")
    torch.manual_seed(1)
    model = build_model("bisenetv2", 3, aux_heads=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    message = load_finetune_weights(model, str(tmp_path / "v2_city.pth"), 3)
    loaded = model.state_dict()
    assert set(loaded) == set(source) and V2_CLASS_LAYERS <= set(loaded)
    for key, value in loaded.items():
        if key in V2_CLASS_LAYERS:  # new shape, the new model's own initialisation
            assert value.shape[0] == 3 and source[key].shape[0] == 19, key
            assert torch.equal(value, initial[key]), key
            assert not torch.equal(value, source[key][:3]), key
        else:
            assert torch.equal(value, source[key]), key
    assert f"{len(source) - len(V2_CLASS_LAYERS)} tensors loaded" in message


def test_finetune_across_class_counts_from_the_command_line(tmp_path):
    root = _make_folders(tmp_path / "data")
    source = _random_city_model(tmp_path / "v2_city.pth")
    # lr 1e-30: the two optimizer steps leave every weight as loaded; BatchNorm still updates
    # its running statistics and counts the two batches
    log = _run(*_train_args(root, tmp_path / "run", "--finetune-from",
                            str(tmp_path / "v2_city.pth"), "--max-iter", "2", "--lr", "1e-30",
                            "--no-eval-at-end")).stdout
    assert "class layers re-initialised for 3 classes" in log and "head.conv_out.1.weight" in log
    final = load_checkpoint(tmp_path / "run" / "model_final.pth")["state_dict"]
    assert set(final) == set(source)
    for key, value in final.items():
        if key in V2_CLASS_LAYERS:
            assert value.shape[0] == 3 and not torch.equal(value, source[key][:3]), key
        elif key.endswith("num_batches_tracked"):
            assert int(value) == int(source[key]) + 2, key
        elif not key.endswith(("running_mean", "running_var")):
            # steps of lr 1e-30 are below one float32 ulp of any weight: unchanged on any CPU
            torch.testing.assert_close(value, source[key], rtol=1e-6, atol=0, msg=_about(key))


def test_nan_loss_stops_with_iteration_and_last_checkpoint(tmp_path):
    root = _make_folders(tmp_path / "data")
    proc = _run(*_train_args(root, tmp_path / "run", "--lr", "1e12", "--max-iter", "20",
                             "--checkpoint-every", "1", "--no-eval-at-end"), ok=False)
    out = proc.stdout + proc.stderr
    assert "loss is nan" in out.lower() or "loss is inf" in out.lower(), out
    assert "last good checkpoint" in out and "checkpoint_iter" in out
    # no checkpoint is ever written from the non-finite state
    assert not (tmp_path / "run" / "model_final.pth").exists()
    saved = list((tmp_path / "run").glob("checkpoint_iter*.pth"))
    assert saved and all(torch.isfinite(t).all() for p in saved
                         for t in load_checkpoint(p)["state_dict"].values()
                         if t.is_floating_point())


# raw label value -> class id, as the JSON map below says; other raw values must become ignore
RAW_TO_CLASS = {10: 0, 20: 1, 30: 2}


def _make_list_dataset(tmp_path: Path) -> Path:
    """The folder dataset re-encoded: raw values 10/20/30 for classes 0/1/2, listed in
    annotation files with Windows separators; some pixels carry unlisted raw values."""
    root = _make_folders(tmp_path / "data")
    for split in ("train", "val"):
        lines = []
        for i in range(4):
            label = root / "labels" / split / f"img{i}.png"
            raw = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
            mapped = np.where(raw == 255, 255, (raw.astype(int) + 1) * 10).astype(np.uint8)
            mapped[2:4, : 10 + 5 * i] = 40  # unlisted values: ignore after the map
            mapped[-1, 20:] = 7
            cv2.imwrite(str(root / "labels" / split / f"raw{i}.png"), mapped)
            lines.append(f"images\\\\{split}\\\\img{i}.png,labels/{split}/raw{i}.png")
        (root / f"{split}.txt").write_text("\r\n".join(lines) + "\r\n")
    (root / "map.json").write_text('{"10": 0, "20": 1, "30": 2}')
    return root


def test_label_map_values_are_what_the_training_batches_carry(tmp_path):
    root = _make_list_dataset(tmp_path)
    # The trainer's training set and loader; crop = image size, scale 1 and no jitter, so the
    # only geometric change left is the random horizontal flip, read back from the image.
    cfg = TrainConfig().replace(dataset="list", data_root=str(root),
                  train_list=str(root / "train.txt"), val_list=str(root / "val.txt"),
                  label_map=str(root / "map.json"), n_classes=3, crop_size=(48, 64),
                  scale_range=(1.0, 1.0), jitter=0.0, batch_size=2)
    train_set = build_dataset(cfg.data, "train", cfg.train_transform(), check_labels=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, num_workers=0,
                        sampler=InfiniteShardedSampler(len(train_set), cfg.batch_size))
    order = itertools.islice(iter(InfiniteShardedSampler(len(train_set), cfg.batch_size)), 8)
    samples = [index for index, _ in order]  # the loader's sample order, 2 epochs
    batches = itertools.islice(iter(loader), 4)
    pairs = itertools.chain.from_iterable(zip(*b, strict=True) for b in batches)
    for i, (image, label) in enumerate(pairs):
        image_path, label_path = train_set.pairs[samples[i]]
        raw = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        expected = np.array([[RAW_TO_CLASS.get(int(v), 255) for v in row] for row in raw])
        rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        flipped = not torch.equal(image, to_tensor(rgb, cfg.data.mean, cfg.data.std))
        if flipped:
            assert torch.equal(image, to_tensor(rgb[:, ::-1].copy(), cfg.data.mean, cfg.data.std))
            expected = expected[:, ::-1]
        assert label.dtype == torch.int64
        assert torch.equal(label, torch.from_numpy(np.ascontiguousarray(expected))), label_path
        upright = label.flip(-1) if flipped else label  # unlisted raw values are ignore
        assert (upright[2:4, :10] == 255).all() and (upright[-1, 20:] == 255).all()
    assert len(set(samples)) == 4  # every image was checked


def test_annotation_list_dataset_with_label_map_trains(tmp_path):
    root = _make_list_dataset(tmp_path)
    _run("bisenetv2/train.py", "--dataset", "list", "--data-root", str(root), "--train-list",
         str(root / "train.txt"), "--val-list", str(root / "val.txt"), "--label-map",
         str(root / "map.json"), "--n-classes", "3", "--device", "cpu", "--output-dir",
         str(tmp_path / "run"), "--crop-size", "48", "64", "--max-iter", "2", "--warmup-iter",
         "1", "--batch-size", "2", "--num-workers", "0")
    checkpoint = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert checkpoint["iteration"] == 2 and checkpoint["n_classes"] == 3
    assert checkpoint["config"]["label_map"] == str(root / "map.json")
    assert checkpoint["state_dict"]["head.conv_out.1.weight"].shape[0] == 3
