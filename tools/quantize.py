"""Post-training static int8 quantisation of a checkpoint's inference form, with its cost.

    python tools/quantize.py --ckpt res/model_final.pth                      # the toy Cityscapes
    python tools/quantize.py --ckpt model_final_v2_city.pth --data-root data --calib-images 100

Steps: the fp32 ONNX graph is exported (``lib/deployment/export.py``); activation ranges are
calibrated on
``--calib-images`` training images (evenly spaced over the split, whole images normalised as for
evaluation). ``--format openvino`` (default): NNCF quantises the OpenVINO model (weights per
channel, FakeQuantize before every operation with an int8 kernel; resizes kept float) and writes
IR to ``--output`` (default: next to the checkpoint, ``<name>.int8.xml``, where ``--runtime auto``
of demo.py and evaluate.py finds it). ``--format onnx``: ONNX Runtime's QDQ graph
(``<name>.int8.onnx``, weights in 7 bits where this CPU has no VNNI or AMX, see
``lib/deployment/quantize.py``; evaluated under both ONNX Runtime and OpenVINO, whose int8
arithmetic differs). Then the fp32 model (PyTorch) and each int8 form are evaluated
single-scale on the validation split, and the latency of every fp32, bf16 (CPUs with native
bf16) and int8 form is measured at ``--bench-size`` (batch 1; forward + arg-max). The goal line,
judged on the fastest int8 form: at most 0.5x the best fp32 latency, faster than the best bf16,
with at most 0.5 mIoU points lost.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tabulate import tabulate

from lib.data.dataset import build_dataset, prepare_dataset
from lib.data.datasets import DATASETS
from lib.deployment.quantize import float_operations, quantize_onnx, quantize_openvino
from lib.deployment.runtimes import RUNTIMES, RuntimeUnavailable, onnx_graph
from lib.deployment.runtimes.torch_eager import (
    TorchRuntime,
    cpu_has_int8_dot_product,
    cpu_has_native_bf16,
)
from lib.evaluation.command import decide_dataset
from lib.evaluation.evaluator import EvalOptions, evaluate
from lib.evaluation.metrics import iou_from_confusion
from lib.models.checkpoint import CheckpointError, default_checkpoint, load_model
from lib.models.zoo import model_names
from tools.benchmark_speed import measure

MAX_LATENCY_RATIO = 0.5
MAX_MIOU_LOSS = 0.5  # points


def calibration_batches(dataset, count: int) -> Iterator[np.ndarray]:
    """``count`` images evenly spaced over ``dataset``, one per batch, as float32 arrays."""
    if count < 1:
        raise ValueError(f"--calib-images must be at least 1, got {count}")
    if len(dataset) == 0:
        raise ValueError("the calibration split has no images")
    for index in np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int):
        yield dataset[int(index)][0].unsqueeze(0).numpy()


def miou(runtime, dataset, n_classes: int, ignore_index: int) -> float:
    """Single-scale mIoU (%) of ``runtime`` on ``dataset``: the evaluator's ``ss`` number."""
    confusion = evaluate(runtime, dataset, n_classes, EvalOptions(modes=("ss",)), device="cpu",
                         ignore_index=ignore_index, progress=False, num_workers=0)["ss"]
    return 100 * iou_from_confusion(confusion)[1]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint (default: res/model_final.pth if it exists, else the "
                             "newest trained run's model_final.pth)")
    parser.add_argument("--model", choices=model_names(), default=None)
    parser.add_argument("--format", choices=["openvino", "onnx"], default="openvino",
                        help="openvino: NNCF, OpenVINO IR (.xml); onnx: ONNX Runtime QDQ graph")
    parser.add_argument("--output", default=None,
                        help="default: <ckpt>.int8.xml (openvino) or <ckpt>.int8.onnx")
    parser.add_argument("--dataset", default=None, choices=[*DATASETS, "list", "folders"],
                        help="default: the checkpoint's dataset")
    parser.add_argument("--data-root", default=None,
                        help="default: the checkpoint's data root, else data")
    parser.add_argument("--label-map", default=None)
    parser.add_argument("--calib-images", type=int, default=64,
                        help="training images used to calibrate activation ranges")
    parser.add_argument("--calib-method", choices=["minmax", "percentile"], default="minmax",
                        help="activation ranges of --format onnx (NNCF chooses its own)")
    parser.add_argument("--weight-bits", type=int, choices=[7, 8], default=None,
                        help="weight range of --format onnx (default: 7 on CPUs without VNNI "
                             "or AMX, whose int16 pair sums saturate with 8-bit weights; else 8)")
    parser.add_argument("--bench-size", nargs=2, type=int, default=[512, 1024],
                        metavar=("H", "W"), help="input size of the latency measurement")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-eval", dest="eval", action="store_false",
                        help="skip the mIoU comparison")
    args = parser.parse_args(argv)
    args.num_workers = 0
    if args.ckpt is None:
        args.ckpt = str(default_checkpoint("res/model_final.pth", "res"))
    try:
        model, meta = load_model(args.ckpt, "cpu", args.model)
        OnnxRuntime = RUNTIMES["onnxruntime"]
        OnnxRuntime.check(torch.device("cpu"))
    except (CheckpointError, RuntimeUnavailable) as exc:
        raise SystemExit(f"error: {exc}") from None
    data = decide_dataset(args, meta).data
    prepare_dataset(data)
    suffix = ".int8.xml" if args.format == "openvino" else ".int8.onnx"
    output = pathlib.Path(args.output or pathlib.Path(args.ckpt).with_suffix(suffix))
    cpu = torch.device("cpu")
    if args.format == "openvino" and RUNTIMES["openvino"].unavailable_reason(cpu) is not None:
        raise SystemExit(f"error: {RUNTIMES['openvino'].unavailable_reason(cpu)}")
    bf16 = cpu_has_native_bf16()

    with tempfile.TemporaryDirectory() as scratch:
        fp32_graph = onnx_graph(model, scratch)
        train = build_dataset(data, "train")
        batches = calibration_batches(train, args.calib_images)
        if args.format == "openvino":
            quantize_openvino(fp32_graph, output, batches, subset_size=args.calib_images)
        else:
            weight_bits = args.weight_bits or (8 if cpu_has_int8_dot_product() else 7)
            quantize_onnx(fp32_graph, output, batches, args.calib_method, weight_bits)
        print(f"wrote {output} (calibrated on {min(args.calib_images, len(train))} training "
              f"images" + ("" if args.format == "openvino" else
                           f", {args.calib_method}, {weight_bits}-bit weights") + ")")
        forms = {("torch", "fp32"): lambda: TorchRuntime(model)}
        if bf16:
            forms["torch", "bf16"] = lambda: TorchRuntime(model, cpu, "bf16")
        for name in ("onnxruntime", "openvino"):
            if RUNTIMES[name].unavailable_reason(cpu) is None:
                forms[name, "fp32"] = lambda n=name: RUNTIMES[n](fp32_graph)
        if bf16 and ("openvino", "fp32") in forms:
            forms["openvino", "bf16"] = lambda: RUNTIMES["openvino"](fp32_graph, cpu, "bf16")
        int8_runtimes = ["openvino"] if args.format == "openvino" else [
            n for n in ("onnxruntime", "openvino") if (n, "fp32") in forms]
        for name in int8_runtimes:
            forms[name, "int8"] = lambda n=name: RUNTIMES[n](output)
            if name == "openvino" and bf16:  # the float remainder in bf16 too
                forms[name, "int8+bf16"] = lambda: RUNTIMES["openvino"](output, cpu, "bf16")
        runtimes = {key: make() for key, make in forms.items()}
    if args.format == "openvino":
        import openvino as ov

        kept = float_operations(ov.Core().read_model(str(output)))
        print("operations left in float: " + ", ".join(f"{n} {k}" for k, n in kept.items()))
    int8_keys = [k for k in runtimes if k[1].startswith("int8")]
    int8_miou: dict[tuple[str, str], float] = {}
    if args.eval:
        # every int8 form: the same QDQ graph rounds differently under ONNX Runtime and OpenVINO
        val = build_dataset(data, "val")
        fp32_miou = miou(runtimes["torch", "fp32"], val, data.n_classes, data.ignore_index)
        for key in int8_keys:
            int8_miou[key] = miou(runtimes[key], val, data.n_classes, data.ignore_index)
            print(f"mIoU (ss, {len(val)} {data.dataset} val images): fp32 (torch) "
                  f"{fp32_miou:.2f}, int8 ({' '.join(key)}) {int8_miou[key]:.2f}, change "
                  f"{int8_miou[key] - fp32_miou:+.2f} points")

    size = tuple(args.bench_size)
    latency = {key: measure(runtime, size, size, 1, cpu, warmup=2,
                            repeats=args.repeats)["latency"] for key, runtime in runtimes.items()}
    best = {p: min((v for (_, q), v in latency.items() if q.startswith(p)), default=None)
            for p in ("fp32", "bf16", "int8")}
    rows = [[name, precision, f"{1000 * t:.1f}", f"{t / best['fp32']:.2f}"]
            for (name, precision), t in latency.items()]
    print(f"latency at 1x3x{size[0]}x{size[1]}, {torch.get_num_threads()} threads (median of "
          f"{args.repeats}):")
    print(tabulate(rows, headers=["runtime", "precision", "latency (ms)", "x best fp32"],
                   tablefmt="github"))
    fastest_int8 = min(int8_keys, key=latency.__getitem__)
    summary: dict = {"latency_ratio": best["int8"] / best["fp32"]}
    if args.eval:
        summary["miou_fp32"], summary["miou_int8"] = fp32_miou, int8_miou[fastest_int8]
    fast = summary["latency_ratio"] <= MAX_LATENCY_RATIO and (
        best["bf16"] is None or best["int8"] < best["bf16"])
    accurate = not args.eval or fp32_miou - int8_miou[fastest_int8] <= MAX_MIOU_LOSS
    print(f"goal (<= {MAX_LATENCY_RATIO}x the best fp32 latency and faster than bf16, "
          f"<= {MAX_MIOU_LOSS} mIoU points lost), judged on the fastest int8 form "
          f"({' '.join(fastest_int8)}): {'met' if fast and accurate else 'not met'} "
          f"({summary['latency_ratio']:.2f}x the best fp32"
          + ("" if best["bf16"] is None else f", {best['int8'] / best['bf16']:.2f}x bf16")
          + ("" if not args.eval else f", {int8_miou[fastest_int8] - fp32_miou:+.2f} mIoU")
          + ")")
    return summary


if __name__ == "__main__":
    main()
