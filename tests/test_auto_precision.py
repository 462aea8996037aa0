"""``auto`` chooses runtime and precision by measurement, keeping only candidates whose arg-max
agrees with torch fp32 on >= 99.5% of the pixels."""

import logging

import pytest
import torch
from helpers import randomise_batchnorms
from test_runtimes import _Delayed, model  # noqa: F401 (fixtures)

from lib.deployment.runtimes import MIN_AGREEMENT, AutoRuntime, auto_candidates, shape_class
from lib.deployment.runtimes.torch_eager import cpu_has_native_bf16
from lib.models.zoo import build_model


@pytest.fixture(scope="module")
def other_model():
    """Same architecture, other weights: a real runtime whose predictions differ."""
    torch.manual_seed(1)
    other = build_model("bisenetv2", 19, aux_heads=True)
    randomise_batchnorms(other, seed=1)
    return other.eval()


def test_disagreeing_candidate_is_rejected_and_the_fastest_agreeing_one_wins(
        model, other_model, one_thread, caplog):  # noqa: F811
    factories = {
        "torch:fp32": lambda: _Delayed(model, 1.0),       # the reference, slowest
        "wrong:fp32": lambda: _Delayed(other_model, 0.0),  # fastest, but other predictions
        "agreeing:fp32": lambda: _Delayed(model, 0.4),     # fastest of those that agree
    }
    auto = AutoRuntime(factories, trials=1, reference="torch:fp32")
    x = torch.randn(1, 3, 40, 72, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="bisenet"):
        got = auto(x)
    with torch.inference_mode():
        want = model(x).argmax(1).numpy()
        wrong = other_model(x).argmax(1).numpy()
    key = shape_class(x.shape)
    disagreement = float((wrong == want).mean())  # numpy, float64: computed apart from auto's
    assert disagreement < MIN_AGREEMENT
    assert auto.agreement[key]["wrong:fp32"] == pytest.approx(disagreement, abs=1e-12)
    assert auto.agreement[key]["agreeing:fp32"] == 1.0
    assert auto.timings[key]["wrong:fp32"] < auto.timings[key]["agreeing:fp32"]
    assert auto.chosen == {key: "agreeing:fp32"}
    assert (got.argmax(1).numpy() == want).all()
    log = caplog.text
    assert "wrong:fp32" in log and "rejected" in log and "chose agreeing:fp32" in log


def test_candidates_follow_the_device_and_the_int8_model():
    pairs, skipped = auto_candidates("cpu", "auto")
    assert pairs[0] == "torch:fp32"
    assert not any(p.startswith("torch-compile") or p.endswith(":fp16") for p in pairs)
    assert ("torch:bf16" in pairs) == cpu_has_native_bf16()
    if not cpu_has_native_bf16():
        assert any("no native bf16" in s for s in skipped)
    assert not any(p.endswith(":int8") for p in pairs)
    assert any(s.startswith("openvino:int8") and "no int8 model" in s for s in skipped)
    pairs, skipped = auto_candidates("cpu", "auto", int8_model="model.int8.xml")
    if "openvino:fp32" in pairs:
        assert "openvino:int8" in pairs
    assert "onnxruntime:int8" not in pairs  # OpenVINO IR: ONNX Runtime cannot read it
    # a precision asked for is the only one measured
    pairs, _ = auto_candidates("cpu", "fp32")
    assert pairs and all(p.endswith(":fp32") for p in pairs)
