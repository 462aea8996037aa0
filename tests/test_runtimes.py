"""Every runtime computes the eval-mode model's logits, and `auto` picks by measuring."""

import time
import warnings

import pytest
import torch
from helpers import randomise_batchnorms

from lib.data.config import DataConfig
from lib.data.dataset import build_dataset
from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.deployment.runtimes import (
    RUNTIMES,
    AutoRuntime,
    RuntimeUnavailable,
    build_runtime,
    onnx_graph,
    shape_class,
)
from lib.deployment.runtimes.torch_eager import TorchRuntime, cpu_has_native_bf16
from lib.evaluation.evaluator import EvalOptions, evaluate
from lib.models.zoo import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model("bisenetv2", 19, aux_heads=True)
    randomise_batchnorms(model)
    return model.eval()


@pytest.fixture(scope="module")
def graph(model, tmp_path_factory):
    """The ONNX graph, exported once for the module; the export raises no deprecation warning
    (the TorchScript-based exporter does)."""
    pytest.importorskip("onnxscript", reason="exporting ONNX needs onnxscript")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = onnx_graph(model, tmp_path_factory.mktemp("cache"))
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]
    assert not deprecations, [str(w.message) for w in deprecations]
    return path


def _runtime(name, model, graph):
    cls = RUNTIMES[name]
    if not cls.is_installed():
        pytest.skip(f"{cls.package} is not installed")
    return TorchRuntime(model) if name == "torch" else cls(graph)


# torch-compile compiles once per size (minutes on a CPU): tests/test_torch_compile.py
@pytest.mark.parametrize("name", [n for n in RUNTIMES if n != "torch-compile"])
def test_runtime_matches_eval_model_at_odd_sizes(name, model, graph):
    """Tolerance 1e-4 of the largest logit and 99.9% equal arg-max: every runtime computes in
    float32 (OpenVINO with INFERENCE_PRECISION_HINT f32, else it would pick bf16 on AVX512_BF16
    or AMX CPUs; ONNX Runtime's MLAS uses no AMX for float32), so they differ from torch by
    float32 rounding of other kernels, ~1e-6 relative on any x86-64 CPU."""
    runtime = _runtime(name, model, graph)
    for shape in [(2, 3, 67, 131), (1, 3, 45, 203)]:  # dynamic batch and sizes, not /32
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            want = model(x)
        got = runtime(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
        assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.999


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_evaluation_through_runtime_gives_torch_confusion_matrix(name, model, graph, tmp_path):
    """Exact confusion matrices: on these 2 images the smallest top-2 gap of torch's summed
    scores is 5e-5 relative (measured on an AVX-512 CPU, every mode), 50x the float32 rounding
    (~1e-6) by which the runtimes differ from torch on any CPU, so no arg-max flips."""
    # whole images at two scales and flipped, plus crops: inputs of many sizes
    root = generate_toy_cityscapes(tmp_path / "toy", n_train=0, n_val=2, height=70, width=150,
                                   seed=5)
    dataset = build_dataset(DataConfig(data_root=str(root)), "val")
    options = EvalOptions(modes=("ss", "ssc", "msf"), scales=(0.75, 1.25), crop_size=(48, 64),
                          crop_batch=2)
    run = dict(device="cpu", progress=False, num_workers=0)
    want = evaluate(model, dataset, 19, options, **run)  # the training form, eval mode
    got = evaluate(_runtime(name, model, graph), dataset, 19, options, **run)
    for mode in options.modes:
        assert torch.equal(got[mode], want[mode]), mode
        assert int(want[mode].sum()) > 0


class _Delayed(TorchRuntime):
    """The torch runtime made slower by a fixed sleep: a runtime whose speed we know."""

    def __init__(self, model, delay):
        super().__init__(model)
        self.delay = delay
        self.calls = 0

    def _run(self, images):
        self.calls += 1
        time.sleep(self.delay)
        return super()._run(images)


@pytest.mark.parametrize("slow", ["first", "second"])
def test_auto_keeps_the_runtime_measured_fastest_per_shape(model, slow, one_thread):
    delays = {"first": 0.0, "second": 0.0, slow: 1.5}  # far above the run's own time
    auto = AutoRuntime({n: (lambda d=d: _Delayed(model, d)) for n, d in delays.items()},
                       trials=1)
    x = torch.randn(1, 3, 40, 72)
    with torch.inference_mode():
        want = model(x)
    # the torch runtime's inference form (folded BatchNorm): float32 rounding, as in test_inference
    assert torch.allclose(auto(x), want, rtol=0, atol=1e-4 * want.abs().max().item())
    fast = "second" if slow == "first" else "first"
    assert auto.chosen == {shape_class(x.shape): fast}
    assert {n: r.calls for n, r in auto.runtimes.items()} == {"first": 2, "second": 2}
    auto(torch.randn(1, 3, 41, 70))  # same pixel count within sqrt(2): no new trial
    assert auto.runtimes[fast].calls == 3 and auto.runtimes[slow].calls == 2
    auto(torch.randn(1, 3, 80, 144))  # 4x the pixels: measured again
    assert auto.runtimes[slow].calls == 4 and len(auto.chosen) == 2


def test_unavailable_runtimes_say_why(model):
    with pytest.raises(RuntimeUnavailable, match="runs fp32, not bf16"):
        build_runtime("onnxruntime", model, "cpu", precision="bf16")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        build_runtime("tensorrt", model, "cpu")
    if cpu_has_native_bf16():  # only torch and OpenVINO run bf16, and only where it is native
        auto = build_runtime("auto", model, "cpu", precision="bf16")
        assert set(auto.factories) <= {"torch:bf16", "openvino:bf16"}
        assert "torch:bf16" in auto.factories and auto.reference is None
    else:
        with pytest.raises(RuntimeUnavailable, match="no runtime can run here"):
            build_runtime("auto", model, "cpu", precision="bf16")
