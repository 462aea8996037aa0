import os
from pathlib import Path

import pytest
import torch

# The CPU features that change float rounding or select other kernels (oneDNN, OpenVINO, ONNX
# Runtime): a failure report then says which kind of machine it came from.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``model name; flags: ...`` of the first CPU listed in ``cpuinfo`` ("unknown" without it)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    present = set(fields.get("flags", "").split())
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
