"""The training step on CUDA (tests marked ``cuda``: skipped without a GPU; tools/gpu_check.sh
runs them): synchronised BatchNorm + DDP + fp16 under torchrun, compiled or not; the compiled
step against eager in float32; channels-last + fp16 against float32.

The decoded-cache comparison (cache vs no cache on CUDA) belongs to the data pipeline's tests.

Each fp32 comparison turns TF32 off: the eager step and the references are true float32.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_step_worker import GLOBAL_BATCH, INIT_SCALE, LR, batches, initial_model
from test_step import _assert_same_training, _batches, _initial_model, _train

from lib.training.loss import OhemCrossEntropy
from lib.training.optim import build_optimizer
from lib.training.step import autocast_context, compile_for_training, step_losses, to_memory_format

WORKER = Path(__file__).resolve().parent / "ddp_step_worker.py"
# fp16 against float32: relative loss tolerance, and weights within this fraction of how far
# they moved (a GradScaler not unscaling moves them 256 times too far; per-rank instead of
# synchronised BatchNorm changes rank 0's running statistics by more, checked below).
FP16_LOSS_RTOL = 2e-2
FP16_MOVED_FRACTION = 0.25


@pytest.fixture
def fp32_cuda():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_reference(model_name: str, synchronised: bool = True
                           ) -> tuple[list[list[float]], dict[str, torch.Tensor], dict]:
    """What 2 ranks train, computed in one float32 CPU process: each half's losses, their mean
    back-propagated (DDP averages the ranks' gradients), and rank 0's final state dict.

    ``synchronised``: BatchNorm over the whole batch (synchronised BatchNorm); else each rank's
    copy of the model normalises its own half (what the ranks compute without synchronisation).
    """
    model = initial_model(model_name)
    initial = copy.deepcopy(model.state_dict())
    copies = [model] if synchronised else [model, copy.deepcopy(model)]
    optimizers = [build_optimizer(m, LR) for m in copies]
    criterion = OhemCrossEntropy()
    half = GLOBAL_BATCH // 2
    per_iteration = []
    for images, labels in batches():
        if synchronised:
            whole = model(images)
            halves = [[out[:half] for out in whole], [out[half:] for out in whole]]
        else:
            halves = [copies[rank](images[rank * half:(rank + 1) * half]) for rank in range(2)]
        rank_losses = []
        for rank, outputs in enumerate(halves):
            per_output = criterion.output_losses(outputs, labels[rank * half:(rank + 1) * half])
            rank_losses.append(per_output[0] + per_output[1:].sum())  # aux weight 1
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        ((rank_losses[0] + rank_losses[1]) / 2).backward()
        if not synchronised:  # DDP's all-reduce: every copy gets the sum of the gradients
            for params in zip(*(m.parameters() for m in copies), strict=True):
                total = sum(p.grad for p in params)
                for p in params:
                    p.grad = total.clone()
        for optimizer in optimizers:
            optimizer.step()
        per_iteration.append([loss.item() for loss in rank_losses])
    return per_iteration, model.state_dict(), initial


def _worst_weight(got: dict, want: dict, start: dict, fraction: float, atol: float
                  ) -> tuple[float, str]:
    """The largest difference of a state-dict tensor from ``want`` in units of the tolerance
    ``fraction * (how far it moved from start) + atol`` (> 1: outside), and its name."""
    assert list(got) == list(want)
    worst = (0.0, "")
    for key, value in want.items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value), key
            continue
        moved = (value - start[key]).abs().max().item()
        differ = (got[key].float() - value).abs().max().item()
        worst = max(worst, (differ / (fraction * moved + atol), key))
    return worst


@pytest.mark.parametrize(("device", "model_name", "compiled"), [
    pytest.param("cpu", "tiny", False, id="cpu-fp32-tiny"),  # the same comparison, dry run
    pytest.param("cuda", "bisenetv2", False, id="cuda-fp16-bisenetv2", marks=pytest.mark.cuda),
    pytest.param("cuda", "tiny", True, id="cuda-fp16-compiled-tiny", marks=pytest.mark.cuda),
])
def test_synchronised_batchnorm_ddp_step_under_torchrun(tmp_path, device, model_name, compiled):
    """torchrun, 2 processes (on one GPU with gloo: NCCL refuses two ranks on one device), each
    with half of the batch: synchronised BatchNorm, DDP, on CUDA fp16 autocast + GradScaler +
    channels-last; losses and weights as one float32 process computes them for the whole
    batch."""
    out = tmp_path / "rank0.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", str(WORKER), "--model", model_name,
               "--device", device, "--out", str(out)] + (["--compile"] if compiled else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    want_losses, want_weights, start = _one_process_reference(model_name)
    fp16 = device == "cuda"
    rtol, fraction, atol = (FP16_LOSS_RTOL, FP16_MOVED_FRACTION, 1e-3) if fp16 else \
        (1e-4, 0.1, 1e-5)
    assert got["sync_bn_layers"] > 0
    if fp16:
        assert got["scale"] == INIT_SCALE  # no step skipped: the runs compare step by step
    for it, want in enumerate(want_losses):
        for rank in range(2):
            assert got["losses"][rank][it] == pytest.approx(want[rank], rel=rtol), \
                f"iteration {it + 1}, rank {rank}"
    worst, key = _worst_weight(got["state_dict"], want_weights, start, fraction, atol)
    assert worst <= 1, f"{key} differs by {worst:.2f} times the tolerance"
    # the comparison tells synchronised from per-rank BatchNorm apart: rank 0's statistics
    _, split_weights, _ = _one_process_reference(model_name, synchronised=False)
    assert _worst_weight(split_weights, want_weights, start, fraction, atol)[0] > 3


@pytest.mark.cuda
def test_compiled_step_equals_eager_on_cuda(fp32_cuda):
    """torch.compile of BiSeNetV2 (channels-last, the CUDA default) trains as eager does:
    losses within 1e-4 relative, weights within a tenth of their movement (small crops:
    compilation takes most of the time)."""
    initial = _initial_model()
    device_batches = [(images.to(fp32_cuda), labels.to(fp32_cuda))
                      for images, labels in _batches()]

    def run(compiled: bool):
        model = to_memory_format(copy.deepcopy(initial).to(fp32_cuda), channels_last=True)
        net = compile_for_training(model) if compiled else model
        losses = _train(model, net, build_optimizer(model, LR), device_batches,
                        channels_last=True)
        return losses, {k: v.cpu() for k, v in model.state_dict().items()}

    ref_losses, ref_weights = run(compiled=False)
    losses, weights = run(compiled=True)
    _assert_same_training(losses, weights, ref_losses, ref_weights, initial)


@pytest.mark.cuda
def test_channels_last_fp16_step_is_close_to_fp32(fp32_cuda):
    """fp16 autocast + GradScaler + channels-last (the --fp16 step on CUDA) against the float32
    contiguous step: the same training to fp16's precision."""
    initial = _initial_model()
    device_batches = [(images.to(fp32_cuda), labels.to(fp32_cuda))
                      for images, labels in _batches()]
    ref_model = copy.deepcopy(initial).to(fp32_cuda)
    ref_losses = _train(ref_model, ref_model, build_optimizer(ref_model, LR), device_batches,
                        channels_last=False)

    model = to_memory_format(copy.deepcopy(initial).to(fp32_cuda), channels_last=True)
    optimizer = build_optimizer(model, LR)
    scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE)
    criterion = OhemCrossEntropy()
    losses = []
    for images, labels in device_batches:
        loss, per_output = step_losses(model, criterion, to_memory_format(images, True), labels,
                                       aux_weight=1.0, autocast=autocast_context(fp32_cuda, True))
        assert per_output.dtype == torch.float32
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() == INIT_SCALE  # no skipped step
    assert losses == pytest.approx(ref_losses, rel=FP16_LOSS_RTOL)
    worst, key = _worst_weight({k: v.cpu() for k, v in model.state_dict().items()},
                               {k: v.cpu() for k, v in ref_model.state_dict().items()},
                               initial.state_dict(), FP16_MOVED_FRACTION, 1e-3)
    assert worst <= 1, f"{key} differs by {worst:.2f} times the tolerance"
