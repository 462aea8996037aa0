"""Training-step throughput of each execution variant, side by side, in one process.

A step is what the trainer runs per iteration: forward of the training model (auxiliary heads
included), the OHEM losses of every output, backward, and the SGD step with the recipe's
parameter groups. Data loading is not timed (the batches are random tensors made up front).

Variants (``--variants``; all by default):
  eager            fp32, contiguous (NCHW) tensors: the reference
  channels-last    fp32, model and inputs in channels-last layout
  compile          torch.compile of the model (fp32)
  compile+cl       both
  amp              bf16 autocast on the CPU, fp16 autocast + GradScaler on CUDA (``--fp16``)
  amp+cl           amp with channels-last
  compile+cl+amp   all three: the trainer's default step on CUDA for an ``--fp16`` recipe
  compile-autotune torch.compile mode max-autotune-no-cudagraphs (not in the default list: it
                   compiles for much longer)

Every variant starts from the same weights and sees the same batches; the losses of its first
``--compare-iters`` iterations are compared with eager's (fp32 variants must agree within 1e-4
relative). Dropout (BiSeNetV2's head) is replaced by the identity in every variant: its masks are
drawn in memory order, so channels-last and compiled models would draw other masks than eager,
and the losses could not be compared; it is one cheap op, so the timings hardly change.
The first iteration, which includes compilation for the compiled variants, is reported
separately. The steps are then timed in rounds that interleave the
variants (eager, channels-last, ..., eager, channels-last, ...), so that a machine whose load
changes over time affects every variant alike; the median round is reported.

    python tools/benchmark_train.py                               # V1 and V2, batch 8, 256x512
    python tools/benchmark_train.py --models bisenetv2 --variants eager channels-last
    python tools/benchmark_train.py --device cuda --size 512 1024 --batch 16

``--end-to-end`` times the training loop instead: the real loader (``lib/training/pipeline.py``,
over
full-size toy PNGs generated first, or ``--data-root``) feeding the step of the first model and
the first variant given, for each ``--workers`` count, without and with the decoded-image cache
(built before timing). Each row gives images/s, the fraction of the time spent waiting in
``next()`` for a batch (the trainer's "data N%") and the pure step's images/s on one batch kept
on the device, timed in the same process.

    python tools/benchmark_train.py --end-to-end --models bisenetv2 --variants eager \
        --size 256 512 --batch 8 --workers 0 1
"""

import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import cv2
import torch
from tabulate import tabulate
from torch import nn

from lib.common.distributed import select_device
from lib.data.dataset import build_dataset
from lib.data.sampler import InfiniteShardedSampler
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.zoo import build_model, model_names
from lib.training.config import TrainConfig
from lib.training.loop import iteration_seed
from lib.training.loss import OhemCrossEntropy
from lib.training.optim import build_optimizer
from lib.training.pipeline import build_train_loader
from lib.training.step import (
    autocast_context,
    compile_for_training,
    set_backend_defaults,
    step_losses,
    to_memory_format,
    without_dropout,
)

# variant name -> (channels-last, compile mode or None, autocast)
VARIANTS = {
    "eager": (False, None, False),
    "channels-last": (True, None, False),
    "compile": (False, "default", False),
    "compile+cl": (True, "default", False),
    "amp": (False, None, True),
    "amp+cl": (True, None, True),
    "compile+cl+amp": (True, "default", True),
    "compile-autotune": (False, "max-autotune-no-cudagraphs", False),
}
DEFAULT_VARIANTS = {"cpu": ("eager", "channels-last", "compile", "compile+cl", "amp"),
                    "cuda": ("eager", "channels-last", "compile", "compile+cl", "amp", "amp+cl",
                             "compile+cl+amp")}
# the torch.profiler ranges of a step (lib/train_step.step_losses and train_step below)
STEP_RANGES = ("forward", "loss", "backward", "optimizer")


@dataclass
class Runner:
    """One variant's model, optimizer and step function, and what was measured of it."""

    name: str
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    channels_last: bool
    amp: bool
    scaler: torch.amp.GradScaler  # enabled for fp16 on CUDA, as in the trainer
    first_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)


def make_runner(name: str, initial: nn.Module, device: torch.device, lr: float) -> Runner:
    channels_last, compile_mode, amp = VARIANTS[name]
    model = to_memory_format(copy.deepcopy(initial).to(device).train(), channels_last)
    net = compile_for_training(model, compile_mode) if compile_mode else model
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    return Runner(name, model, net, build_optimizer(model, lr), channels_last, amp, scaler)


def train_step(runner: Runner, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, seed: int) -> torch.Tensor:
    """One trainer iteration: losses, backward, SGD step (through the GradScaler with fp16)."""
    torch.manual_seed(seed)
    images = to_memory_format(images, runner.channels_last)
    loss, _ = step_losses(runner.net, criterion, images, labels, aux_weight=1.0,
                          autocast=autocast_context(images.device, runner.amp))
    runner.optimizer.zero_grad(set_to_none=True)
    with torch.profiler.record_function("backward"):
        runner.scaler.scale(loss).backward()
    with torch.profiler.record_function("optimizer"):
        runner.scaler.step(runner.optimizer)
        runner.scaler.update()
    return loss.detach()


def profile_step(runner: Runner, criterion: nn.Module, batch, device: torch.device,
                 rows: int) -> str:
    """torch.profiler's table of one more step: the ranges forward / loss / backward / optimizer
    and the operators that take the most time (device time on CUDA, CPU time otherwise)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_step(runner, criterion, *batch, seed=iteration_seed(0, 0, 0))
        _sync(device)
    averages = prof.key_averages()
    on_device = device.type == "cuda"
    ranges = {event.key: (event.device_time_total if on_device else event.cpu_time_total) / 1e3
              for event in averages if event.key in STEP_RANGES}
    summary = ", ".join(f"{name} {ranges.get(name, 0.0):.1f} ms" for name in STEP_RANGES)
    sort_by = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    return (f"{'device' if on_device else 'CPU'} time per part of the step: {summary}\n"
            + averages.table(sort_by=sort_by, row_limit=rows))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_model(model_name: str, variants: list[str], args, device: torch.device) -> list:
    torch.manual_seed(0)
    initial = without_dropout(build_model(model_name, 19, aux_heads=True))
    criterion = OhemCrossEntropy()
    n_batches = max(args.compare_iters, args.iters)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        images = torch.randn(args.batch, 3, *args.size, generator=generator)
        labels = torch.randint(0, 19, (args.batch, *args.size), generator=generator)
        labels[:, : args.size[0] // 8] = 255  # some ignored pixels, as in real labels
        batches.append((images.to(device), labels.to(device)))
    runners = [make_runner(name, initial, device, args.lr) for name in variants]

    # 1. warm-up (and compilation), the same first iterations for every variant
    for runner in runners:
        for it in range(args.compare_iters):
            _sync(device)
            tic = time.perf_counter()
            loss = train_step(runner, criterion, *batches[it], seed=iteration_seed(0, 0, it))
            runner.losses.append(float(loss))  # synchronises
            if it == 0:
                runner.first_s = time.perf_counter() - tic
        print(f"{model_name} {runner.name}: first iteration {runner.first_s:.1f} s", flush=True)

    # 2. timed rounds, interleaved
    for _ in range(args.rounds):
        for runner in runners:
            _sync(device)
            tic = time.perf_counter()
            for it in range(args.iters):
                train_step(runner, criterion, *batches[it], seed=iteration_seed(0, 0, it))
            _sync(device)
            runner.round_s.append((time.perf_counter() - tic) / args.iters)

    if args.profile:
        for runner in runners:
            print(f"{model_name} {runner.name}: torch.profiler, one step", flush=True)
            print(profile_step(runner, criterion, batches[0], device, args.profile), flush=True)

    reference = next((r for r in runners if r.name == "eager"), None)
    rows = []
    for runner in runners:
        step = statistics.median(runner.round_s)
        row = [model_name, runner.name, f"{runner.first_s:.1f}", f"{step:.3f}",
               f"{args.batch / step:.2f}"]
        if reference is not None:
            ratio = statistics.median(runner.round_s) / statistics.median(reference.round_s)
            diff = max(abs(a - b) / abs(b) for a, b in zip(runner.losses, reference.losses,
                                                            strict=True))
            row += [f"{1 / ratio:.2f}x", f"{diff:.1e}"]
        rows.append(row)
    return rows


def end_to_end(args, device: torch.device, root: pathlib.Path, cache_dir: pathlib.Path) -> list:
    """Rows (workers, cache, images/s, data wait, pure step images/s) of the real loop."""
    model_name, variant = args.models[0], args.variants[0]
    # the main process loads (0 workers) as a worker does, with one OpenCV thread; an OpenCV
    # thread pool started here would also hang the workers forked later in cv2.setNumThreads
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    initial = without_dropout(build_model(model_name, 19, aux_heads=True))
    criterion = OhemCrossEntropy()
    rows = []
    for workers in args.workers:
        for cache in ("off", str(cache_dir)):
            cfg = TrainConfig().replace(
                data_root=str(root), crop_size=tuple(args.size),
                batch_size=args.batch, num_workers=None if workers < 0 else workers,
                data_cache=cache, device=device.type)
            dataset = build_dataset(cfg.data, "train", cfg.train_transform())
            sampler = InfiniteShardedSampler(len(dataset), args.batch, seed=0)
            pipeline = build_train_loader(cfg, dataset, sampler, device, 1)
            if pipeline.cache is not None:  # built before timing: the steady state
                for index in range(len(dataset)):
                    pipeline.cache.load(index, dataset)
            runner = make_runner(variant, initial, device, args.lr)
            batches = iter(pipeline.loader)
            waited = 0.0
            for it in range(args.compare_iters + args.iters):  # the first ones warm up
                if it == args.compare_iters:
                    _sync(device)
                    start = time.perf_counter()
                tic = time.perf_counter()
                images, labels = next(batches)  # as the trainer: no synchronisation per step
                waited += time.perf_counter() - tic if it >= args.compare_iters else 0.0
                images, labels = pipeline.to_device(images, labels)
                train_step(runner, criterion, images, labels, seed=iteration_seed(0, 0, it))
            _sync(device)
            total = time.perf_counter() - start
            del batches
            _sync(device)
            tic = time.perf_counter()
            for it in range(args.iters):  # the same step on the last batch, already there
                train_step(runner, criterion, images, labels, seed=iteration_seed(0, 0, it))
            _sync(device)
            step = (time.perf_counter() - tic) / args.iters
            rows.append([model_name, variant, pipeline.num_workers, cache != "off",
                         f"{args.batch * args.iters / total:.2f}", f"{100 * waited / total:.0f}%",
                         f"{args.batch / step:.2f}"])
            print(f"workers {pipeline.num_workers}, cache {cache != 'off'}: {rows[-1][4]} "
                  f"images/s, data {rows[-1][5]}", flush=True)
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bisenetv1", "bisenetv2"],
                        choices=model_names())
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: " + "; ".join(f"{device}: {' '.join(names)}" for
                                                     device, names in DEFAULT_VARIANTS.items()))
    parser.add_argument("--size", nargs=2, type=int, default=(256, 512), metavar=("H", "W"),
                        help="crop height and width")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (the median is reported)")
    parser.add_argument("--compare-iters", type=int, default=3,
                        help="first iterations whose losses are compared with eager's")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, print torch.profiler's table (ROWS operators) of one "
                        "step of each variant (0: off)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time the real loader and the step together (see above)")
    parser.add_argument("--workers", nargs="+", type=int, default=[-1],
                        help="--end-to-end: worker counts to time (-1: the trainer's automatic "
                        "choice)")
    parser.add_argument("--data-root", default=None,
                        help="--end-to-end: Cityscapes-layout root (default: generated toy PNGs)")
    parser.add_argument("--images", type=int, default=8,
                        help="--end-to-end: toy images to generate")
    parser.add_argument("--image-size", nargs=2, type=int, default=(1024, 2048),
                        metavar=("H", "W"), help="--end-to-end: toy image height and width")
    args = parser.parse_args(argv)
    if args.compare_iters < 1 or args.iters < 1 or args.rounds < 1:
        parser.error("--compare-iters, --iters and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    args.variants = args.variants or list(DEFAULT_VARIANTS.get(device.type,
                                                               DEFAULT_VARIANTS["cpu"]))
    set_backend_defaults(device)  # cudnn.benchmark on CUDA, as the trainer sets it
    amp = "fp16 autocast + GradScaler" if device.type == "cuda" else "bf16 autocast"
    timing = (f"{args.compare_iters} warm-up + {args.iters} timed iterations per row"
              if args.end_to_end else f"{args.rounds} interleaved rounds of {args.iters} steps")
    print(f"device {device} ({device_name(device)}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, cudnn.benchmark {torch.backends.cudnn.benchmark}; "
          f"batch {args.batch} at {args.size[0]}x{args.size[1]}; amp = {amp}; "
          f"{timing}", flush=True)
    if args.end_to_end:
        with tempfile.TemporaryDirectory() as tmp:
            root = pathlib.Path(args.data_root) if args.data_root else generate_toy_cityscapes(
                pathlib.Path(tmp) / "toy", n_train=args.images, n_val=0,
                height=args.image_size[0], width=args.image_size[1])
            rows = end_to_end(args, device, root, pathlib.Path(tmp) / "cache")
        print(tabulate(rows, tablefmt="github", headers=[
            "model", "variant", "workers", "decoded cache", "images/s", "data wait",
            "pure step images/s"]))
        return rows
    rows = []
    for model_name in args.models:
        rows += benchmark_model(model_name, args.variants, args, device)
    headers = ["model", "variant", "first it. (s, incl. compile)", "step (s)", "images/s"]
    if "eager" in args.variants:
        headers += ["vs eager", f"max rel. loss diff, {args.compare_iters} it."]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
