"""The speed table's derived columns follow from the measured ones."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_table_rows_are_consistent_with_the_measured_peak():
    done = subprocess.run(
        [sys.executable, "tools/benchmark_speed.py", "--model", "bisenetv2", "--size", "32",
         "64", "--warmup", "1", "--repeats", "2", "--devices", "cpu", "--variants",
         "torch:fp32", "torch:bf16", "openvino:int8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peak = float(re.search(r"fp32 matmul peak ([\d.]+) GFLOP/s", done.stdout).group(1))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| bisenetv2")]
    assert rows and rows[0][:3] == ["bisenetv2", "torch", "fp32"]
    for row in rows:
        latency_ms, fps, _, gflops, limit_ms, ratio = map(float, row[3:])
        # both printed to 0.1: FPS off by 0.05, latency by 0.05 ms
        assert abs(fps - 1000 / latency_ms) <= 0.05 + 1000 * 0.05 / (latency_ms - 0.05) ** 2
        assert abs(limit_ms - 1000 * gflops / peak) <= 0.015 * limit_ms  # 3 significant digits each
        assert abs(ratio - latency_ms / limit_ms) <= 0.01 + 0.02 * ratio
