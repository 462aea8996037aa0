"""Post-training static int8 quantisation of the ONNX graph (ONNX Runtime, QDQ format).

Weights are quantised per output channel (int8, symmetric), activations per tensor (uint8) with
ranges calibrated on real images: the graph keeps float inputs and outputs, with
QuantizeLinear/DequantizeLinear pairs around every convolution, which ONNX Runtime and OpenVINO
both run as int8 kernels.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path,
                  calibration: Iterable[np.ndarray], method: str = "minmax") -> Path:
    """Write the int8 QDQ version of ``fp32_path`` to ``int8_path``, calibrating activation
    ranges on ``calibration`` (normalised float32 [N, 3, H, W] batches, any sizes).
    ``method``: ``minmax`` or ``percentile`` (99.999th, ignores rare outliers)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"calibration method must be one of {', '.join(methods)}, "
                         f"got {method!r}")

    class Batches(CalibrationDataReader):
        def __init__(self, batches: Iterator[np.ndarray]) -> None:
            self.batches = batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch, np.float32)}

    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred, graph optimised
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        partial = Path(scratch) / int8_path.name
        quantize_static(str(prepared), str(partial), Batches(iter(calibration)),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=methods[method])
        os.replace(partial, int8_path)
    return int8_path
