import numpy as np
import pytest
import torch
from tools_loader import load_tool

from lib.deploy import to_inference_form
from lib.models import build_model

export = load_tool("export")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("bisenetv2", 5, aux_heads=True).eval()


def _reference(model, x):
    with torch.inference_mode():
        return model(x)


def _close(got, want):
    relative = np.abs(got - want).max() / np.abs(want).max()
    agree = (got.argmax(1) == want.argmax(1)).mean()
    return relative, agree


def test_onnx_dynamic_shapes_match_pytorch(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export.export(model, tmp_path / "m.onnx", "onnx", size=(64, 128))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 128), (2, 3, 75, 141)]:  # another batch, not multiples of 32
        x = torch.randn(*shape)
        got = session.run(None, {"images": x.numpy()})[0]
        want = _reference(model, x).numpy()
        assert got.shape == want.shape
        relative, agree = _close(got, want)
        assert relative < 1e-4 and agree >= 0.999


def test_onnx_with_argmax_outputs_labels(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export.export(model, tmp_path / "a.onnx", "onnx", argmax=True, size=(64, 128))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 96, 160)
    labels = session.run(None, {"images": x.numpy()})[0]
    assert labels.shape == (1, 96, 160)
    assert (labels == _reference(model, x).argmax(1).numpy()).mean() >= 0.999


def test_torchscript_matches_pytorch_at_another_size(model, tmp_path):
    path = export.export(model, tmp_path / "m.pt", "torchscript", size=(64, 128))
    loaded = torch.jit.load(str(path))
    x = torch.randn(1, 3, 80, 144)
    with torch.inference_mode():
        got = loaded(x).numpy()
    relative, agree = _close(got, _reference(model, x).numpy())
    assert relative < 1e-4 and agree >= 0.999
    assert not any(k.startswith("aux") for k in to_inference_form(model).state_dict())
