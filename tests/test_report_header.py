"""The pytest header names the CPU and the features that change float rounding (conftest.py)."""

import subprocess
import sys

from helpers import CPU_FLAGS, cpu_description, cpu_flags


def test_cpu_description_reads_model_and_flags_of_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Example Xeon\n"
        "flags\t\t: fpu avx2 avx512f amx_tile amx_int8\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu avx512_bf16\n")
    expected = {"avx2": "yes", "avx512f": "yes", "avx512_vnni": "no", "avx512_bf16": "no",
                "amx_bf16": "no", "amx_int8": "yes", "amx_tile": "yes"}
    assert set(expected) == set(CPU_FLAGS)
    assert cpu_description(cpuinfo) == "Example Xeon; " + " ".join(
        f"{flag}={expected[flag]}" for flag in CPU_FLAGS)
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "amx_tile", "amx_int8"}
    assert cpu_description(tmp_path / "absent") == "unknown (no /proc/cpuinfo)"
    assert cpu_flags(tmp_path / "absent") == set()
    cpuinfo.write_text("processor\t: 0\n")  # e.g. some virtual machines list no model or flags
    assert cpu_description(cpuinfo).startswith("unknown model; avx2=no ")


def test_header_is_printed():
    """The hook is found by pytest (the header is printed unless -q is given)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only",
                           "tests/test_report_header.py"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"cpu: {cpu_description()}" in proc.stdout
    assert "CUDA available: " in proc.stdout
