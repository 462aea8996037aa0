"""Training you can watch: validation during training with model_best.pth, TensorBoard event files,
EMA of the weights, the image | ground truth | prediction picture, curves.png and the progress bar.

Real training processes on a tiny generated Cityscapes tree, real files read back with independent
readers (TensorBoard's own event reader, cityscapesscripts' label table, OpenCV).
"""

import fcntl
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from helpers import train_command
from sklearn.metrics import accuracy_score, f1_score, jaccard_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lib.common.visualize import LEGEND_SWATCH, prediction_panel
from lib.data.dataset import build_dataset
from lib.data.datasets.cityscapes import CLASS_NAMES
from lib.deployment.inference import to_inference_form
from lib.evaluation.evaluator import EvalOptions, evaluate
from lib.evaluation.metrics import iou_from_confusion
from lib.models.checkpoint import load_checkpoint, load_model
from lib.models.zoo import build_model
from lib.training.config import TrainConfig
from lib.training.ema import WeightEma
from lib.training.loop import record_progress
from lib.training.monitor import EventLog
from lib.training.state import RunState, make_scheduler

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
H, W, MAX_ITER = 64, 128, 4
# independent of lib/: the official table's train ids and colours
TRAIN_ID = np.full(256, 255, np.uint8)
PALETTE = np.zeros((19, 3), np.uint8)
for _label in cityscapes_labels:
    if _label.id >= 0:
        TRAIN_ID[_label.id] = _label.trainId if 0 <= _label.trainId < 19 else 255
    if 0 <= _label.trainId < 19:
        PALETTE[_label.trainId] = _label.color
ITER_LINE = re.compile(r"iter (\d+)/\d+ \| lr ([0-9.e-]+) \| samples \d+ \| loss ([0-9.]+) ")
VAL_LINE = re.compile(r"validation at iteration (\d+) .*: raw mIoU ([0-9.]+)% \| ema mIoU "
                      r"([0-9.]+)%")


@pytest.fixture(scope="module")
def toy_root(make_toy):
    return make_toy(n_train=4, n_val=2, height=H, width=W)


def _command(toy_root, out, *extra):
    # -W error: no deprecation warning from our code paths (nor TensorBoard's, nor protobuf's)
    return train_command(toy_root, out, "--crop-size", str(H), str(W), "--max-iter",
                         str(MAX_ITER), "--log-every", "1", "--checkpoint-every", "2",
                         "--keep-checkpoints", "10", "--eval-every", "2", "--ema-decay", "0.9",
                         *extra, python=(sys.executable, "-W", "error::DeprecationWarning"))


@pytest.fixture(scope="module")
def watched_run(toy_root, tmp_path_factory):
    """An uninterrupted run with validation every 2 iterations, EMA and TensorBoard."""
    out = tmp_path_factory.mktemp("watched")
    proc = subprocess.run(_command(toy_root, out), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, (out / "train.log").read_text(), proc.stdout + proc.stderr


def _label_of(image_path: str) -> np.ndarray:
    label_path = image_path.replace("leftImg8bit", "gtFine", 1).replace(
        "_leftImg8bit.png", "_gtFine_labelIds.png")
    return TRAIN_ID[cv2.imread(label_path, cv2.IMREAD_UNCHANGED)]


def _colour(train_ids: np.ndarray) -> np.ndarray:
    out = np.zeros((*train_ids.shape, 3), np.uint8)  # ignore: black
    valid = train_ids < 19
    out[valid] = PALETTE[train_ids[valid]]
    return out


def _rgb(path_or_bytes) -> np.ndarray:
    if isinstance(path_or_bytes, bytes):
        bgr = cv2.imdecode(np.frombuffer(path_or_bytes, np.uint8), cv2.IMREAD_COLOR)
    else:
        bgr = cv2.imread(str(path_or_bytes), cv2.IMREAD_COLOR)
    return bgr[..., ::-1]


def _assert_panels(panel: np.ndarray, image_path: str, lean: nn.Module, cfg: TrainConfig):
    """image | ground truth | prediction over a legend holding exactly the classes shown."""
    assert panel.shape[1] == 3 * W and panel.shape[0] > H
    image, truth, pred_panel = panel[:H, :W], panel[:H, W:2 * W], panel[:H, 2 * W:]
    np.testing.assert_array_equal(image, _rgb(image_path))
    label = _label_of(image_path)
    np.testing.assert_array_equal(truth, _colour(label))
    dataset = build_dataset(cfg.data, "val")
    index = [str(p[0]) for p in dataset.pairs].index(image_path)
    with torch.inference_mode():
        pred = lean(dataset[index][0][None]).argmax(1)[0].numpy().astype(np.uint8)
    np.testing.assert_array_equal(pred_panel, _colour(pred))
    legend = panel[H:].reshape(-1, 3)
    shown = set(np.unique(label)) | set(np.unique(pred))
    for class_id in range(19):
        count = int((legend == PALETTE[class_id]).all(1).sum())
        if class_id in shown:
            assert count >= LEGEND_SWATCH**2, class_id
        elif PALETTE[class_id].std() > 30:  # saturated colours cannot come from grey text
            assert count == 0, class_id


def test_validation_keeps_the_best_model_of_the_logged_mious(watched_run, toy_root):
    out, log, _ = watched_run
    logged = {int(it): {"raw": float(raw), "ema": float(ema)}
              for it, raw, ema in VAL_LINE.findall(log)}
    assert sorted(logged) == [2, 4]
    best_value = max(v for per_it in logged.values() for v in per_it.values())
    best = load_checkpoint(out / "model_best.pth")
    assert "optimizer" not in best  # a model file, loadable by evaluate.py and demo.py
    assert abs(100 * best["best_miou"] - best_value) < 0.005 + 1e-9
    assert abs(logged[best["iteration"]][best["weights"]] - best_value) < 0.01
    # the weights inside are the raw or EMA weights of that iteration, as checkpointed
    at = load_checkpoint(out / ("model_final.pth" if best["iteration"] == MAX_ITER
                                else f"checkpoint_iter{best['iteration']:07d}.pth"))
    source = at["state_dict"] if best["weights"] == "raw" else at["ema"]["state_dict"]
    for key, value in source.items():
        assert torch.equal(value, best["state_dict"][key]), key
    # and they score that mIoU when evaluated again
    model, _ = load_model(out / "model_best.pth")
    cfg = TrainConfig().replace(data_root=str(toy_root))
    conf = evaluate(to_inference_form(model), build_dataset(cfg.data, "val"), 19,
                    EvalOptions(modes=("ss",)), device="cpu", progress=False, num_workers=0)["ss"]
    # the same weights on the same images, CPU and thread count (the ranks run one thread each):
    # the same float32 computation and confusion counts (abs 1e-7 only absorbs the float64 mIoU
    # stored in the checkpoint)
    assert iou_from_confusion(conf)[1] == pytest.approx(best["best_miou"], abs=1e-7)
    # the bookkeeping travels in the resumable checkpoints
    final = load_checkpoint(out / "model_final.pth")
    assert final["best"] == {"miou": best["best_miou"], "iteration": best["iteration"],
                             "weights": best["weights"]}


def test_event_files_hold_the_scalars_and_images(watched_run, toy_root):
    out, log, _ = watched_run
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    trained = {int(it): (float(lr), float(loss)) for it, lr, loss in ITER_LINE.findall(log)}
    assert sorted(trained) == list(range(1, MAX_ITER + 1))
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(loss) == sorted(lr) == sorted(trained)
    # the log prints the loss to 4 decimals and the lr to 6 digits; TensorBoard stores float32
    for it, (logged_lr, logged_loss) in trained.items():
        assert loss[it] == pytest.approx(logged_loss, abs=1e-4)
        assert lr[it] == pytest.approx(logged_lr, rel=1e-5, abs=1e-9)
    for head in ("out", "aux2", "aux3", "aux4", "aux5_4"):
        assert len(events.Scalars(f"train/loss_{head}")) == MAX_ITER
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
    assert "train/grad_scale" not in tags["scalars"]  # no GradScaler on the CPU
    val = {e.step: e.value for e in events.Scalars("val/mIoU")}
    for it, raw, ema in VAL_LINE.findall(log):
        assert val[int(it)] == pytest.approx(float(raw), abs=0.005)
        ema_scalar = {e.step: e.value for e in events.Scalars("val_ema/mIoU")}[int(it)]
        assert ema_scalar == pytest.approx(float(ema), abs=0.005)
    assert "val_iou/road" in tags["scalars"] and "val_ema_iou/road" in tags["scalars"]
    # per-class IoUs average to the mIoU (classes without IoU are not written)
    last = [e.value for t in tags["scalars"] if t.startswith("val_iou/")
            for e in events.Scalars(t) if e.step == MAX_ITER]
    mean = np.mean(last)
    assert mean == pytest.approx(val[MAX_ITER], abs=1e-3)
    # one picture per validation image (2 here), at each validation, checked pixel by pixel
    assert sorted(t for t in tags["images"]) == ["val/prediction_0", "val/prediction_1"]
    shots = events.Images("val/prediction_0")
    assert [s.step for s in shots] == [2, 4]
    cfg = TrainConfig().replace(data_root=str(toy_root))
    first_image = str(build_dataset(cfg.data, "val").pairs[0][0])
    lean = to_inference_form(load_model(out / "model_final.pth")[0])
    _assert_panels(_rgb(shots[-1].encoded_image_string), first_image, lean, cfg)


def test_pictures_after_training(watched_run, toy_root):
    out, log, _ = watched_run
    example = re.search(r"prediction of (\S+) written to (\S+)", log)
    assert example[2] == str(out / "example_prediction.png")
    cfg = TrainConfig().replace(data_root=str(toy_root))
    lean = to_inference_form(load_model(out / "model_final.pth")[0])
    _assert_panels(_rgb(out / "example_prediction.png"), example[1], lean, cfg)
    # drawn by matplotlib (tests/test_curves.py checks the figure): 8 x 9 inches at 100 dpi
    assert _rgb(out / "curves.png").shape == (900, 800, 3)


def test_ema_weights_differ_from_the_raw_ones_and_are_saved_beside_them(watched_run):
    out, log, _ = watched_run
    raw = load_checkpoint(out / "model_final.pth")
    ema = load_checkpoint(out / "model_final_ema.pth")
    assert "optimizer" not in ema and ema["iteration"] == MAX_ITER
    assert raw["ema"]["updates"] == MAX_ITER and raw["ema"]["decay"] == 0.9
    different = [k for k, v in raw["state_dict"].items()
                 if v.is_floating_point() and not torch.equal(v, ema["state_dict"][k])]
    assert len(different) > len(raw["state_dict"]) // 2
    for key, value in raw["ema"]["state_dict"].items():
        assert torch.equal(value, ema["state_dict"][key]), key
    assert "validation of the EMA weights" in log


def test_ema_follows_its_formula_step_by_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = WeightEma(model, decay=0.8)
    tracked = {k: v.clone().double() for k, v in model.state_dict().items()}
    for step in range(12):
        loss = model(torch.randn(2, 3, 8, 8)).square().mean()  # also moves BatchNorm statistics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        d = min(0.8, (1 + step) / (10 + step))  # the warm-up: 0.1, 0.18, ... then 0.8
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                tracked[key] = d * tracked[key] + (1 - d) * value.double()
            else:
                tracked[key] = value.clone()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            # float32 EMA against a float64 one: a few elementwise steps, each rounded to
            # within 1 ulp (6e-8) on any CPU
            torch.testing.assert_close(value.double(), tracked[key], rtol=1e-6, atol=1e-7)
            assert not torch.equal(value, model.state_dict()[key]), key
        else:
            assert torch.equal(value, tracked[key]), key
    assert not any(p.requires_grad for p in ema.module.parameters())


def _read_all(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the other end closed
            return
        if not data:
            return
        chunks.append(data)


def test_interrupted_and_resumed_equals_uninterrupted_with_ema_and_best_model(
        watched_run, toy_root, tmp_path):
    reference, _, _ = watched_run
    out = tmp_path / "run"
    command = _command(toy_root, out, "--no-tensorboard")
    proc = subprocess.Popen(command + ["--no-eval-at-end"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"iter 2/{MAX_ITER}" in line:  # lands in the validation at 2 or in iteration 3
            proc.send_signal(signal.SIGTERM)
            break
    lines.extend(proc.stdout)
    assert proc.wait(timeout=300) == 130, "".join(lines)
    stopped = int(re.search(r"stopping after iteration (\d+)", "".join(lines))[1])
    assert 2 <= stopped < MAX_ITER

    # resumed with stderr on a terminal: a progress bar, for the data check too
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a real size
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(master, chunks))
    reader.start()
    resumed = subprocess.run(command + ["--resume", "auto"], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=slave, text=True, timeout=600)
    os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert resumed.returncode == 0, resumed.stdout + terminal
    assert f"resumed from {out / f'checkpoint_iter{stopped:07d}.pth'}" in resumed.stdout
    assert re.search(r"checking train: 100%\|.*\| 4/4", terminal), terminal
    assert re.search(rf"train: 100%\|.*\| {MAX_ITER}/{MAX_ITER} \[.*loss=", terminal), terminal
    assert "| loss " in resumed.stdout  # the log lines are still printed (above the bar)

    assert not list(out.glob("events.out.tfevents*"))  # --no-tensorboard: no event file
    final, expected = (load_checkpoint(p / "model_final.pth") for p in (out, reference))
    for part in ("state_dict", "ema"):
        mine = final[part] if part == "state_dict" else final[part]["state_dict"]
        theirs = expected[part] if part == "state_dict" else expected[part]["state_dict"]
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(value, mine[key]), (part, key)
    assert final["ema"]["updates"] == expected["ema"]["updates"]
    assert final["best"] == expected["best"]
    assert final["history"] == expected["history"]
    best, expected_best = (load_checkpoint(p / "model_best.pth") for p in (out, reference))
    assert best["best_miou"] == expected_best["best_miou"]
    for key, value in expected_best["state_dict"].items():
        assert torch.equal(value, best["state_dict"][key]), key
    for name in ("model_final_ema.pth", "curves.png"):
        assert (out / name).is_file()


def test_a_pipe_gets_log_lines_and_no_progress_bars(watched_run):
    _, log, console = watched_run
    # the label check, the iterations, the validations and the final evaluation all ran ...
    assert "checking every label" in log and f"iter {MAX_ITER}/{MAX_ITER}" in log
    assert "validation (" in log and "validation at iteration" in console
    # ... and none of them drew a tqdm bar ("  50%|#####     | 1/2") into the pipe
    assert not re.search(r"\d+%\|", console), console


def test_prediction_panel_pixels_and_legend():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.choice([0, 2, 13, 255], size=(20, 30)).astype(np.uint8)
    pred = rng.choice([0, 11], size=(20, 30)).astype(np.uint8)
    names = [f"class{i}" for i in range(19)]
    panel = prediction_panel(image, label, pred, PALETTE, names)
    assert panel.shape[1] == 90 and panel.shape[0] > 20
    np.testing.assert_array_equal(panel[:20, :30], image)
    np.testing.assert_array_equal(panel[:20, 30:60], _colour(label))
    np.testing.assert_array_equal(panel[:20, 60:], _colour(pred))
    legend = panel[20:].reshape(-1, 3)
    for class_id in (0, 2, 11, 13):
        assert (legend == PALETTE[class_id]).all(1).sum() >= LEGEND_SWATCH**2
    for class_id in (6, 12, 18):  # absent: traffic light, rider, bicycle
        assert not (legend == PALETTE[class_id]).all(1).any()
    with pytest.raises(ValueError, match="same size"):
        prediction_panel(image, label[:10], pred, PALETTE, names)


def test_two_processes_validate_their_shares_and_rank_0_writes(toy_root, tmp_path, one_thread):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    command = _command(toy_root, out, "--max-iter", "2", "--no-eval-at-end")
    command[3:4] = ["-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={port}", "bisenetv2/train.py"]
    proc = subprocess.run(command, cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(VAL_LINE.findall(proc.stdout)) == 1  # logged once, by rank 0
    assert len(list(out.glob("events.out.tfevents*"))) == 1
    best = load_checkpoint(out / "model_best.pth")
    assert best["iteration"] == 2
    # each rank evaluated one of the 2 images; the summed matrices give the whole set's mIoU
    model, _ = load_model(out / "model_best.pth")
    cfg = TrainConfig().replace(data_root=str(toy_root))
    conf = evaluate(to_inference_form(model), build_dataset(cfg.data, "val"), 19,
                    EvalOptions(modes=("ss",)), device="cpu", progress=False, num_workers=0)["ss"]
    # the same weights on the same images, CPU and thread count (the ranks run one thread each):
    # the same float32 computation and confusion counts (abs 1e-7 only absorbs the float64 mIoU
    # stored in the checkpoint)
    assert iou_from_confusion(conf)[1] == pytest.approx(best["best_miou"], abs=1e-7)


def test_logged_values_reach_the_history_and_the_event_file_with_the_grad_scale(tmp_path):
    cfg = TrainConfig(max_iter=10, warmup_iter=1, batch_size=16)
    model = build_model("bisenetv2", 19, aux_heads=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # as on CUDA with --fp16
    state = RunState(cfg, None, tmp_path, model, optimizer, make_scheduler(optimizer, cfg, 5),
                     scaler, iteration=5)
    events = EventLog(tmp_path)
    record_progress(state, events, [1.5, 0.5, 0.25, 0.25, 0.25, 0.25], count=5, elapsed=2.0)
    events.close()
    lr = optimizer.param_groups[0]["lr"]
    assert state.history.iterations == [5] and state.history.loss == [1.5]
    assert state.history.lr == [lr]
    read = EventAccumulator(str(tmp_path))
    read.Reload()
    values = {tag: [(e.step, e.value) for e in read.Scalars(tag)]
              for tag in read.Tags()["scalars"]}
    assert values["train/grad_scale"] == [(5, 1024.0)]
    assert values["train/images_per_s"] == [(5, 5 * 16 / 2.0)]
    assert values["train/loss"] == [(5, 1.5)] and values["train/loss_aux2"] == [(5, 0.25)]
    assert values["train/lr"][0][1] == pytest.approx(lr, rel=1e-6)


SCORES_LINE = re.compile(r"validation at iteration (\d+) .*; raw pixel accuracy ([0-9.]+)%, "
                         r"fwIoU ([0-9.]+)%, macro F1 ([0-9.]+)%, micro F1 ([0-9.]+)%;")


def test_validation_logs_and_writes_the_reference_scores(watched_run, toy_root):
    out, log, _ = watched_run
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    logged = {int(it): [float(v) for v in values] for it, *values in SCORES_LINE.findall(log)}
    assert sorted(logged) == [2, MAX_ITER]
    keys = ("pixel_accuracy", "fwIoU", "macro_F1", "micro_F1")
    for it, values in logged.items():
        for key, value in zip(keys, values, strict=True):
            scalar = {e.step: e.value for e in events.Scalars(f"val/{key}")}[it]
            assert scalar == pytest.approx(value, abs=0.005), key
    # the last validation scored the final raw weights: scikit-learn on their predictions
    cfg = TrainConfig().replace(data_root=str(toy_root))
    dataset = build_dataset(cfg.data, "val")
    lean = to_inference_form(load_model(out / "model_final.pth")[0])
    truth, pred = [], []
    with torch.inference_mode():
        for i in range(len(dataset)):
            image, label = dataset[i]
            truth.append(label.numpy().ravel())
            pred.append(lean(image[None]).argmax(1)[0].numpy().ravel())
    y, p = np.concatenate(truth), np.concatenate(pred)
    y, p = y[y != 255], p[y != 255]
    labels = list(range(19))
    expected = {
        "pixel_accuracy": accuracy_score(y, p),
        "fwIoU": jaccard_score(y, p, labels=labels, average="weighted", zero_division=0.0),
        "macro_F1": f1_score(y, p, labels=labels, average="macro", zero_division=np.nan),
        "micro_F1": f1_score(y, p, labels=labels, average="micro"),
    }
    for key, value in expected.items():
        scalar = {e.step: e.value for e in events.Scalars(f"val/{key}")}[MAX_ITER]
        assert scalar == pytest.approx(100 * value, abs=1e-3), key
    per_class = f1_score(y, p, labels=labels, average=None, zero_division=np.nan)
    for c, name in enumerate(CLASS_NAMES):
        tag = f"val_f1/{name.replace(' ', '_')}"
        if np.isnan(per_class[c]):
            assert tag not in events.Tags()["scalars"] or MAX_ITER not in {
                e.step for e in events.Scalars(tag)}
        else:
            scalar = {e.step: e.value for e in events.Scalars(tag)}[MAX_ITER]
            assert scalar == pytest.approx(100 * per_class[c], abs=1e-3), name
