"""Divergence stops the run, counted without a per-iteration host-device synchronisation; the
per-process batch rule only where BatchNorm needs it. A real (CPU) GradScaler skipping steps."""

import pytest
import torch

from lib.training.divergence import (
    MAX_SKIPPED_STEPS,
    MIN_SCALE,
    count_skipped_steps,
    fp16_divergence,
)
from lib.training.setup import check_batch_split


def _skipping_scaler_run(init_scale: float, finite: list[bool]):
    """Train one parameter with a GradScaler; yields (skipped, longest run, scale) per step."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    run, longest = torch.zeros(()), torch.zeros(())
    for ok in finite:
        before_step = param.detach().clone()
        loss = (param * (1.0 if ok else float("inf"))).sum()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scale_before = scaler._scale.clone()
        scaler.step(optimizer)
        scaler.update()
        count_skipped_steps(run, longest, scale_before, scaler._scale)
        yield torch.equal(param.detach(), before_step), int(longest), scaler.get_scale()


def test_consecutive_skipped_steps_are_counted_and_stop_the_run_at_the_limit():
    finite = [True] * 5 + [False] * 3 + [True] * 2 + [False] * (MAX_SKIPPED_STEPS + 5)
    expected_run, expected_longest = 0, 0
    verdicts = []
    for ok, (skipped, longest, scale) in zip(finite, _skipping_scaler_run(2.0**120, finite),
                                             strict=True):
        assert skipped == (not ok)  # the parameter did not move exactly when the step was skipped
        expected_run = expected_run + 1 if skipped else 0
        expected_longest = max(expected_longest, expected_run)
        assert longest == expected_longest
        verdicts.append(fp16_divergence(longest, scale))
    first = next(i for i, v in enumerate(verdicts) if v)
    assert first == 10 + MAX_SKIPPED_STEPS - 1  # the 100th skipped step in a row
    assert f"{MAX_SKIPPED_STEPS} optimizer steps in a row skipped" in verdicts[first]


def test_a_collapsed_scale_stops_the_run_even_without_a_long_skip_run():
    finite = [False, True] * 40  # every other step overflows: the scale halves and never grows
    steps = list(_skipping_scaler_run(2.0**16, finite))
    assert max(longest for _, longest, _ in steps) == 1
    verdicts = [fp16_divergence(longest, scale) for _, longest, scale in steps]
    first = next(i for i, v in enumerate(verdicts) if v)
    assert steps[first][2] < MIN_SCALE <= steps[first - 1][2]
    assert "scale collapsed" in verdicts[first]
    assert fp16_divergence(0, 65536.0) is None


def test_one_image_per_process_only_with_syncbn():
    check_batch_split(16, 16, sync_bn=True)  # the paper's global batch on 16 GPUs
    check_batch_split(16, 8, sync_bn=False)
    with pytest.raises(ValueError, match="1 image per process; at least 2 are needed without "
                                         "SyncBatchNorm"):
        check_batch_split(16, 16, sync_bn=False)
    with pytest.raises(ValueError, match="at least 2"):
        check_batch_split(1, 1, sync_bn=True)  # one image in total: no batch statistics at all
    with pytest.raises(ValueError, match="not divisible"):
        check_batch_split(6, 4, sync_bn=True)
