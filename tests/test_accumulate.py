"""Gradient accumulation (``--accumulate N``): the iteration's samples in N micro-batches, one
optimizer step. In float64 with BatchNorm frozen, dropout removed and a loss that averages the
same number of pixels in every micro-batch, the weights equal a hand-written large-batch SGD run;
the schedule, iteration count and resume are those of the large batch; under DDP the gradients
are all-reduced once per iteration. Real processes, signals and files where a run is involved."""

import copy
import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lib.common.distributed import DistInfo
from lib.data.dataset import dataset_info
from lib.data.sampler import InfiniteShardedSampler
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.checkpoint import load_checkpoint
from lib.training.config import TrainConfig
from lib.training.loop import train_loop
from lib.training.loss import OhemCrossEntropy
from lib.training.optim import build_optimizer
from lib.training.pipeline import TrainPipeline
from lib.training.runs import CHECKPOINT_PATTERN
from lib.training.setup import check_batch_split
from lib.training.state import RunState, base_lr, make_scheduler

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_CLASSES, SIZE, ITERATIONS = 5, 32, 2


class FrozenBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its running statistics in training mode too: a per-channel affine map, so
    that a sample's output does not depend on the other samples of its (micro-)batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class TinySegmenter(nn.Module):
    """A small two-output segmentation network (main and one auxiliary head, as the trainer
    expects) whose BatchNorm is frozen: BiSeNetV2 in float64 takes minutes on a busy CPU."""

    output_names = ("out", "aux")

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm(8),
                                  nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Conv2d(8, N_CLASSES, 1)
        self.aux_head = nn.Conv2d(8, N_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stem(x)
        return tuple(F.interpolate(head(features), size=x.shape[-2:], mode="bilinear")
                     for head in (self.head, self.aux_head))


def _frozen_model() -> nn.Module:
    torch.manual_seed(0)
    model = TinySegmenter()
    with torch.no_grad():  # BatchNorm statistics other than the identity
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model.double().train()


class _Samples:
    """10 fixed float64 samples, indexed as the trainer's datasets are: (index, sample seed)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.images = (torch.randn(10, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
                       + torch.randn(10, 3, 1, 1, generator=generator, dtype=torch.float64))
        # no ignored pixel: every micro-batch averages the loss over as many pixels
        self.labels = torch.randint(0, N_CLASSES, (10, SIZE, SIZE), generator=generator)

    def __len__(self) -> int:
        return 10

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[item[0]], self.labels[item[0]]


def _config(accumulate: int) -> TrainConfig:
    return TrainConfig().replace(n_classes=19, max_iter=ITERATIONS, warmup_iter=1, batch_size=8,
                       accumulate=accumulate, lr=0.01, log_every=1, checkpoint_every=0,
                       tensorboard=False)


def _trainer_run(tmp_path: Path, initial: nn.Module, accumulate: int,
                 scaler: torch.amp.GradScaler | None = None) -> RunState:
    """The trainer's loop over ``accumulate`` micro-batches of 8 / ``accumulate`` images."""
    cfg = _config(accumulate)
    model = copy.deepcopy(initial)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.head_lr_mult)
    state = RunState(cfg, dataset_info(cfg.data), tmp_path, model, optimizer,
                     make_scheduler(optimizer, cfg),
                     scaler or torch.amp.GradScaler("cpu", enabled=False))
    samples = _Samples()
    loader = DataLoader(samples, batch_size=8 // accumulate,
                        sampler=InfiniteShardedSampler(len(samples), 8, seed=cfg.seed))
    # OHEM keeping at least all pixels: the plain cross-entropy of the reference
    pipeline = TrainPipeline(loader, torch.device("cpu"), 0, None, None)
    train_loop(state, pipeline, OhemCrossEntropy(min_kept_ratio=1.0),
               DistInfo(0, 1, 0, torch.device("cpu")))
    return state


def _large_batch_reference(initial: nn.Module) -> tuple[dict, list[float], list[float]]:
    """Plain SGD on the whole batch of 8, written out: weights, losses and learning rates."""
    cfg = _config(1)
    model = copy.deepcopy(initial)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.head_lr_mult)
    scheduler = make_scheduler(optimizer, cfg)
    samples = _Samples()
    order = [index for index, _ in itertools.islice(
        iter(InfiniteShardedSampler(len(samples), 8, seed=cfg.seed)), 8 * ITERATIONS)]
    losses, lrs = [], []
    for it in range(ITERATIONS):
        batch = order[8 * it:8 * (it + 1)]
        outputs = model(samples.images[batch])
        terms = [F.cross_entropy(out, samples.labels[batch]) for out in outputs]
        loss = terms[0] + cfg.aux_weight * sum(terms[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        lrs.append(base_lr(optimizer))
    return model.state_dict(), losses, lrs


@pytest.fixture(scope="module")
def initial():
    return _frozen_model()


@pytest.fixture(scope="module")
def reference(initial):
    return _large_batch_reference(initial)


def _assert_weights_equal(weights: dict, ref_weights: dict, initial: nn.Module) -> None:
    start = initial.state_dict()
    moved = max((ref_weights[k] - start[k]).abs().max().item() for k in ref_weights)
    assert moved > 1e-3  # the comparison below is not met trivially
    for key, value in ref_weights.items():
        assert (weights[key] - value).abs().max().item() < 1e-10, key


@pytest.mark.parametrize("accumulate", [1, 4])
def test_accumulated_weights_equal_the_large_batch_in_float64(tmp_path, initial, reference,
                                                             accumulate):
    ref_weights, ref_losses, ref_lrs = reference
    state = _trainer_run(tmp_path, initial, accumulate)
    _assert_weights_equal(state.model.state_dict(), ref_weights, initial)
    # iterations, not micro-batches: one schedule step and one logged loss per iteration
    assert state.iteration == ITERATIONS and state.history.iterations == [1, 2]
    assert state.history.lr == pytest.approx(ref_lrs, rel=1e-12)
    assert state.history.loss == pytest.approx(ref_losses, rel=1e-6)  # logged in float32


def test_grad_scaler_scales_every_micro_batch_and_updates_once(tmp_path, initial, reference):
    """A power-of-two scale is exact: the weights are the unscaled ones; with growth after every
    step the scale doubles once per iteration, not once per micro-batch."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    state = _trainer_run(tmp_path, initial, 4, scaler)
    _assert_weights_equal(state.model.state_dict(), reference[0], initial)
    assert scaler.get_scale() == 2.0**(10 + ITERATIONS)


def test_batch_split_with_accumulation_is_checked():
    check_batch_split(16, 2, sync_bn=False, accumulate=4)  # 2 images per micro-batch
    with pytest.raises(ValueError, match="8 images per process, not divisible into "
                                         "--accumulate 3"):
        check_batch_split(16, 2, sync_bn=False, accumulate=3)
    with pytest.raises(ValueError, match=r"1 image per process and micro-batch \(--accumulate "
                                         "8\\); at least 2"):
        check_batch_split(16, 2, sync_bn=False, accumulate=8)
    check_batch_split(16, 2, sync_bn=True, accumulate=8)  # SyncBatchNorm: 2 images in total


# --- real training runs (bisenetv2/train.py on a toy Cityscapes) ---------------------------------

MAX_ITER = 4
# Runs bisenetv2/train.py after one change to the real trainer, made by the test: the loss sends
# this process a real SIGTERM at its SIGNAL_AT_CALL-th call (one call per micro-batch, for all
# outputs), i.e. inside a chosen micro-batch.
SIGNAL_LAUNCHER = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import lib.training.trainer as trainer

class SignallingLoss(trainer.OhemCrossEntropy):
    calls = 0

    def output_losses(self, outputs, labels):
        SignallingLoss.calls += 1
        if SignallingLoss.calls == int(os.environ["SIGNAL_AT_CALL"]):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().output_losses(outputs, labels)

trainer.OhemCrossEntropy = SignallingLoss
sys.argv[0] = "bisenetv2/train.py"
runpy.run_path("bisenetv2/train.py", run_name="__main__")
"""
# Runs bisenetv2/train.py with a DDP communication hook that records every bucket all-reduce
# (and still all-reduces it), written per rank to $COUNT_DIR/rank<R>.json.
COUNTING_LAUNCHER = """
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import lib.training.setup as setup
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

calls = []

class CountingDDP(setup.DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def hook(process_group, bucket):
            calls.append(bool(bucket.is_last()))
            return allreduce_hook(process_group, bucket)

        self.register_comm_hook(None, hook)

setup.DistributedDataParallel = CountingDDP
sys.argv[0] = "bisenetv2/train.py"
try:
    runpy.run_path("bisenetv2/train.py", run_name="__main__")
finally:
    path = os.path.join(os.environ["COUNT_DIR"], f"rank{os.environ['RANK']}.json")
    with open(path, "w") as file:
        json.dump(calls, file)
"""
LOG_LINE = re.compile(r"iter (\d+)/(\d+) \| lr (\S+) \| samples (\d+)")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return generate_toy_cityscapes(tmp_path_factory.mktemp("toy"), n_train=6, n_val=1,
                                   height=64, width=128)


def _args(toy_root: Path, out: Path, accumulate: int, batch: int = 4) -> list[str]:
    return ["--data-root", str(toy_root), "--device", "cpu", "--output-dir", str(out),
            "--crop-size", "64", "128", "--max-iter", str(MAX_ITER), "--warmup-iter", "1",
            "--batch-size", str(batch), "--accumulate", str(accumulate), "--num-workers", "0",
            "--log-every", "1", "--checkpoint-every", "0", "--no-eval-at-end", "--no-check-data",
            "--no-tensorboard", "--resume", "auto"]


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=600)


def _train(toy_root: Path, out: Path, accumulate: int) -> str:
    proc = _run([sys.executable, "bisenetv2/train.py", *_args(toy_root, out, accumulate)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _schedule(log: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in LOG_LINE.finditer(log)]


def test_sigterm_inside_an_accumulation_cycle_finishes_it_and_resumes_exactly(toy_root,
                                                                              tmp_path):
    reference_log = _train(toy_root, tmp_path / "reference", accumulate=2)
    # the schedule of the large batch: iterations, learning rates and samples seen
    plain_log = _train(toy_root, tmp_path / "plain", accumulate=1)
    assert len(_schedule(reference_log)) == MAX_ITER
    assert _schedule(reference_log) == _schedule(plain_log)
    assert "4 images per process per iteration in 2 micro-batches" in reference_log

    # one loss call per micro-batch: call 3 is that of iteration 2's first micro-batch
    launcher = tmp_path / "signalling_train.py"
    launcher.write_text(SIGNAL_LAUNCHER)
    out = tmp_path / "run"
    stopped = _run([sys.executable, str(launcher), *_args(toy_root, out, 2)],
                   SIGNAL_AT_CALL=str(1 * 2 + 1))
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == 130, log
    # the cycle is finished, not discarded: the checkpoint holds the whole iteration 2
    assert "stopping after iteration 2" in log and "Traceback" not in log
    assert load_checkpoint(out / CHECKPOINT_PATTERN.format(2))["iteration"] == 2
    resumed_log = _train(toy_root, out, accumulate=2)
    assert f"resumed from {out / CHECKPOINT_PATTERN.format(2)} at iteration 2" in resumed_log
    assert _schedule(resumed_log) == _schedule(reference_log)[2:]

    final, reference = (load_checkpoint(d / "model_final.pth") for d in (out, tmp_path /
                                                                        "reference"))
    assert final["iteration"] == reference["iteration"] == MAX_ITER
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_all_reduces_once_per_iteration_not_per_micro_batch(toy_root, tmp_path):
    launcher = tmp_path / "counting_train.py"
    launcher.write_text(COUNTING_LAUNCHER)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                 f"--master_port={_free_port()}", str(launcher),
                 *_args(toy_root, tmp_path / "ddp", accumulate=2, batch=8)],
                COUNT_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # one backward pass that all-reduces (its buckets, the last one marked) per iteration;
        # all-reducing every micro-batch would make 2 per iteration
        assert sum(calls) == MAX_ITER, calls
        assert calls[-1]  # (DDP re-buckets after the first iteration: 1 bucket, then 2)
    assert load_checkpoint(tmp_path / "ddp" / "model_final.pth")["iteration"] == MAX_ITER
