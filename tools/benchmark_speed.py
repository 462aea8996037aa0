"""Inference speed of each model under every runtime and precision available, one table per
device: latency, FPS, peak memory, and the ratio to the FLOP-bound limit measured here.

What is timed (stated again in the output): the network's forward pass on a normalised float
batch already on the device, plus the final bilinear upsampling of the logits and the arg-max.
Not timed: reading and decoding images, resizing the input, normalisation, copies to the device.

The FLOP-bound limit is the model's FLOPs (``tools/model_stats.py``'s counter: convolutions and
matrix products, 2 per multiply-add) divided by the fp32 matrix-product peak that the script
measures first on the same device (a large ``torch.mm``, best of several); ``x limit`` is the
latency divided by it (1.0 = as fast as the arithmetic allows at fp32 matmul speed; int8 and
bf16 can go below 1).

Variants: torch fp32 (BatchNorm folded, channels-last), torch bf16 (autocast; listed where the
CPU has native bf16 or on CUDA), torch fp16 (CUDA), onnxruntime fp32, openvino fp32 (CPU), and
onnxruntime int8 / openvino int8 (CPU: the int8 QDQ graph of ``lib/deployment/quantize.py``,
calibrated here
on random images: speed does not depend on the calibration). Runtimes whose package is missing
are listed as skipped. Each variant runs in its own process, so peak memory is its own.

  --protocol full   (default) the input is fed at --size, the labels come out at --size.
  --protocol paper  the papers' protocol: a 1024x2048 frame is fed at 512x1024 and the logits are
                    upsampled back to 1024x2048 before the arg-max, inside the timing.

    python tools/benchmark_speed.py                              # every device, 512x1024, batch 1
    python tools/benchmark_speed.py --size 128 256 --repeats 2 --model bisenetv2   # quick check
    python tools/benchmark_speed.py --protocol paper --devices cuda
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

from lib.deployment.runtimes import RUNTIMES, onnx_graph
from lib.deployment.runtimes.torch_eager import TorchRuntime
from lib.models.zoo import build_model, model_names
from tools.model_stats import model_stats

N_CLASSES = 19


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matrix product on ``device`` (best of ``repeats``)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    Linux's ``VmHWM`` counts this program's own memory only; ``ru_maxrss``, the fallback on
    other systems, also keeps the parent's resident size at the time the process was started
    (it survives ``exec``), which would charge every variant with the parent's exported graphs.
    """
    status = pathlib.Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variants(device: torch.device) -> list[tuple[str, str]]:
    """(runtime, precision) pairs worth measuring on ``device``."""
    if device.type == "cuda":
        found = [("torch", "fp32"), ("torch", "fp16")]
        return found + ([("torch", "bf16")] if torch.cuda.is_bf16_supported() else [])
    found = [("torch", "fp32")]
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        found.append(("torch", "bf16"))
    return found + [("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8"),
                    ("openvino", "int8")]


def build_runner(model_name: str, runtime: str, precision: str, device: torch.device,
                 graph: str | None):
    torch.manual_seed(0)
    model = build_model(model_name, N_CLASSES, aux_heads=False).eval()
    if runtime == "torch":
        return TorchRuntime(model, device, precision)
    return RUNTIMES[runtime](graph, device)


def measure(runner, size: tuple[int, int], out_size: tuple[int, int], batch: int,
            device: torch.device, warmup: int, repeats: int) -> dict:
    images = torch.randn(batch, 3, *size, device=device)

    @torch.inference_mode()
    def step():
        logits = runner(images)
        if logits.shape[-2:] != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.argmax(1)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mib()  # whole process
    return {"latency": statistics.median(times), "peak_mib": peak}


def prepare_graphs(model_name: str, folder: pathlib.Path, calibration_size: tuple[int, int],
                   need_int8: bool) -> dict[str, str]:
    """The model's fp32 ONNX graph and, if asked, its int8 QDQ graph, written to ``folder``."""
    torch.manual_seed(0)
    model = build_model(model_name, N_CLASSES, aux_heads=False).eval()
    graphs = {"fp32": str(onnx_graph(model, folder))}
    if need_int8:
        from lib.deployment.quantize import quantize_onnx

        rng = np.random.default_rng(0)
        batches = (rng.standard_normal((1, 3, *calibration_size), np.float32) for _ in range(4))
        graphs["int8"] = str(quantize_onnx(graphs["fp32"], folder / f"{model_name}-int8.onnx",
                                           batches))
    return graphs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=list(model_names()), choices=model_names())
    parser.add_argument("--size", nargs=2, type=int, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--protocol", choices=["full", "paper"], default="full")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, and cuda when available")
    parser.add_argument("--variants", nargs="+", default=None, metavar="RUNTIME:PRECISION",
                        help="e.g. torch:fp32 onnxruntime:int8 (default: all available)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 CPU, 20 CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 7 CPU, 100 CUDA")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--graph", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.protocol == "paper":
        size, out_size = (512, 1024), (1024, 2048)
    else:
        size = out_size = tuple(args.size)
    devices = [torch.device(d) for d in (args.devices or (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]

    if args.one:  # measure one configuration in this fresh process (clean peak memory)
        model_name, runtime, precision = args.one.split(",")
        device = devices[0]
        runner = build_runner(model_name, runtime, "fp32" if precision == "int8" else precision,
                              device, args.graph)
        print(json.dumps(measure(runner, size, out_size, args.batch, device, args.warmup,
                                 args.repeats)))
        return

    print(f"torch {torch.__version__}; protocol {args.protocol}: input "
          f"{args.batch}x3x{size[0]}x{size[1]}, labels at {out_size[0]}x{out_size[1]}; timed: "
          "forward + upsampling + argmax; not timed: decoding, resizing the input, "
          "normalisation, host-device copies")
    with tempfile.TemporaryDirectory() as scratch:
        for device in devices:
            print()
            print(benchmark_device(args, device, size, pathlib.Path(scratch)))


def benchmark_device(args, device: torch.device, size: tuple[int, int],
                     scratch: pathlib.Path) -> str:
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    repeats = args.repeats if args.repeats is not None else (100 if cuda else 7)
    chosen = variants(device)
    if args.variants:
        wanted = [tuple(v.split(":")) for v in args.variants]
        chosen = [v for v in chosen if v in wanted]
    peak = matmul_peak_gflops(device)
    name = (torch.cuda.get_device_name(device) if cuda
            else f"CPU, {torch.get_num_threads()} threads")
    rows, skipped = [], []
    for model_name in args.model:
        gflops = model_stats(model_name, N_CLASSES, size)["gflops"] * args.batch
        limit = gflops / peak
        graphs: dict[str, str] = {}
        for runtime, precision in chosen:
            reason = RUNTIMES[runtime].unavailable_reason(
                device, "fp32" if precision == "int8" else precision)
            if reason is None and runtime != "torch" and not graphs:
                graphs = prepare_graphs(model_name, scratch, size,
                                        any(p == "int8" for _, p in chosen))
            if reason is not None:
                skipped.append(f"{runtime} {precision}: {reason}")
                continue
            child = [sys.executable, __file__, "--one", f"{model_name},{runtime},{precision}",
                     "--batch", str(args.batch), "--protocol", args.protocol,
                     "--devices", str(device), "--warmup", str(warmup),
                     "--repeats", str(repeats), "--size", *map(str, args.size)]
            if runtime != "torch":
                child += ["--graph", graphs[precision]]
            out = subprocess.run(child, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"error: {model_name} {runtime} {precision} failed:\n"
                                 f"{out.stderr[-2000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            latency = result["latency"]
            rows.append([model_name, runtime, precision, f"{1000 * latency:.1f}",
                         f"{args.batch / latency:.1f}", f"{result['peak_mib']:.0f}",
                         f"{gflops:.3g}", f"{1000 * limit:.3g}", f"{latency / limit:.2f}"])
    table = tabulate(rows, tablefmt="github", headers=[
        "model", "runtime", "precision", "latency (ms)", "FPS",
        "peak memory (MiB)" + ("" if cuda else ", process RSS"), "GFLOPs",
        "FLOP-bound limit (ms)", "x limit"])
    lines = [f"## {name}: fp32 matmul peak {peak:.4g} GFLOP/s (measured); median of {repeats} "
             f"after {warmup} warm-up runs", "", table]
    lines += [f"skipped {s}" for s in dict.fromkeys(skipped)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
