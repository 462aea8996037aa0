"""The speed table's derived columns follow from the measured ones."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_table_rows_are_consistent_with_the_measured_ceilings():
    done = subprocess.run(
        [sys.executable, "tools/benchmark_speed.py", "--model", "bisenetv2", "--size", "32",
         "64", "--warmup", "1", "--repeats", "2", "--devices", "cpu", "--protocol", "full",
         "--variants", "torch:fp32", "torch:bf16", "openvino:int8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peaks = {p: float(v) for p, v in re.findall(r"(fp32|bf16|int8) ([\d.]+)(?=[,;])",
                                                  done.stdout.split("GFLOP/s, measured)")[1]
                                                  .split("copy")[0])}
    bandwidth = float(re.search(r"copy bandwidth ([\d.]+) GB/s", done.stdout).group(1))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| bisenetv2")]
    assert rows and rows[0][:4] == ["bisenetv2", "full", "torch", "fp32"]
    for row in rows:
        precision = row[3]
        latency_ms, fps, _, gflops, mb, limit_ms, ratio = map(float, row[4:])
        # both printed to 0.1: FPS off by 0.05, latency by 0.05 ms
        assert abs(fps - 1000 / latency_ms) <= 0.05 + 1000 * 0.05 / (latency_ms - 0.05) ** 2
        want = 1000 * max(gflops / peaks[precision], mb / 1000 / bandwidth)
        assert abs(limit_ms - want) <= 0.015 * limit_ms  # 3-4 significant digits each
        assert abs(ratio - latency_ms / limit_ms) <= 0.01 + 0.02 * ratio
    assert "fastest: bisenetv2 (full):" in done.stdout


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_peak_memory_of_a_variant_is_its_own_not_its_parents():
    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc: the fallback, ru_maxrss, is all there is")
    ballast = np.ones(768 * 2**20, np.uint8)  # 768 MiB resident in this (parent) process
    parent = _resident_mib()
    done = subprocess.run(
        [sys.executable, "-c", "from tools.benchmark_speed import peak_rss_mib; "
         "import numpy as np; a = np.ones(256 * 2**20, np.uint8); print(peak_rss_mib())"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    child = float(done.stdout.split()[-1])
    assert ballast.sum() == ballast.size
    # the child's own 256 MiB are counted; the parent's 768 MiB ballast is not
    assert child >= 256
    assert child < parent - 512, (child, parent)
