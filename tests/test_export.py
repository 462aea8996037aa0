"""Each export format computes the eval-mode model's output at sizes other than the example's."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tools_loader import load_tool

from lib.models.zoo import build_model

export = load_tool("export")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("bisenetv2", 5, aux_heads=True).eval()


def _reference(model, x):
    with torch.inference_mode():
        return model(x).numpy()


def _close(got, want):
    """Largest difference relative to the largest logit, and the fraction of equal arg-max.

    The exported graphs run in float32 (ONNX Runtime, OpenVINO with the f32 hint, AOTInductor's
    C++), so they differ from eager torch by float32 rounding of other kernels: ~1e-6 relative
    on any x86-64 CPU, far under the 1e-4 the tests allow; 99.9% equal arg-max leaves room for
    the odd pixel within rounding of a tie."""
    relative = np.abs(got - want).max() / np.abs(want).max()
    agree = (got.argmax(1) == want.argmax(1)).mean()
    return relative, agree


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(1, 3, 64, 128, generator=gen), torch.randn(2, 3, 75, 141, generator=gen)]


def test_onnx_dynamic_shapes_match_pytorch_without_deprecation(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript", reason="exporting ONNX needs onnxscript")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export.export(model, tmp_path / "m.onnx", "onnx", size=(64, 128))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in _inputs():  # another batch, not multiples of 32
        got = session.run(None, {"images": x.numpy()})[0]
        want = _reference(model, x)
        assert got.shape == want.shape
        relative, agree = _close(got, want)
        assert relative < 1e-4 and agree >= 0.999
    # the tool's own check agrees, and catches a graph that is not the model's
    assert all(check.ok for check in export.verify(model, "onnx", path, argmax=False))
    other = build_model("bisenetv2", 5, aux_heads=True).eval()
    checks = export.verify(other, "onnx", path, argmax=False)
    assert not any(check.ok for check in checks)
    assert all(check.relative_diff > 1e-2 for check in checks)


def test_openvino_ir_with_argmax_outputs_labels(model, tmp_path):
    ov = pytest.importorskip("openvino")
    pytest.importorskip("onnxscript", reason="exporting needs onnxscript")
    path = export.export(model, tmp_path / "a.xml", "openvino", argmax=True, size=(64, 128))
    assert path.with_suffix(".bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.xml"]  # no leftovers
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for x in _inputs():
        labels = np.array(compiled(x.numpy())[0])
        assert labels.shape == (x.shape[0], *x.shape[2:])
        assert (labels == _reference(model, x).argmax(1)).mean() >= 0.999


def test_export_command_checks_and_reports(model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript", reason="exporting ONNX needs onnxscript")
    ckpt = tmp_path / "model_final.pth"
    torch.save(model.state_dict(), ckpt)  # a bare state dict, as published
    done = subprocess.run([sys.executable, str(export.__file__), "--ckpt", str(ckpt),
                           "--format", "onnx"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'model_final.onnx'}" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("  check ")]
    assert [line.split(":")[0] for line in lines] == ["  check 2x3x67x131", "  check 1x3x75x141"]
    for line in lines:
        diff = float(line.split("max diff ")[1].split()[0])
        agree = float(line.split("equal on ")[1].split("%")[0])
        assert diff < 1e-4 and agree >= 99.9


def test_pt2_package_runs_with_torch_alone(model, tmp_path):
    """The AOTInductor package is loaded in a fresh interpreter that cannot import this
    repository (working directory elsewhere, repository off sys.path)."""
    path = export.export(model, tmp_path / "pkg" / "m.pt2", "pt2", size=(64, 128))
    inputs = _inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('lib') is None, 'repository importable'\n"
        "package = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "inputs = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.inference_mode():\n"
        "    torch.save([package(x) for x in inputs], sys.argv[3])\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, str(path), str(tmp_path / "inputs.pt"),
         str(tmp_path / "outputs.pt")], cwd=elsewhere, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for x, got in zip(inputs, outputs, strict=True):
        relative, agree = _close(got.numpy(), _reference(model, x))
        assert relative < 1e-4 and agree >= 0.999
