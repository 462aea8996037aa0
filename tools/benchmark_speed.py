"""Inference speed of each model under every runtime and precision available, one table per
device: latency, FPS, peak memory, and the ratio to the roofline measured here.

What is timed (stated again in the output): the network's forward pass on a normalised float
batch already on the device, plus the final bilinear upsampling of the logits and the arg-max.
Not timed: reading and decoding images, resizing the input, normalisation, copies to the device.

The roofline (``lib/deployment/roofline.py``): the script first measures, on the same device, the
matrix-product peak of every precision it runs (a large ``torch.mm``; int8 on the CPU: ONNX
Runtime's ``MatMulInteger``, on CUDA ``torch._int_mm``)
and the memory bandwidth (a large copy, bytes read + written). Each model's FLOPs
(``FlopCounterMode``: convolutions and matrix products) and bytes moved (a dispatch mode summing
every ATen operation's input, weight and output bytes; views excluded; unfused, so an upper bound)
are counted from the graph of the timed step, in that precision's element size (int8: the fp32
count / 4). ``roofline = max(FLOPs / peak, bytes / bandwidth)``; ``x roofline`` is the latency
divided by it (1.0 = as fast as the hardware allows; below 1.0 on the memory side means the runtime
fuses operations and keeps intermediates in cache).

Variants: torch fp32 (BatchNorm folded, channels-last), torch bf16 (listed where the CPU has
native bf16 (AVX512-BF16/AMX) or on CUDA), torch fp16 (CUDA), torch-compile (CUDA: Inductor with
max-autotune and CUDA graphs, each precision), onnxruntime fp32 (CPU; CUDA with onnxruntime-gpu),
openvino fp32 and bf16 (CPU), onnxruntime int8 (the QDQ graph of ``lib/deployment/quantize.py``)
and openvino
int8 (NNCF's IR; its float remainder in bf16 where the CPU has it), both calibrated here on
random images: speed does not depend on the calibration. Runtimes whose package is missing
are listed as skipped. Each variant runs in its own process, so peak memory is its own.

  --protocol full   the input is fed at --size, the labels come out at --size.
  --protocol paper  the papers' protocol: a 1024x2048 frame is fed at 512x1024 and the logits are
                    upsampled back to 1024x2048 before the arg-max, inside the timing.
  Default: both, one row each.

    python tools/benchmark_speed.py                              # every device, 512x1024, batch 1
    python tools/benchmark_speed.py --size 128 256 --repeats 2 --model bisenetv2   # quick check
    python tools/benchmark_speed.py --protocol paper --devices cuda

The last line of each table names the fastest variant per model and protocol: what
``--runtime auto`` (demo.py, evaluate.py) chooses here if, on the user's model and images, its
arg-max agrees with torch fp32's on >= 99.5% of the pixels (this benchmark's random weights say
nothing about that).
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

from lib.deployment import roofline
from lib.deployment.inference import to_inference_form
from lib.deployment.runtimes import RUNTIMES, onnx_graph
from lib.deployment.runtimes.torch_eager import cpu_has_native_bf16
from lib.models.zoo import build_model, model_names

N_CLASSES = 19


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
        return ([("torch", p) for p in precisions] + [("torch-compile", p) for p in precisions]
                + [("onnxruntime", "fp32")])
    bf16 = cpu_has_native_bf16()
    return ([("torch", "fp32")] + ([("torch", "bf16")] if bf16 else [])
            + [("onnxruntime", "fp32"), ("openvino", "fp32")]
            + ([("openvino", "bf16")] if bf16 else [])
            + [("onnxruntime", "int8"), ("openvino", "int8")])


def build_runner(model_name: str, runtime: str, precision: str, device: torch.device,
                 graph: str | None):
    torch.manual_seed(0)
    model = build_model(model_name, N_CLASSES, aux_heads=False).eval()
    if runtime in ("torch", "torch-compile"):
        return RUNTIMES[runtime](model, device, precision)
    if runtime == "openvino":
        if precision == "int8":  # the float remainder in bf16 where the CPU has it
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
        return RUNTIMES[runtime](graph, device, precision)
    return RUNTIMES[runtime](graph, device)


def step_cost(model_name: str, size: tuple[int, int], out_size: tuple[int, int], batch: int,
              precision: str) -> tuple[int, int]:
    """(FLOPs, bytes moved) of the timed step, counted on the ``meta`` device: the inference
    form in ``precision`` (int8: the fp32 bytes / 4), upsampling and arg-max."""
    torch.manual_seed(0)
    dtype = roofline.DTYPES["fp32" if precision == "int8" else precision]
    model = to_inference_form(build_model(model_name, N_CLASSES, aux_heads=False))
    model = model.to(device="meta", dtype=dtype)
    images = torch.zeros(batch, 3, *size, device="meta", dtype=dtype)

    def step():
        logits = model(images)
        if logits.shape[-2:] != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits.argmax(1)

    flops, bytes_moved = roofline.graph_cost(step)
    return flops, bytes_moved // 4 if precision == "int8" else bytes_moved


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
    """The model's fp32 ONNX graph and, if asked, its int8 forms (ONNX Runtime's QDQ graph and
    NNCF's OpenVINO IR), written to ``folder``."""
    torch.manual_seed(0)
    model = build_model(model_name, N_CLASSES, aux_heads=False).eval()
    graphs = {"fp32": str(onnx_graph(model, folder))}
    if need_int8:
        from lib.deployment.quantize import quantize_onnx, quantize_openvino

        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((1, 3, *calibration_size), np.float32) for _ in range(4)]
        graphs["onnxruntime:int8"] = str(quantize_onnx(
            graphs["fp32"], folder / f"{model_name}-int8.onnx", batches))
        if RUNTIMES["openvino"].is_installed():
            graphs["openvino:int8"] = str(quantize_openvino(
                graphs["fp32"], folder / f"{model_name}-int8.xml", batches))
    return graphs


PROTOCOLS = ("full", "paper")


def protocol_sizes(protocol: str, size: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """(input size, label size) of ``protocol``."""
    return ((512, 1024), (1024, 2048)) if protocol == "paper" else (size, size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=list(model_names()), choices=model_names())
    parser.add_argument("--size", nargs=2, type=int, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, and cuda when available")
    parser.add_argument("--variants", nargs="+", default=None, metavar="RUNTIME:PRECISION",
                        help="e.g. torch:fp32 onnxruntime:int8 (default: all available)")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 CPU, 20 CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 7 CPU, 100 CUDA")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--graph", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    devices = [torch.device(d) for d in (args.devices or (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]

    if args.one:  # measure one configuration in this fresh process (clean peak memory)
        model_name, runtime, precision = args.one.split(",")
        size, out_size = protocol_sizes(args.protocol[0], tuple(args.size))
        device = devices[0]
        runner = build_runner(model_name, runtime, "fp32" if precision == "int8" else precision,
                              device, args.graph)
        print(json.dumps(measure(runner, size, out_size, args.batch, device, args.warmup,
                                 args.repeats)))
        return

    print(f"torch {torch.__version__}; batch {args.batch}; protocols: "
          + "; ".join(f"{p}: input {i[0]}x{i[1]}, labels at {o[0]}x{o[1]}" for p in args.protocol
                      for i, o in [protocol_sizes(p, tuple(args.size))])
          + "; timed: forward + upsampling + argmax; not timed: decoding, resizing the input, "
          "normalisation, host-device copies")
    with tempfile.TemporaryDirectory() as scratch:
        for device in devices:
            print()
            print(benchmark_device(args, device, pathlib.Path(scratch)))


def device_ceilings(device: torch.device, precisions: set[str]) -> tuple[dict[str, float], float]:
    """Matrix-product peak (FLOP/s) per precision and copy bandwidth (bytes/s) of ``device``."""
    peaks = {p: roofline.matmul_peak(device, p) for p in roofline.DTYPES if p in precisions}
    return peaks, roofline.copy_bandwidth(device)


def benchmark_device(args, device: torch.device, scratch: pathlib.Path) -> str:
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    repeats = args.repeats if args.repeats is not None else (100 if cuda else 7)
    chosen = variants(device)
    if args.variants:
        wanted = [tuple(v.split(":")) for v in args.variants]
        chosen = [v for v in chosen if v in wanted]
    peaks, bandwidth = device_ceilings(device, {p for _, p in chosen})
    name = (torch.cuda.get_device_name(device) if cuda
            else f"CPU, {torch.get_num_threads()} threads")
    rows, skipped, fastest = [], [], {}
    for model_name in args.model:
        graphs: dict[str, str] = {}
        for protocol in args.protocol:
            size, out_size = protocol_sizes(protocol, tuple(args.size))
            costs = {p: step_cost(model_name, size, out_size, args.batch, p)
                     for p in {p for _, p in chosen}}
            for runtime, precision in chosen:
                reason = RUNTIMES[runtime].unavailable_reason(
                    device, "fp32" if precision == "int8" else precision)
                if reason is None and runtime not in ("torch", "torch-compile") and not graphs:
                    graphs = prepare_graphs(model_name, scratch, size,
                                            any(p == "int8" for _, p in chosen))
                if reason is not None:
                    skipped.append(f"{runtime} {precision}: {reason}")
                    continue
                child = [sys.executable, __file__, "--one", f"{model_name},{runtime},{precision}",
                         "--batch", str(args.batch), "--protocol", protocol,
                         "--devices", str(device), "--warmup", str(warmup),
                         "--repeats", str(repeats), "--size", *map(str, args.size)]
                if runtime not in ("torch", "torch-compile"):
                    child += ["--graph", graphs.get(f"{runtime}:{precision}", graphs["fp32"])]
                out = subprocess.run(child, capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"error: {model_name} {runtime} {precision} failed:\n"
                                     f"{out.stderr[-2000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                latency = result["latency"]
                flops, bytes_moved = costs[precision]
                limit = roofline.roofline_seconds(flops, bytes_moved, peaks[precision],
                                                  bandwidth)
                rows.append([model_name, protocol, runtime, precision, f"{1000 * latency:.1f}",
                             f"{args.batch / latency:.1f}", f"{result['peak_mib']:.0f}",
                             f"{flops / 1e9:.3g}", f"{bytes_moved / 1e6:.4g}",
                             f"{1000 * limit:.3g}", f"{latency / limit:.2f}"])
                key = (model_name, protocol)
                if key not in fastest or latency < fastest[key][1]:
                    fastest[key] = (f"{runtime} {precision}", latency)
    table = tabulate(rows, tablefmt="github", headers=[
        "model", "protocol", "runtime", "precision", "latency (ms)", "FPS",
        "peak memory (MiB)" + ("" if cuda else ", process RSS"), "GFLOPs", "MB moved",
        "roofline (ms)", "x roofline"])
    ceilings = ", ".join(f"{p} {v / 1e9:.4g}" for p, v in peaks.items())
    lines = [f"## {name}: matmul peak (GFLOP/s, measured) {ceilings}; copy bandwidth "
             f"{bandwidth / 1e9:.4g} GB/s (measured); median of {repeats} after {warmup} "
             "warm-up runs", "", table]
    lines += [f"fastest: {m} ({p}): {v} {1000 * t:.1f} ms" for (m, p), (v, t) in fastest.items()]
    lines += [f"skipped {s}" for s in dict.fromkeys(skipped)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
