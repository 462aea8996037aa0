"""What several test modules need: free ports, models with non-trivial BatchNorm statistics, toy
datasets, and the short training command they run."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def free_port(low: int = 1024, high: int = 65536) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, within [low, high)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if low <= port < high:
            return port


def randomise_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm statistics and affine weights far from the identity, so that a
    mistake in folding or normalising shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


def train_command(toy_root: Path, out: Path, *extra: str, script: str = "bisenetv2/train.py",
                  python: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """A short CPU training run of ``script`` on the toy data into ``out``; ``extra`` options
    come last, so they override these."""
    return [*python, script, "--data-root", str(toy_root), "--device", "cpu",
            "--output-dir", str(out), "--crop-size", "64", "128", "--warmup-iter", "1",
            "--batch-size", "2", "--num-workers", "0", *extra]


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
