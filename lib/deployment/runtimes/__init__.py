"""Runtimes for a model's inference form, one module per engine over ``base.Runtime``.

    runtime = build_runtime("auto", model, device)     # or "torch", "onnxruntime", "openvino"
    logits = runtime(images)                           # float32 [N, C, H, W], like model(images)

``auto`` measures: for each new input shape (batch and pixel count within a factor of sqrt(2))
it times every runtime that is installed and supports the device and precision, on that input,
and keeps the fastest for the rest of the process. ONNX Runtime and OpenVINO run the model's
ONNX graph, exported once per set of weights and cached on disk (``onnx_cache_dir()``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lib.deployment.export import export_onnx
from lib.deployment.runtimes.base import Runtime, RuntimeUnavailable
from lib.deployment.runtimes.onnx_runtime import OnnxRuntime
from lib.deployment.runtimes.openvino_runtime import OpenVinoRuntime
from lib.deployment.runtimes.torch_eager import TorchRuntime

__all__ = ["RUNTIMES", "RUNTIME_NAMES", "AutoRuntime", "Runtime", "RuntimeUnavailable",
           "available_runtimes", "build_runtime", "onnx_graph"]

logger = logging.getLogger("bisenet")

RUNTIMES: dict[str, type[Runtime]] = {
    cls.name: cls for cls in (TorchRuntime, OnnxRuntime, OpenVinoRuntime)
}
RUNTIME_NAMES: tuple[str, ...] = ("auto", *RUNTIMES)


def available_runtimes(device: torch.device | str, precision: str = "fp32") -> list[str]:
    """Names of the runtimes that can run here: installed, supporting device and precision."""
    device = torch.device(device)
    return [name for name, cls in RUNTIMES.items()
            if cls.unavailable_reason(device, precision) is None]


def onnx_cache_dir() -> Path:
    """``$BISENET_CACHE`` or ``~/.cache/bisenet``, subfolder ``onnx``."""
    root = os.environ.get("BISENET_CACHE") or Path.home() / ".cache" / "bisenet"
    return Path(root) / "onnx"


def _weights_digest(model: nn.Module) -> str:
    model = getattr(model, "module", model)
    digest = hashlib.sha256(f"{model.model_name} torch {torch.__version__}".encode())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def onnx_graph(model: nn.Module, cache_dir: str | Path | None = None) -> Path:
    """The model's ONNX graph (logits, dynamic sizes), exported once per set of weights."""
    if importlib.util.find_spec("onnxscript") is None:
        raise RuntimeUnavailable("exporting the ONNX graph needs the 'onnxscript' package "
                                 "(pip install onnxscript)")
    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    path = folder / f"{getattr(model, 'module', model).model_name}-{_weights_digest(model)}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # atomic: a whole file or none
        partial = export_onnx(model, Path(scratch) / path.name)
        os.replace(partial, path)
    logger.info("exported the ONNX graph in %.1f s: %s", time.perf_counter() - started, path)
    return path


def build_runtime(name: str, model: nn.Module, device: torch.device | str = "cpu",
                  precision: str = "fp32", cache_dir: str | Path | None = None) -> nn.Module:
    """Runtime ``name`` (one of :data:`RUNTIME_NAMES`) for ``model`` (training or inference
    form). Raises ``RuntimeUnavailable`` naming the missing package or unsupported setting."""
    device = torch.device(device)
    if name == "auto":
        names = available_runtimes(device, precision)
        factories = {n: _factory(n, model, device, precision, cache_dir) for n in names}
        return AutoRuntime(factories, device)
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_NAMES)}")
    RUNTIMES[name].check(device, precision)
    return _factory(name, model, device, precision, cache_dir)()


def _factory(name: str, model: nn.Module, device: torch.device, precision: str,
             cache_dir: str | Path | None) -> Callable[[], Runtime]:
    if name == "torch":
        return lambda: TorchRuntime(model, device, precision)
    return lambda: RUNTIMES[name](onnx_graph(model, cache_dir), device)


def shape_class(shape: torch.Size) -> tuple[int, ...]:
    """Inputs whose runtimes rank alike: same batch and channels, pixel count within sqrt(2)."""
    batch, channels, height, width = shape
    return batch, channels, round(2 * math.log2(height * width))


class AutoRuntime(nn.Module):
    """The fastest of several runtimes, measured on the actual input.

    On the first input of each ``shape_class`` every candidate runs once to warm up and then
    ``trials`` times, timed; the fastest (by its best time) serves every later input of that
    class. ``chosen`` maps shape classes to runtime names.
    """

    def __init__(self, factories: dict[str, Callable[[], nn.Module]],
                 device: torch.device | str = "cpu", trials: int = 2) -> None:
        super().__init__()
        if not factories:
            raise RuntimeUnavailable("no runtime can run here")
        self.factories = dict(factories)
        self.device = torch.device(device)
        self.trials = trials
        self.runtimes: dict[str, nn.Module] = {}
        self.chosen: dict[tuple[int, ...], str] = {}
        self.eval()

    def _candidates(self) -> dict[str, nn.Module]:
        for name in list(self.factories):
            if name in self.runtimes:
                continue
            try:
                self.runtimes[name] = self.factories[name]()
            except RuntimeUnavailable as exc:  # e.g. the exporter's package is missing
                logger.warning("runtime auto: skipping %s: %s", name, exc)
            del self.factories[name]
        if not self.runtimes:
            raise RuntimeUnavailable("runtime auto: no runtime could be built")
        return self.runtimes

    def _timed(self, runtime: nn.Module, images: torch.Tensor) -> tuple[float, torch.Tensor]:
        out = runtime(images)  # warm-up: first-shape work (allocation, kernel selection)
        best = math.inf
        for _ in range(self.trials):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            out = runtime(images)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        return best, out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        key = shape_class(images.shape)
        name = self.chosen.get(key)
        if name is not None:
            return self.runtimes[name](images)
        runtimes = self._candidates()
        if len(runtimes) == 1:
            name = next(iter(runtimes))
            self.chosen[key] = name
            return runtimes[name](images)
        timings, outputs = {}, {}
        for candidate, runtime in runtimes.items():
            timings[candidate], outputs[candidate] = self._timed(runtime, images)
        name = min(timings, key=timings.get)
        self.chosen[key] = name
        logger.info("runtime auto, input %s: %s (%s)", "x".join(map(str, images.shape)), name,
                    ", ".join(f"{n} {1000 * t:.1f} ms" for n, t in timings.items()))
        return outputs[name]
