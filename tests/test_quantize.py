"""int8 quantisation: the graph is really int8, runs, and predicts what the fp32 model does."""

import importlib.util

import cv2
import numpy as np
import pytest
import torch
from helpers import cpu_flags, randomise_batchnorms
from tools_loader import load_tool

from lib.data.datasets.cityscapes import MEAN, STD
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.zoo import build_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript", reason="exporting ONNX needs onnxscript")
quantize = load_tool("quantize")


def _toy_and_checkpoint(tmp_path):
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=6, n_val=2, height=64, width=128,
                                   seed=2)
    torch.manual_seed(0)
    model = build_model("bisenetv2", 19, aux_heads=False)
    randomise_batchnorms(model)
    model.eval()
    ckpt = tmp_path / "model_final.pth"
    torch.save(model.state_dict(), ckpt)
    return root, model, ckpt


def _openvino_agreement(graph_path, model, root) -> float:
    """Share of toy val pixels where OpenVINO's int8 run of ``graph_path`` (float remainder in
    fp32) predicts the fp32 model's class."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(graph_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    agree, total = 0, 0
    for x in _toy_val_images(root):
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).argmax(1).numpy()
        got = compiled({0: x})[compiled.output(0)].argmax(1)
        agree += int((got == want).sum())
        total += want.size
    return agree / total


def _toy_val_images(root):
    for image_path in sorted((root / "leftImg8bit" / "val").rglob("*.png")):
        rgb = cv2.imread(str(image_path), cv2.IMREAD_COLOR)[..., ::-1] / 255.0
        x = ((rgb - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1)[None]
        yield np.ascontiguousarray(x, np.float32)


def test_int8_graph_agrees_with_fp32_on_toy_images(tmp_path):
    root, model, ckpt = _toy_and_checkpoint(tmp_path)
    summary = quantize.main(["--ckpt", str(ckpt), "--data-root", str(root), "--calib-images",
                             "4", "--bench-size", "64", "128", "--repeats", "1",
                             "--format", "onnx"])
    path = tmp_path / "model_final.int8.onnx"
    graph = onnx.load(str(path))
    ops = [node.op_type for node in graph.graph.node]
    convs = ops.count("Conv")
    # every convolution's input and weight pass through a QuantizeLinear/DequantizeLinear pair
    assert convs > 40 and ops.count("DequantizeLinear") >= 2 * convs
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= convs
    # 7-bit weights (|w| <= 64) where the CPU has no VNNI or AMX, whose int16 sums of two
    # uint8 x int8 products saturate beyond 2 x 255 x 64; the full 8 bits elsewhere. Symmetric per
    # channel: each channel's largest weight lands on the end of the range.
    has_dot_product = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    largest = max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
                  for t in int8_weights)
    assert largest == (127 if has_dot_product else 64)
    # the aggregation layer's padded average pooling reads the float tensor, not a
    # DequantizeLinear: OpenVINO would run it on uint8 with the wrong padding value
    producer = {out: node.op_type for node in graph.graph.node for out in node.output}
    pools = [node for node in graph.graph.node if node.op_type == "AveragePool"]
    assert pools and all(producer[pool.input[0]] != "DequantizeLinear" for pool in pools)
    if importlib.util.find_spec("openvino") is not None:
        # OpenVINO runs the same QDQ graph; with the pooling on uint8 this was 69%
        assert _openvino_agreement(path, model, root) >= 0.9

    # ONNX Runtime runs these uint8 x int8 convolutions exactly (int32 sums) with VNNI or AMX;
    # without them (SSE4.1, AVX2, AVX-512 without VNNI) it sums pairs of products in int16
    # (VPMADDUBSW), which the 7-bit weights asserted above keep from saturating (oneDNN's "Nuances
    # of int8 computations"), so the agreement holds on every CPU.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agree, total = 0, 0
    for x in _toy_val_images(root):
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).argmax(1).numpy()
        got = session.run(None, {"images": x})[0].argmax(1)
        agree += int((got == want).sum())
        total += want.size
    assert agree / total >= 0.9  # random weights: small logit margins, yet few flips
    assert set(summary) == {"miou_fp32", "miou_int8", "latency_ratio"}


def test_nncf_int8_ir_is_int8_keeps_resizes_float_and_agrees_with_fp32(tmp_path, capsys):
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    root, model, ckpt = _toy_and_checkpoint(tmp_path)
    summary = quantize.main(["--ckpt", str(ckpt), "--data-root", str(root), "--calib-images",
                             "4", "--bench-size", "64", "128", "--repeats", "1"])
    path = tmp_path / "model_final.int8.xml"
    ir = ov.Core().read_model(str(path))
    ops = list(ir.get_ops())
    convs = [op for op in ops if op.get_type_name() in ("Convolution", "GroupConvolution")]

    def weights_quantised(node) -> bool:
        # int8 constants decompressed (Convert, Multiply), or float ones fake-quantised
        # (depth-wise weights), which OpenVINO turns into int8 when compiling
        while node.get_type_name() not in ("Constant", "FakeQuantize"):
            node = node.input_value(0).get_node()
        return (node.get_type_name() == "FakeQuantize"
                or node.get_output_element_type(0) == ov.Type.i8)

    assert len(convs) > 40
    assert all(weights_quantised(conv.input_value(1).get_node()) for conv in convs)
    fake_quantized = [op for op in ops if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantized) >= 40
    consumers = {target.get_node().get_type_name() for fq in fake_quantized
                 for target in fq.output(0).get_target_inputs()}
    assert "Interpolate" not in consumers  # resizes get float inputs
    assert "operations left in float: " in capsys.readouterr().out

    # the padded average pooling stays float (OpenVINO's int8 pooling pads with the bottom of an
    # asymmetric range: with it quantised this model agreed on 70% of the pixels)
    pools = [op for op in ops if op.get_type_name() == "AvgPool"]
    assert pools and "FakeQuantize" not in {
        pool.input_value(0).get_node().get_type_name() for pool in pools}
    # random weights: small logit margins, yet few flips (measured 96.6%; 69.5% with the
    # pooling quantised)
    assert _openvino_agreement(path, model, root) >= 0.9
    assert set(summary) == {"miou_fp32", "miou_int8", "latency_ratio"}
