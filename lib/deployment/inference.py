"""The inference form of a model: what demo, evaluation and exports run.

Compared with the training form in eval mode it has no auxiliary heads, every BatchNorm that
follows a convolution folded into that convolution's weights, in-place ReLUs and channels-last
weights. Its outputs equal the training form's (to float rounding). ``lib.deployment.runtimes``
runs it (PyTorch eager, ONNX Runtime, OpenVINO) and ``lib.deployment.export`` writes it as
deployable graphs.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

from lib.models.zoo import build_model, infer_n_classes


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing ``bn(conv(x))`` (eval-mode statistics)."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode).to(conv.weight.device)
    fused.weight.data = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.data = (bias - bn.running_mean) * scale + bn.bias.detach()
    return fused


def fold_all_batchnorms(module: nn.Module) -> int:
    """Fold every BatchNorm2d registered right after a Conv2d in the same parent (the models
    apply them in registration order); returns how many were folded."""
    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                parent._modules[first] = fold_batchnorm(conv, bn)
                parent._modules[second] = nn.Identity()
                folded += 1
    return folded


def to_inference_form(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Copy of ``model`` without auxiliary heads, BatchNorms folded, in eval mode."""
    model = getattr(model, "module", model)  # DDP
    name = model.model_name
    state_dict = model.state_dict()
    lean = build_model(name, infer_n_classes(state_dict), aux_heads=False)
    wanted = lean.state_dict().keys()  # once: rebuilding it per key made this take seconds
    lean.load_state_dict({k: v for k, v in state_dict.items() if k in wanted})
    lean = copy.deepcopy(lean).to(next(model.parameters()).device).eval()
    with torch.no_grad():
        fold_all_batchnorms(lean)
    for module in lean.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if channels_last:
        lean = lean.to(memory_format=torch.channels_last)
    for param in lean.parameters():
        param.requires_grad_(False)
    return lean


def autocast_for(device: torch.device, precision: str):
    """``fp32`` (no autocast), ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA)."""
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 inference needs CUDA; use bf16 on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)
