"""Model structure, outputs and recognition.

The state-dict listings in ``tests/data`` are copies of the published checkpoints' layouts (every
key with its shape, 19 classes, auxiliary heads included); the models must match them exactly so
that the published weights load unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tools_loader import load_tool
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lib.models.layers import ConvBNReLU, resize_to
from lib.models.zoo import (
    build_model,
    infer_model_name,
    infer_n_classes,
    model_names,
    strip_module_prefix,
)

DATA = Path(__file__).resolve().parent / "data"
AUX_PREFIXES = {"bisenetv1": ("conv_out16.", "conv_out32."), "bisenetv2": ("aux",)}


def read_listing(name: str) -> dict[str, tuple[int, ...]]:
    """Parse ``<key> (d0, d1, ...)`` lines into an ordered dict of shapes."""
    shapes = {}
    for line in (DATA / f"{name}_state_dict.txt").read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split(" ", 1)
        shapes[key] = tuple(int(d) for d in re.findall(r"\d+", shape))
    return shapes


def expected_layout(name: str, n_classes: int = 19, aux_heads: bool = True):
    """The published layout, adapted: diss drops ``sp.*``; the class dimension follows
    ``n_classes``; without auxiliary heads their keys are gone."""
    source = "bisenetv1" if name == "diss" else name
    layout = read_listing(source)
    if name == "diss":
        layout = {k: v for k, v in layout.items() if not k.startswith("sp.")}
    if not aux_heads:
        layout = {k: v for k, v in layout.items() if not k.startswith(AUX_PREFIXES[source])}
    # in the listings only class layers have 19 output channels
    return {k: ((n_classes, *v[1:]) if v and v[0] == 19 else v) for k, v in layout.items()}


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["bisenetv1", "bisenetv2"])
def test_state_dict_is_exactly_the_published_layout(name):
    listing = read_listing(name)
    assert len(listing) == {"bisenetv1": 222, "bisenetv2": 383}[name]  # listing parsed fully
    model = build_model(name, 19, aux_heads=True)
    own = shapes_of(model)
    assert list(own) == list(listing)  # same names, same order
    assert own == listing  # same shapes


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("n_classes", [5, 19])
@pytest.mark.parametrize("aux_heads", [True, False])
def test_layout_follows_class_count_and_aux_heads(name, n_classes, aux_heads):
    model = build_model(name, n_classes, aux_heads=aux_heads)
    assert shapes_of(model) == expected_layout(name, n_classes, aux_heads)


def test_diss_is_bisenetv1_without_spatial_path():
    v1 = shapes_of(build_model("bisenetv1", 19))
    diss = shapes_of(build_model("diss", 19))
    assert any(k.startswith("sp.") for k in v1)
    assert diss == {k: v for k, v in v1.items() if not k.startswith("sp.")}
    assert diss["ffm.convblk.conv.weight"] == (256, 256, 1, 1)


def random_state_from_listing(layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    return state


@pytest.mark.parametrize("name", model_names())
def test_strict_load_of_listing_shaped_weights(name):
    state = random_state_from_listing(expected_layout(name))
    model = build_model(name, 19, aux_heads=True)
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # an inference-only checkpoint (no auxiliary heads) loads into a model without them
    small = build_model(name, 19, aux_heads=False)
    small.load_state_dict(
        {k: v for k, v in state.items() if k in expected_layout(name, aux_heads=False)},
        strict=True,
    )
    # and the auxiliary heads take no part in the main (eval) output
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), small.eval()(x))


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("size", [(67, 131), (100, 200)])
@pytest.mark.parametrize("n_classes", [19, 5])
def test_output_shapes_for_any_input_size(name, size, n_classes):
    torch.manual_seed(0)
    model = build_model(name, n_classes, aux_heads=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        outs = model.train()(x)  # batch of 2: batch norm on pooled 1x1 maps needs > 1 value
        assert isinstance(outs, tuple) and len(outs) == len(model.output_names)
        assert len(outs) == {"bisenetv2": 5}.get(name, 3)
        for out in outs:
            assert out.shape == (2, n_classes, *size)
            assert torch.isfinite(out).all()
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, n_classes, *size)


@pytest.mark.parametrize("name", model_names())
def test_without_aux_heads_train_mode_gives_main_output_only(name):
    model = build_model(name, 5, aux_heads=False).train()
    assert model.output_names == ("out",)
    outs = model(torch.randn(2, 3, 64, 64))
    assert isinstance(outs, tuple) and len(outs) == 1 and outs[0].shape == (2, 5, 64, 64)


@pytest.mark.parametrize("name", model_names())
def test_head_modules_are_the_output_layers(name):
    model = build_model(name, 19, aux_heads=True)
    head_params = {id(p) for m in model.head_modules() for p in m.parameters()}
    head_keys = {k for k, p in model.named_parameters() if id(p) in head_params}
    roots = {k.split(".")[0] for k in head_keys}
    expected = {"head", "aux2", "aux3", "aux4", "aux5_4"} if name == "bisenetv2" else {
        "ffm", "conv_out", "conv_out16", "conv_out32"}
    assert roots == expected
    # every parameter of those roots is covered
    assert head_keys == {k for k, _ in model.named_parameters() if k.split(".")[0] in expected}


def count_listing_parameters(layout) -> int:
    """Parameters of a listing: the product of each shape, BatchNorm buffers left out."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    total = 0
    for key, shape in layout.items():
        if not key.endswith(buffers):
            total += int(torch.Size(shape).numel())
    return total


# The figures the README states (tools/model_stats.py at 19 classes, 512x1024): parameters in
# millions (eval form; with auxiliary heads, not stated for diss) and GFLOPs of the eval form.
README_FIGURES = {"bisenetv1": (13.28, 13.43, 59.2), "bisenetv2": (3.36, 5.23, 49.2),
                  "diss": (13.18, None, 53.5)}


@pytest.fixture(scope="module")
def model_stats_tool():
    return load_tool("model_stats")


@pytest.mark.parametrize("name", model_names())
def test_parameter_counts_are_the_listings_arithmetic(name, model_stats_tool):
    eval_params = count_listing_parameters(expected_layout(name, 19, aux_heads=False))
    train_params = count_listing_parameters(expected_layout(name, 19, aux_heads=True))
    model = build_model(name, 19, aux_heads=False)
    assert sum(p.numel() for p in model.parameters()) == eval_params
    stats = model_stats_tool.model_stats(name, 19, (512, 1024))
    assert stats["params_m"] * 1e6 == pytest.approx(eval_params, abs=0.5)
    assert stats["train_params_m"] * 1e6 == pytest.approx(train_params, abs=0.5)
    readme_eval, readme_train, _ = README_FIGURES[name]
    assert round(eval_params / 1e6, 2) == readme_eval
    assert readme_train is None or round(train_params / 1e6, 2) == readme_train


def conv_flops_by_hooks(model: nn.Module, image: torch.Tensor) -> int:
    """2 FLOPs per multiply-add of every convolution, from its module's shapes (bias adds not
    counted): ``2 * output elements * in_channels / groups * kh * kw``."""
    total = 0

    def hook(module: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize("name", model_names())
def test_flops_at_512x1024_are_the_convolutions_arithmetic(name, model_stats_tool):
    # Shapes only, on the meta device. Convolutions are the only layers with multiply-adds the
    # counter counts (no Linear, no matmul): anything else would make the totals differ.
    with torch.device("meta"):
        model = build_model(name, 19, aux_heads=False).eval()
        image = torch.zeros(1, 3, 512, 1024)
    assert not any(isinstance(m, (nn.Linear, nn.Bilinear, nn.MultiheadAttention))
                   for m in model.modules())
    expected = conv_flops_by_hooks(model, image)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(image)
    # exact: the tool's counter and the per-module arithmetic count the same multiply-adds
    assert counter.get_total_flops() == expected
    # the tool reports that count (eval form, aux heads excluded) in GFLOPs ...
    stats = model_stats_tool.model_stats(name, 19, (512, 1024))
    assert stats["gflops"] * 1e9 == pytest.approx(expected, rel=1e-12)
    # ... and the README's figure is it, rounded to 0.1
    assert round(expected / 1e9, 1) == README_FIGURES[name][2]


def test_resize_matches_fixed_factor_upsampling_on_exact_multiples():
    x = torch.randn(1, 4, 3, 5)
    assert torch.equal(resize_to(x, (12, 20), "nearest"),
                       x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))
    bilinear = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
    # the same bilinear kernel given a size or a factor: interpolation weights may round
    # differently (values O(1), float32), not the CPU's vector width
    assert torch.allclose(resize_to(x, (24, 40), "bilinear"), bilinear, atol=1e-6)
    assert resize_to(x, (7, 9), "bilinear").shape == (1, 4, 7, 9)
    with pytest.raises(ValueError, match="bicubic"):
        resize_to(x, (7, 9), "bicubic")


def test_conv_bn_relu_names_and_padding():
    block = ConvBNReLU(3, 8, kernel_size=7, stride=2)
    assert set(block.state_dict()) >= {"conv.weight", "bn.weight", "bn.running_var"}
    assert block.conv.bias is None and block.conv.padding == (3, 3)
    assert block.bn.eps == 1e-5
    out = block.eval()(torch.randn(1, 3, 9, 11))
    assert out.shape == (1, 8, 5, 6) and (out >= 0).all()


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("n_classes", [7, 19])
def test_model_and_class_count_are_recognised(name, n_classes):
    state = build_model(name, n_classes, aux_heads=False).state_dict()
    assert infer_model_name(state) == name
    assert infer_n_classes(state) == n_classes
    ddp = {f"module.{k}": v for k, v in state.items()}
    assert infer_model_name(ddp) == name and infer_n_classes(ddp) == n_classes
    assert list(strip_module_prefix(ddp)) == list(state)


def test_recognition_errors_and_prefix_rules():
    with pytest.raises(ValueError, match="no known model"):
        infer_model_name({"encoder.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="classifier"):
        infer_n_classes({"cp.resnet.conv1.weight": torch.zeros(1)})
    # a prefix on only some keys is not DDP's and stays
    mixed = {"module.a": 1, "b": 2}
    assert strip_module_prefix(mixed) == mixed


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'bisenetv3'"):
        build_model("bisenetv3", 19)
    with pytest.raises(ValueError, match="n_classes"):
        build_model("bisenetv2", 0)
