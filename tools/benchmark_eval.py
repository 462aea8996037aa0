"""Time the four evaluation protocols (ss, ssc, msf, mscf) on random full-size images.

    python tools/benchmark_eval.py                # BiSeNetV2, one 1024x2048 image, all modes
    python tools/benchmark_eval.py --n 3 --device cuda
    python tools/benchmark_eval.py --size 512 1024 --mode ss msf

What is timed, per image: ``lib.evaluation.evaluator.predict_scores`` followed by the arg-max, i.e.
every
network forward pass (batch 1, or ``--crop-batch`` crops), the softmax, the image and score
resizing and the crop stitching, in eager PyTorch, float32, with random weights (the speed does
not depend on them). Not timed: reading/decoding/normalising the image, copying it to the device,
the confusion matrix and PNG writing. On CUDA the device is synchronised before and after.

Each mode runs in its own subprocess so that its peak memory is its own: on the CPU the growth of
the peak resident set size (``getrusage`` ``ru_maxrss``) over the process's size after building
the model and the input, on CUDA ``torch.cuda.max_memory_allocated`` over the memory allocated
before the run (tensors only, without the caching allocator's slack).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import resource
import subprocess
import time
from dataclasses import replace
from typing import Any

import torch

from lib.common.distributed import select_device
from lib.evaluation.command import add_protocol_arguments, protocol_options
from lib.evaluation.evaluator import MODES, predict_scores
from lib.models.zoo import build_model, model_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=model_names(), default="bisenetv2")
    parser.add_argument("--n-classes", type=int, default=19)
    parser.add_argument("--n", type=int, default=1, help="timed images per mode")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs first (default: 1 on CUDA, 0 on the CPU)")
    parser.add_argument("--size", nargs=2, type=int, default=[1024, 2048], metavar=("H", "W"))
    add_protocol_arguments(parser)
    parser.set_defaults(mode=list(MODES))  # every mode unless --mode says otherwise
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    return parser


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Time ``mode`` in this process; returns seconds per image, memory and pass counts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, args.n_classes, aux_heads=False).eval().to(device)
    image = torch.randn(1, 3, *args.size, device=device)
    calls = {"forwards": 0, "pixels": 0}

    def count(_module, inputs):
        calls["forwards"] += 1
        calls["pixels"] += inputs[0].shape[0] * inputs[0].shape[-2] * inputs[0].shape[-1]

    hook = model.register_forward_pre_hook(count)
    options = replace(protocol_options(args), modes=(mode,))

    def predict() -> None:
        predict_scores(model, image, options, args.n_classes)[mode].argmax(1)

    cuda = device.type == "cuda"
    for _ in range(args.warmup if args.warmup is not None else int(cuda)):
        predict()
    calls.update(forwards=0, pixels=0)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    times = []
    for _ in range(args.n):
        start = time.perf_counter()
        predict()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    hook.remove()
    return {"mode": mode, "seconds": sum(times) / len(times), "min_seconds": min(times),
            "peak_mib": peak / 2**20, "forwards": calls["forwards"] // args.n,
            "mpix": calls["pixels"] / args.n / 1e6, "device": str(device),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_mode(args, args.worker)))
        return []
    from tabulate import tabulate

    argv = list(sys.argv[1:] if argv is None else argv)
    rows = []
    options = protocol_options(args)
    for mode in options.modes:
        done = subprocess.run([sys.executable, __file__, *argv, "--worker", mode],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"benchmark of {mode} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {rows[-1]['seconds']:.3f} s/image", file=sys.stderr, flush=True)
    first = rows[0]
    print(f"{args.model}, random {args.size[0]}x{args.size[1]} input, {first['device']}"
          f" ({first['threads']} CPU threads), {args.n} image(s) per mode; "
          f"{options.describe()}, crop batch {options.crop_batch}")
    print("timed: predict_scores + argmax (forwards, softmax, resizing, crop stitching); "
          "not timed: image loading/normalisation, host-to-device copy, metrics")
    memory = "peak CUDA MiB" if first["device"].startswith("cuda") else "peak RSS growth MiB"
    print(tabulate([[r["mode"], f"{r['seconds']:.3f}", r["forwards"], f"{r['mpix']:.2f}",
                     f"{r['peak_mib']:.0f}"] for r in rows],
                   headers=["mode", "s / image", "net forwards", "Mpx through net", memory],
                   tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
