"""Post-training static int8 quantisation of the ONNX graph (ONNX Runtime, QDQ format).

Weights are quantised per output channel (int8, symmetric), activations per tensor (uint8) with
ranges calibrated on real images: the graph keeps float inputs and outputs, with
QuantizeLinear/DequantizeLinear pairs around every convolution, which ONNX Runtime and OpenVINO
both run as int8 kernels.

One operation stays float in both formats: an average pooling that counts its zero padding
(PyTorch's default ``count_include_pad=True``; BiSeNetV2's aggregation layer has one). Its input
is quantised asymmetrically (a zero point, since it follows a BatchNorm and is signed), and
OpenVINO's int8 pooling pads with the quantised 0, the bottom of the range, instead of the level
that stands for 0.0, so each padded tap adds the range's lower end / the kernel's taps to a
border output. On a random-weight BiSeNetV2 that alone took the arg-max agreement with fp32
from 97% to 70% (``tests/test_quantize.py``).

Weights in 7 bits on CPUs without int8 dot products (``quantize_onnx(weight_bits=7)``, ONNX
Runtime's ``reduce_range``): there (AVX2) the kernels sum two uint8 x int8 products in int16
(``vpmaddubsw``), which saturates: 2 x 255 x 127 = 64770 > 32767, while 2 x 255 x 64 = 32640 fits.
On the quickstart BiSeNetV2 the QDQ graph lost 1.7 mIoU points under ONNX Runtime and 3.0 under
OpenVINO with 8-bit weights on an AVX2 CPU, 0.24 and 0.26 with 7-bit ones. VNNI and AMX sum in
int32, so there the weights keep 8 bits. NNCF's path handles the same problem itself (its
overflow fix halves the first layer's weight range).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path,
                  calibration: Iterable[np.ndarray], method: str = "minmax",
                  weight_bits: int = 8) -> Path:
    """Write the int8 QDQ version of ``fp32_path`` to ``int8_path``, calibrating activation
    ranges on ``calibration`` (normalised float32 [N, 3, H, W] batches, any sizes).
    ``method``: ``minmax`` or ``percentile`` (99.999th, ignores rare outliers). ``weight_bits``
    7 (ONNX Runtime's ``reduce_range``) for CPUs without VNNI or AMX (see the module's
    docstring)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits!r}")
    if method not in methods:
        raise ValueError(f"calibration method must be one of {', '.join(methods)}, "
                         f"got {method!r}")

    class Batches(CalibrationDataReader):
        def __init__(self, batches: Iterator[np.ndarray]) -> None:
            self.batches = batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch, np.float32)}

    import onnx

    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred, graph optimised
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        partial = Path(scratch) / int8_path.name
        quantize_static(str(prepared), str(partial), Batches(iter(calibration)),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=weight_bits == 7,
                        calibrate_method=methods[method])
        graph = onnx.load(str(partial))
        _padded_pools_read_float(graph.graph)
        onnx.save(graph, str(partial))
        os.replace(partial, int8_path)
    return int8_path


def _padded_pools_read_float(graph) -> None:
    """Rewire every AveragePool that counts its padding to read the float tensor before the
    QuantizeLinear/DequantizeLinear pair on its input (the pair stays for its other readers):
    OpenVINO would otherwise run that pooling on the uint8 tensor (see the module's
    docstring)."""
    producer = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type != "AveragePool" or not any(
                a.name == "count_include_pad" and a.i for a in node.attribute):
            continue
        dequantize = producer.get(node.input[0])
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            quantize = producer.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                node.input[0] = quantize.input[0]


def quantize_openvino(fp32_path: str | Path, xml_path: str | Path,
                      calibration: Iterable[np.ndarray], subset_size: int = 300) -> Path:
    """Write the int8 OpenVINO IR of the ONNX graph ``fp32_path`` to ``xml_path`` (weights in
    the ``.bin`` beside it) with NNCF's post-training quantisation, calibrated on
    ``calibration`` (normalised float32 [1, 3, H, W] arrays; at most ``subset_size`` are used).

    NNCF's ``MIXED`` preset: weights symmetric per output channel, activations asymmetric per
    tensor (they follow ReLUs and additions, one-sided), then its fast bias correction. NNCF
    places FakeQuantize only on the inputs of operations with int8 kernels (convolutions, matrix
    products, additions and pooling between quantised tensors); resizes (``Interpolate``) and
    average poolings that count their padding (see the module's docstring) are kept float on
    purpose. ``float_operations`` lists the rest of the graph, which OpenVINO runs at its
    inference precision.
    """
    import nncf
    import openvino as ov

    samples = [np.ascontiguousarray(batch, np.float32) for batch in calibration]
    if not samples:
        raise ValueError("no calibration images")
    model = ov.Core().read_model(str(fp32_path))
    # resizes stay float: int8 logits before the final upsampling round close classes together
    float_ops = nncf.IgnoredScope(types=["Interpolate"], names=padded_average_pools(model))
    quantized = nncf.quantize(model, nncf.Dataset(samples), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=min(subset_size, len(samples)), ignored_scope=float_ops)
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml_path.parent) as scratch:  # whole files or none
        partial = Path(scratch) / xml_path.name
        ov.save_model(quantized, str(partial))
        os.replace(partial.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(partial, xml_path)
    return xml_path


def padded_average_pools(model) -> list[str]:
    """Names of the OpenVINO model's average poolings that count their zero padding."""
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "AvgPool" and not op.get_attributes()["exclude-pad"]]


# nodes that move or reshape data without arithmetic: a FakeQuantize before them still feeds the
# operation after them int8 data
_DATA_MOVEMENT = {"Concat", "Reshape", "Squeeze", "Unsqueeze", "Slice", "StridedSlice",
                  "VariadicSplit", "Split", "Transpose", "Convert"}
# bookkeeping (shapes, constants) and ReLU, which OpenVINO fuses into the convolution before it
_NOT_ARITHMETIC = {"Parameter", "Result", "Constant", "FakeQuantize", "ShapeOf", "Gather",
                   "Range", "Floor", "Ceiling", "Broadcast", "Relu", *_DATA_MOVEMENT}


def _fed_by_fake_quantize(node) -> bool:
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind in _DATA_MOVEMENT:
        return all(_fed_by_fake_quantize(node.input_value(i).get_node())
                   for i in range(node.get_input_size()) if i == 0 or kind == "Concat")
    return False


def _constant(node) -> bool:
    """A constant, or computed from constants only (e.g. int8 weights decompressed)."""
    kind = node.get_type_name()
    if kind == "Constant":
        return True
    if kind in _DATA_MOVEMENT:  # a reshaped constant (its target shape may be computed)
        return _constant(node.input_value(0).get_node())
    return node.get_input_size() > 0 and all(
        _constant(node.input_value(i).get_node()) for i in range(node.get_input_size()))


def float_operations(model) -> dict[str, int]:
    """Count, per operation type, the arithmetic operations of an OpenVINO model (int8 IR)
    whose data input is not int8 (no FakeQuantize before it): those run in float. Shape
    arithmetic (integer outputs) and weight decompression (constant inputs) are left out."""
    counts: dict[str, int] = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in _NOT_ARITHMETIC or op.get_output_element_type(0).is_integral():
            continue
        data = [op.input_value(i).get_node() for i in range(min(op.get_input_size(), 2))]
        if kind in ("Add", "Multiply") and len([n for n in data if _constant(n)]) == 1 and any(
                n.get_type_name().endswith("Convolution") for n in data):
            continue  # a bias or scale after a convolution: part of that convolution's kernel
        data = [n for n in data if not _constant(n)]
        if data and not all(_fed_by_fake_quantize(n) for n in data):
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
