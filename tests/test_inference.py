import pytest
import torch
from helpers import randomise_batchnorms
from torch import nn

from lib.deployment.inference import fold_all_batchnorms, to_inference_form
from lib.deployment.runtimes.torch_eager import TorchRuntime
from lib.models.zoo import build_model, model_names


@pytest.mark.parametrize("name", model_names())
def test_inference_form_equals_eval_model(name):
    torch.manual_seed(0)
    model = build_model(name, 5, aux_heads=True)
    randomise_batchnorms(model)
    model.eval()
    deploy = to_inference_form(model)
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert remaining == (1 if name == "bisenetv2" else 0)  # V2's pooled-vector BN has no conv
    assert not any(k.startswith(("aux", "conv_out16", "conv_out32"))
                   for k in deploy.state_dict())
    x = torch.randn(1, 3, 67, 131)
    with torch.inference_mode():
        want = model(x)
        got = deploy(x.contiguous(memory_format=torch.channels_last))
    runtime = TorchRuntime(model)(x)
    # 1e-4 of the largest logit: folding BatchNorm into the convolutions rounds the weights
    # (w * gamma / sigma) once more and channels-last sums in another order: float32 rounding,
    # ~1e-6 relative on any x86-64 CPU (no float32 kernel uses AMX)
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-4
    assert (runtime - want).abs().max() / scale < 1e-4
    assert model.training is False and any(k.startswith(("aux", "conv_out16"))
                                           for k in model.state_dict())  # original untouched


def test_fold_counts_and_keeps_unfoldable_batchnorm():
    # V2's context embedding normalises a pooled vector with no conv before it: it stays
    model = build_model("bisenetv2", 19, aux_heads=False).eval()
    with torch.no_grad():
        folded = fold_all_batchnorms(model)
    remaining = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert folded > 40 and len(remaining) == 1


def test_reduced_precision_is_close_and_fp16_needs_cuda():
    model = build_model("bisenetv2", 4, aux_heads=False).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.inference_mode():
        want = model(x)
    got = TorchRuntime(model, precision="bf16")(x)
    assert got.dtype == torch.float32
    # 90% equal arg-max: the error is dominated by rounding inputs and weights to bf16 (8-bit
    # mantissa), the same on every CPU; AMX, AVX512_BF16 or AVX2 (converted to float32) kernels
    # all accumulate in float32, so they differ only by float32 rounding on top of that
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="fp16 inference needs CUDA"):
        TorchRuntime(model, precision="fp16")
