"""The roofline of an inference step: how fast the hardware could run it at best.

A step cannot be faster than its arithmetic at the device's matrix-product peak, nor than its
memory traffic at the device's copy bandwidth::

    roofline time = max(FLOPs / peak of that precision, bytes moved / bandwidth)

* ``matmul_peak``: FLOP/s of a large square matrix product in the given precision (fp32, bf16,
  fp16: ``torch.mm``), best of a few runs. int8 on the CPU: ONNX Runtime's ``MatMulInteger``
  (uint8 x int8 -> int32), the kernels its int8 graphs run, which use VNNI or AMX where the CPU
  has them and AVX2's multiply-add pairs otherwise (``torch._int_mm`` has no vectorised CPU
  kernel there: 1.7 GFLOP/s against 330 on an AVX2 CPU); on CUDA, or without ONNX Runtime,
  ``torch._int_mm`` (int8 x int8 -> int32).
* ``copy_bandwidth``: bytes/s of copying a large tensor (bytes read + bytes written).
* ``graph_cost``: FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix
  products, 2 per multiply-add) and bytes moved counted per ATen operation by a dispatch mode: for
  every operation that computes (views and reshapes move nothing and are skipped), the bytes of
  its tensor inputs (weights included) plus those of its outputs. That is the traffic of an
  unfused execution with no cache reuse between operations: an upper bound for eager, which fusing
  runtimes (OpenVINO, Inductor, TensorRT) beat by keeping intermediates in cache, so a ratio
  below 1.0 on the memory side is possible and means fusion.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "int8": torch.int8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    step()  # warm-up
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: torch.device | str, precision: str = "fp32", n: int | None = None,
                repeats: int = 5) -> float:
    """FLOP/s of an n x n matrix product in ``precision`` on ``device`` (best of ``repeats``)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = DTYPES[precision]
    if dtype == torch.int8 and device.type == "cpu" and _has_onnxruntime():
        seconds = _onnxruntime_int8_matmul_seconds(n, repeats)
    elif dtype == torch.int8:
        a = torch.randint(-127, 128, (n, n), dtype=dtype, device=device)
        b = torch.randint(-127, 128, (n, n), dtype=dtype, device=device)
        seconds = _best_seconds(lambda: torch._int_mm(a, b), device, repeats)
    else:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * n**3 / seconds


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _onnxruntime_int8_matmul_seconds(n: int, repeats: int) -> float:
    """Best time of an n x n uint8 x int8 -> int32 ``MatMulInteger`` in ONNX Runtime (CPU)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as the benchmark's runtimes
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    inputs = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8),
              "b": rng.integers(-127, 128, (n, n), dtype=np.int8)}
    return _best_seconds(lambda: session.run(None, inputs), torch.device("cpu"), repeats)


def copy_bandwidth(device: torch.device | str, mib: int | None = None, repeats: int = 5
                   ) -> float:
    """Bytes per second read plus written by copying a ``mib`` MiB tensor (far above the
    caches: 256 MiB on the CPU, 2 GiB on CUDA)."""
    device = torch.device(device)
    mib = mib or (2048 if device.type == "cuda" else 256)
    source = torch.ones(mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / _best_seconds(lambda: target.copy_(source), device, repeats)


class _BytesMoved(TorchDispatchMode):
    """Sums input and output tensor bytes of every ATen operation that is not a view."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None and not r.alias_info.is_write
                   for r in func._schema.returns):  # a view shares its input's memory
            tensors = [t for t in tree_leaves((args, kwargs or {}, out))
                       if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def graph_cost(step: Callable[[], object]) -> tuple[int, int]:
    """(FLOPs, bytes moved) of running ``step`` once (run it on the ``meta`` device to count
    without computing)."""
    bytes_moved = _BytesMoved()
    with torch.no_grad(), FlopCounterMode(display=False) as flops, bytes_moved:
        step()
    return flops.get_total_flops(), bytes_moved.bytes


def roofline_seconds(flops: float, bytes_moved: float, peak: float, bandwidth: float) -> float:
    """The fastest the step can run: arithmetic at ``peak`` FLOP/s or traffic at
    ``bandwidth`` bytes/s, whichever takes longer."""
    return max(flops / peak, bytes_moved / bandwidth)
