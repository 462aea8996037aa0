"""The compiled runtime (``torch.compile``) computes what eager does, here on the CPU."""

import torch
from helpers import randomise_batchnorms

from lib.deployment.runtimes import RUNTIMES, build_runtime
from lib.deployment.runtimes.torch_compiled import TorchCompiledRuntime
from lib.models.zoo import build_model


def test_compiled_runtime_matches_the_eager_model_on_the_cpu():
    torch.manual_seed(0)
    model = build_model("bisenetv2", 19, aux_heads=False)
    randomise_batchnorms(model)
    model.eval()
    runtime = build_runtime("torch-compile", model, "cpu")
    assert isinstance(runtime, TorchCompiledRuntime) and RUNTIMES["torch-compile"] is type(runtime)
    x = torch.randn(1, 3, 40, 72, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = model(x).double()
    got = runtime(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).double().mean().item() >= 0.999
    assert torch.equal(runtime(x), got)  # the second call reuses the compiled code
