"""Inference speed of each model: the plain eval-mode model and the deploy path, fp32 and reduced
precision, with parameters, GFLOPs, latency, FPS and peak memory, printed as a table.

What is timed (stated again in the output): the network's forward pass on a normalised float
batch already on the device, plus the final bilinear upsampling of the logits and the arg-max.
Not timed: reading and decoding images, resizing the input, normalisation, copies to the device.

  --protocol full   (default) the input is fed at --size, the labels come out at --size.
  --protocol paper  the papers' protocol: a 1024x2048 frame is fed at 512x1024 (the resize of the
                    input is done once, outside the timing, as the papers do) and the logits are
                    upsampled back to 1024x2048 before the arg-max, inside the timing.

    python tools/benchmark_speed.py                              # CPU or GPU, 512x1024, batch 1
    python tools/benchmark_speed.py --size 1024 2048 --device cuda
    python tools/benchmark_speed.py --protocol paper --model bisenetv2
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lib.deploy import InferenceModel, autocast_for  # noqa: E402
from lib.models import MODEL_NAMES, build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str, form: str, precision: str, size: tuple[int, int],
            out_size: tuple[int, int], batch: int, device: torch.device, warmup: int,
            repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, 19, aux_heads=False).to(device).eval()
    if form == "plain":
        def run(x):
            with autocast_for(device, precision):
                return model(x).float()
    else:
        run = InferenceModel(model, precision=precision, jit=True)
    images = torch.randn(batch, 3, *size, device=device)

    @torch.inference_mode()
    def step():
        logits = run(images)
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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process
    return {"latency": statistics.median(times), "peak_mib": peak}


def count(model_name: str, size: tuple[int, int]) -> tuple[float, float]:
    model = build_model(model_name, 19, aux_heads=False).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model.to("meta")(torch.empty(1, 3, *size))
    return params, counter.get_total_flops() / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--size", nargs=2, type=int, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--protocol", choices=["full", "paper"], default="full")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--forms", nargs="+", default=["plain", "deploy"])
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="default: fp32 and bf16 on the CPU, fp32 and fp16 on CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 CPU, 20 CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 7 CPU, 100 CUDA")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    repeats = args.repeats if args.repeats is not None else (100 if cuda else 7)
    if args.protocol == "paper":
        size, out_size = (512, 1024), (1024, 2048)
    else:
        size = out_size = tuple(args.size)

    if args.one:  # measure one configuration in this fresh process (clean peak memory)
        model_name, form, precision = args.one.split(",")
        print(json.dumps(measure(model_name, form, precision, size, out_size, args.batch, device,
                                 warmup, repeats)))
        return

    precisions = args.precisions or (["fp32", "fp16"] if cuda else ["fp32", "bf16"])
    threads = torch.get_num_threads()
    print(f"device: {torch.cuda.get_device_name(device) if cuda else f'CPU, {threads} threads'}"
          f"; torch {torch.__version__}")
    print(f"protocol {args.protocol}: input {args.batch}x3x{size[0]}x{size[1]}, labels at "
          f"{out_size[0]}x{out_size[1]}; timed: forward + upsampling + argmax (median of "
          f"{repeats} after {warmup} warm-up runs); not timed: decoding, resizing the input, "
          "normalisation, host-device copies")
    rows = []
    for model_name in args.model:
        params, gflops = count(model_name, size)
        baseline = None
        for precision in precisions:
            for form in args.forms:
                child = [sys.executable, __file__, "--one", f"{model_name},{form},{precision}",
                         "--batch", str(args.batch), "--protocol", args.protocol,
                         "--device", device.type, "--warmup", str(warmup),
                         "--repeats", str(repeats), "--size", *map(str, args.size)]
                out = subprocess.run(child, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                latency = result["latency"]
                if baseline is None:
                    baseline = latency
                rows.append([model_name, form, precision, f"{params:.2f}", f"{gflops:.1f}",
                             f"{1000 * latency:.1f}", f"{args.batch / latency:.1f}",
                             f"{latency / baseline:.2f}", f"{result['peak_mib']:.0f}"])
    print(tabulate(rows, tablefmt="github", headers=[
        "model", "form", "precision", "params (M)", "GFLOPs", "latency (ms)", "FPS",
        "vs plain fp32", "peak memory (MiB)" + ("" if cuda else ", process RSS")]))


if __name__ == "__main__":
    main()
