"""Synchronised BatchNorm on the CPU: 2 gloo processes with half a batch each compute what one
``nn.BatchNorm2d`` computes on the whole batch (outputs, gradients, running statistics)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lib.training.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

WORLD = 2
MOMENTA = (0.3, None)  # exponential and cumulative running averages
DTYPES = (torch.float32, torch.float64)
# Tolerances of the 2-process result against BatchNorm2d on the whole batch (same CPU, other
# summation orders: SyncBatchNorm2d sums in float64, BatchNorm2d in its own kernel). float64:
# exact but for a few ulps on any CPU. float32: the values are O(1-10), 60 per channel and process;
# a float32 sum or product is off by < 1 ulp (6e-8 relative) per step whatever the vector width
# (AVX2, AVX-512; AMX does no float32), so outputs and gradients should differ by ~1e-6,
# 10x under the tolerance; the control below differs by > 1e-2.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
              torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


def _about(key: str):
    """assert_close message: the tensor's name, then torch's description of the mismatch."""
    return lambda message: f"{key}: {message}"


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two batches of 4 and an output weighting; the two halves of each batch have clearly
    different statistics, so per-process statistics would give different results."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(4, 3, 5, 6, generator=gen)
    first[2:] = first[2:] * 3 + 2
    second = torch.randn(4, 3, 5, 6, generator=gen) * 0.5
    second[:2] -= 1
    weighting = torch.randn(4, 3, 5, 6, generator=gen)
    return first, second, weighting


def _reference_bn(momentum: float | None) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=gen))
        bn.running_mean.copy_(torch.randn(3, generator=gen))
        bn.running_var.copy_(torch.rand(3, generator=gen) + 0.5)
    return bn


def _run(bn: nn.Module, first: torch.Tensor, second: torch.Tensor, weighting: torch.Tensor
         ) -> dict[str, torch.Tensor]:
    """Two training steps' forwards (running stats updated twice), a backward through the
    second, then an eval forward."""
    bn.train()
    out_first = bn(first)
    x = second.clone().requires_grad_(True)
    out = bn(x)
    (out * weighting).sum().backward()
    result = {"out_first": out_first.detach(), "out": out.detach(), "grad_input": x.grad,
              "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
              **{k: v.clone() for k, v in bn.state_dict().items()}}
    with torch.no_grad():
        result["eval_out"] = bn.eval()(second)
    return result


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        part = slice(rank * 2, rank * 2 + 2)  # this process's half of each batch
        results = {}
        for dtype in DTYPES:
            first, second, weighting = (t.to(dtype)[part] for t in _inputs())
            for momentum in MOMENTA:
                bn = _reference_bn(momentum).to(dtype)
                synced = convert_sync_batchnorm(nn.Sequential(bn))[0]
                results[("sync", momentum, dtype)] = _run(synced, first, second, weighting)
                # control: plain BatchNorm2d in the same processes (per-process statistics)
                results[("plain", momentum, dtype)] = _run(_reference_bn(momentum).to(dtype),
                                                           first, second, weighting)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _combine(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The 2 processes' results as one process would hold them: batch-shaped tensors
    concatenated, parameter gradients summed (what DDP's all-reduce does, before averaging)."""
    combined = {k: torch.cat([r[k] for r in ranks]) for k in
                ("out_first", "out", "grad_input", "eval_out")}
    combined.update({k: ranks[0][k] + ranks[1][k] for k in ("grad_weight", "grad_bias")})
    return combined


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", MOMENTA)
def test_two_processes_match_one_batchnorm_on_the_whole_batch(per_rank, momentum, dtype):
    """Tolerances: see TOLERANCES (float64 makes the comparison exact up to rounding)."""
    expected = _run(_reference_bn(momentum).to(dtype), *(t.to(dtype) for t in _inputs()))
    synced = [r[("sync", momentum, dtype)] for r in per_rank]
    got = _combine(synced)
    for key, value in got.items():
        assert value.dtype == dtype, key
        torch.testing.assert_close(value, expected[key], **TOLERANCES[dtype], msg=_about(key))
    for rank in synced:  # every process ends with the global running statistics
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(rank[key], expected[key], **TOLERANCES[dtype],
                                       msg=_about(key))
        assert int(rank["num_batches_tracked"]) == 2

    # The control: unsynchronised statistics are far from the whole-batch result on this data,
    # so the comparison above can fail.
    plain = _combine([r[("plain", momentum, dtype)] for r in per_rank])
    assert (plain["out"] - expected["out"]).abs().max() > 0.1
    assert (plain["grad_input"] - expected["grad_input"]).abs().max() > 0.01
    assert (per_rank[0][("plain", momentum, dtype)]["running_mean"]
            - expected["running_mean"]).abs().max() > 0.1


def test_single_process_and_eval_are_plain_batchnorm():
    first, second, weighting = _inputs()
    for momentum in MOMENTA:
        expected = _run(_reference_bn(momentum), first, second, weighting)
        got = _run(convert_sync_batchnorm(_reference_bn(momentum)), first, second, weighting)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=_about(key))


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    from lib.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model("bisenetv2", 19, aux_heads=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    reference = copy.deepcopy(model).eval()
    model = convert_sync_batchnorm(model)
    assert list(model.state_dict()) == list(before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {id(p) for p in model.parameters()} == params  # the optimizer's tensors stay valid
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SyncBatchNorm2d) for m in bns)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))
