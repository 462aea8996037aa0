"""tools/benchmark_train.py --profile: torch.profiler's table of a step, with its parts (forward,
loss, backward, optimizer)."""

import re

from tools_loader import load_tool


def test_step_profiled(capsys):
    bench = load_tool("benchmark_train")
    rows = bench.main(["--models", "bisenetv2", "--variants", "eager", "--size", "64", "128",
                       "--batch", "2", "--iters", "1", "--rounds", "1", "--compare-iters", "1",
                       "--profile", "40", "--device", "cpu"])
    out = capsys.readouterr().out
    assert [row[1] for row in rows] == ["eager"]
    # the four parts of the step timed
    parts = re.findall(r"CPU time per part of the step: forward ([\d.]+) ms, loss ([\d.]+) ms, "
                       r"backward ([\d.]+) ms, optimizer ([\d.]+) ms", out)
    assert len(parts) == 1
    for forward, loss, backward, optimizer in (map(float, p) for p in parts):
        assert min(forward, loss, backward, optimizer) > 0
        assert backward > loss  # the backward of the whole network, the loss's forward only
    # the OHEM loss's operators are in the table (log-softmax of the five outputs)
    assert re.search(r"aten::_log_softmax\s", out)
