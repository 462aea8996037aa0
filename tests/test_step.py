"""Execution variants of the training step (channels-last, torch.compile) compute the eager
contiguous fp32 step: same losses iteration by iteration, same weights after a few SGD steps;
and a compiled run's checkpoints keep the plain state-dict keys and resume."""

import copy

import pytest
import torch

from lib.data.dataset import dataset_info
from lib.models.checkpoint import load_checkpoint, load_model
from lib.models.zoo import build_model, strip_module_prefix
from lib.training.config import TrainConfig, parse_config
from lib.training.loss import OhemCrossEntropy
from lib.training.optim import build_optimizer
from lib.training.state import RunState, make_scheduler
from lib.training.step import (
    COMPILE_MIN_ITERATIONS,
    compile_for_training,
    set_backend_defaults,
    step_losses,
    to_memory_format,
    use_channels_last,
    use_compile,
    without_cudnn_autotuning,
    without_dropout,
)

ITERATIONS = 3
LR = 1e-3
WEIGHT_ATOL = 1e-4


def _batches(n: int = ITERATIONS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        # a per-image offset: the globally pooled features (normalised by BatchNorm over the
        # 2 images) then differ between the images, as in real data, not by noise alone
        images = (torch.randn(2, 3, 64, 128, generator=generator)
                  + 2 * torch.randn(2, 3, 1, 1, generator=generator))
        labels = torch.randint(0, 19, (2, 64, 128), generator=generator)
        labels[:, :8] = 255
        batches.append((images, labels))
    return batches


def _initial_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # dropout masks depend on the memory layout and on compilation (see without_dropout)
    return without_dropout(build_model("bisenetv2", 19, aux_heads=True)).train()


def _train(model, net, optimizer, batches, channels_last: bool) -> list[float]:
    """The trainer's iteration: step_losses, zero_grad, backward, SGD step."""
    criterion = OhemCrossEntropy()
    losses = []
    for images, labels in batches:
        loss, _ = step_losses(net, criterion, to_memory_format(images, channels_last), labels,
                              aux_weight=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _constant_lr(optimizer) -> None:
    """Undo the warm-up lr that building a scheduler sets: every run here trains at LR."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]


def _eager_run(initial) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = copy.deepcopy(initial)
    losses = _train(model, model, build_optimizer(model, LR), _batches(), channels_last=False)
    return losses, model.state_dict()


def _assert_same_training(losses, weights, ref_losses, ref_weights, initial) -> None:
    """Why the tolerances hold on any x86-64 CPU: both runs are float32 on the same machine and
    differ only in summation order (memory layout, Inductor's fused kernels); AVX2 or AVX-512
    change the order, not the size of float32 rounding (~1e-7 relative per operation), and no
    float32 kernel uses AMX (PyTorch's default float32 precision is "ieee": no bf16/tf32
    down-conversion). Three steps at lr 1e-3 amplify that to ~1e-6 relative in the losses
    (tolerance 1e-4) and to a few % of the movement in the weights (tolerance 10%)."""
    # per-iteration losses within 1e-4 relative (the eager ones change by far more than that)
    for it, (got, want) in enumerate(zip(losses, ref_losses, strict=True)):
        assert got == pytest.approx(want, rel=1e-4), f"iteration {it + 1}"
    assert abs(ref_losses[-1] - ref_losses[0]) > 1e-2 * abs(ref_losses[0])
    # Each tensor within 10% of how far its eager counterpart moved (+ 1e-4): float rounding
    # flips the OHEM selection of a few pixels near the threshold, which changes the gradients
    # a little (measured: up to 2% of the movement, in the first convolution); a wrong or
    # missing gradient or BatchNorm update differs by about the whole movement.
    assert list(weights) == list(ref_weights)
    start = initial.state_dict()
    for key, value in ref_weights.items():
        if value.is_floating_point():
            moved = (value - start[key]).abs().max().item()
            differ = (weights[key] - value).abs().max().item()
            assert differ <= 0.1 * moved + WEIGHT_ATOL, f"{key}: differs by {differ:.3g}, " \
                f"moved by {moved:.3g}"
        else:
            assert torch.equal(weights[key], value), key
    # the parameters moved far beyond the tolerance: the comparison is not met trivially
    moved = max((ref_weights[k] - start[k]).abs().max().item()
                for k, _ in initial.named_parameters())
    assert moved > 100 * WEIGHT_ATOL


def test_channels_last_step_equals_contiguous_step():
    initial = _initial_model()
    ref_losses, ref_weights = _eager_run(initial)
    model = to_memory_format(copy.deepcopy(initial), channels_last=True)
    assert model.detail.S1[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    losses = _train(model, model, build_optimizer(model, LR), _batches(), channels_last=True)
    _assert_same_training(losses, model.state_dict(), ref_losses, ref_weights, initial)


def test_compiled_step_equals_eager_and_its_checkpoint_has_plain_keys_and_resumes(tmp_path):
    """torch.compile (Inductor, C++ on the CPU) of the model, trained as the trainer does it:
    RunState.net is the compiled module, RunState.model the plain one that checkpoints save."""
    initial = _initial_model()
    ref_losses, ref_weights = _eager_run(initial)

    cfg = TrainConfig(max_iter=10, warmup_iter=1, lr=LR, compile=True)
    model = copy.deepcopy(initial)
    optimizer = build_optimizer(model, LR)
    state = RunState(cfg, dataset_info(cfg.data), tmp_path, model, optimizer,
                     make_scheduler(optimizer, cfg), torch.amp.GradScaler("cpu", enabled=False),
                     compiled=compile_for_training(model))
    assert state.net is state.compiled
    _constant_lr(optimizer)
    batches = _batches(ITERATIONS + 1)
    losses = _train(model, state.net, optimizer, batches[:ITERATIONS], channels_last=False)
    _assert_same_training(losses, model.state_dict(), ref_losses, ref_weights, initial)

    # a checkpoint written by the compiled run: keys without the "_orig_mod." prefix
    assert all(k.startswith("_orig_mod.") for k in state.compiled.state_dict())
    state.iteration = ITERATIONS
    path = state.save(tmp_path / "checkpoint.pth")
    saved = load_checkpoint(path)
    assert list(saved["state_dict"]) == list(ref_weights)
    # ... which resumes into a fresh compiled run that continues as the first one does
    fresh = copy.deepcopy(initial)
    fresh_optimizer = build_optimizer(fresh, LR)
    resumed = RunState(cfg, dataset_info(cfg.data), tmp_path, fresh, fresh_optimizer,
                       make_scheduler(fresh_optimizer, cfg),
                       torch.amp.GradScaler("cpu", enabled=False),
                       compiled=compile_for_training(fresh))
    resumed.load(saved)
    assert resumed.iteration == ITERATIONS
    _constant_lr(fresh_optimizer)
    next_loss = _train(model, state.net, optimizer, batches[ITERATIONS:], channels_last=False)
    resumed_loss = _train(fresh, resumed.net, fresh_optimizer, batches[ITERATIONS:],
                          channels_last=False)
    assert resumed_loss == next_loss  # same compiled code, same state: bit-identical
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_state_dict_of_a_compiled_model_loads(tmp_path):
    """A state dict saved from a torch.compile'd model (keys "_orig_mod.*") loads as a model."""
    model = build_model("bisenetv2", 19, aux_heads=True)
    compiled = torch.compile(model)  # nothing is compiled until it is called
    path = tmp_path / "compiled_state_dict.pth"
    torch.save(compiled.state_dict(), path)
    loaded, _ = load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # compile of a DDP wrapper, or DDP of a compiled model: both prefixes go
    state = model.state_dict()
    for prefix in ("_orig_mod.module.", "module._orig_mod."):
        assert list(strip_module_prefix({prefix + k: v for k, v in state.items()})) == list(state)


def test_channels_last_and_compile_options():
    cfg = parse_config(TrainConfig(), [])
    assert cfg.channels_last is None and cfg.compile is None and cfg.compile_mode == "default"
    # not given: the device's measured default; given: as asked, on any device
    assert use_channels_last(None, torch.device("cuda")) is True
    assert use_channels_last(None, torch.device("cpu")) is False
    assert use_channels_last(True, torch.device("cpu")) is True
    assert use_channels_last(False, torch.device("cuda")) is False
    # compile: by default on CUDA for runs long enough to repay it and without SyncBN
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_compile(None, cuda, COMPILE_MIN_ITERATIONS) is True
    assert use_compile(None, cuda, COMPILE_MIN_ITERATIONS - 1) is False
    assert use_compile(None, cuda, 150_000, sync_bn=True) is False
    assert use_compile(None, cpu, 150_000) is False
    assert use_compile(True, cpu, 10, sync_bn=True) is True
    assert use_compile(False, cuda, 150_000) is False
    assert parse_config(TrainConfig(), ["--no-compile"]).compile is False
    # cuDNN autotuning is a CUDA default only: the CPU leaves the global flag alone
    before = torch.backends.cudnn.benchmark
    assert set_backend_defaults(cpu) is False and torch.backends.cudnn.benchmark == before
    # ... and evaluation (images of many sizes) runs without it, restored afterwards
    try:
        torch.backends.cudnn.benchmark = True
        with without_cudnn_autotuning():
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    cfg = parse_config(TrainConfig(), ["--channels-last", "--compile", "--compile-mode",
                                       "max-autotune-no-cudagraphs"])
    assert cfg.channels_last is True and cfg.compile is True
    assert cfg.compile_mode == "max-autotune-no-cudagraphs"
    assert parse_config(TrainConfig(), ["--no-channels-last"]).channels_last is False
    with pytest.raises(ValueError, match="--compile-mode 'fastest'"):
        parse_config(TrainConfig(), ["--compile-mode", "fastest"])
