import os
from pathlib import Path

import pytest
import torch

# The CPU features that change float rounding or select other kernels (oneDNN, OpenVINO, ONNX
# Runtime): a failure report then says which kind of machine it came from.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def _first_cpu(cpuinfo: Path) -> dict[str, str] | None:
    """The ``name: value`` fields of the first CPU in ``cpuinfo``; None if it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty when ``cpuinfo`` is absent, e.g. not on Linux)."""
    return set((_first_cpu(cpuinfo) or {}).get("flags", "").split())


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``model name; flag=yes/no ...`` of the first CPU in ``cpuinfo`` ("unknown" without it)."""
    fields = _first_cpu(cpuinfo)
    if fields is None:
        return "unknown (no /proc/cpuinfo)"
    present = cpu_flags(cpuinfo)
    flags = " ".join(f"{flag}={'yes' if flag in present else 'no'}" for flag in CPU_FLAGS)
    return f"{fields.get('model name', 'unknown model')}; {flags}"


def pytest_report_header(config) -> list[str]:
    return [f"cpu: {cpu_description()}",
            f"torch {torch.__version__} (CPU kernels: {torch.backends.cpu.get_cpu_capability()}), "
            f"CUDA available: {torch.cuda.is_available()}"]


@pytest.fixture(autouse=True, scope="session")
def _private_onnx_cache(tmp_path_factory):
    """Graphs exported by `--runtime auto` (lib/runtimes) go to a temporary folder, not to the
    user's ~/.cache; subprocesses inherit the variable."""
    previous = os.environ.get("BISENET_CACHE")
    os.environ["BISENET_CACHE"] = str(tmp_path_factory.mktemp("bisenet_cache"))
    yield
    if previous is None:
        del os.environ["BISENET_CACHE"]
    else:
        os.environ["BISENET_CACHE"] = previous
