"""Runtimes for a model's inference form, one module per engine over ``base.Runtime``.

    runtime = build_runtime("auto", model, device, "auto")  # or "torch", "torch-compile",
                                                            # "onnxruntime", "openvino"
    logits = runtime(images)                           # float32 [N, C, H, W], like model(images)

``auto`` measures: for each new input shape (batch and pixel count within a factor of sqrt(2))
it times every runtime that is installed and supports the device and precision, on that input,
and keeps the fastest for the rest of the process. With ``precision="auto"`` the candidates are
every (runtime, precision) pair the device runs natively (``auto_candidates``), and one is kept
only if its arg-max agrees with torch fp32's on >= 99.5% of that first input's pixels. ONNX
Runtime and OpenVINO run the model's ONNX graph, exported once per set of weights and cached on
disk (``onnx_cache_dir()``).
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
from lib.deployment.runtimes.torch_compiled import TorchCompiledRuntime
from lib.deployment.runtimes.torch_eager import TorchRuntime, cpu_has_native_bf16

__all__ = ["MIN_AGREEMENT", "RUNTIMES", "RUNTIME_NAMES", "AutoRuntime", "Runtime",
           "RuntimeUnavailable", "auto_candidates", "available_runtimes", "build_runtime",
           "int8_model_for", "onnx_graph"]

logger = logging.getLogger("bisenet")

RUNTIMES: dict[str, type[Runtime]] = {
    cls.name: cls for cls in (TorchRuntime, TorchCompiledRuntime, OnnxRuntime, OpenVinoRuntime)
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


PRECISIONS = ("fp32", "bf16", "fp16", "int8")
MIN_AGREEMENT = 0.995  # of pixels whose arg-max equals torch fp32's, for auto to keep a candidate


def auto_candidates(device: torch.device | str, precision: str = "auto",
                    int8_model: str | Path | None = None) -> tuple[list[str], list[str]]:
    """``runtime:precision`` pairs that ``auto`` measures on ``device`` (torch fp32 first), and
    why the others are left out.

    ``precision`` ``auto``: every precision the device runs natively (bf16 on CPUs with
    AVX512-BF16/AMX, fp16 and bf16 on CUDA, int8 where ``int8_model`` (an OpenVINO IR or QDQ
    ONNX graph of the same weights) is given); otherwise only that precision. ``torch-compile``
    is measured on CUDA only: compiling takes minutes on a CPU (ask for it by name there).
    """
    device = torch.device(device)
    wanted = PRECISIONS if precision == "auto" else (precision,)
    pairs, skipped = [], []
    for runtime, cls in RUNTIMES.items():
        for prec in wanted:
            if runtime == "torch-compile" and device.type != "cuda":
                continue
            if prec == "int8":
                if runtime not in ("onnxruntime", "openvino"):
                    continue
                reason = cls.unavailable_reason(device)
                if reason is None and int8_model is None:
                    reason = "no int8 model (tools/quantize.py writes one next to the checkpoint)"
                elif reason is None and runtime == "onnxruntime" \
                        and Path(int8_model).suffix != ".onnx":
                    reason = f"{Path(int8_model).name} is OpenVINO IR, not ONNX"
            else:
                reason = cls.unavailable_reason(device, prec)
            if reason is None and prec == "bf16" and device.type == "cpu" \
                    and not cpu_has_native_bf16():
                reason = "this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)"
            if reason is None:
                pairs.append(f"{runtime}:{prec}")
            elif prec in cls.precisions or prec == "int8":
                skipped.append(f"{runtime}:{prec}: {reason}")
    return pairs, skipped


def int8_model_for(checkpoint: str | Path) -> Path | None:
    """The int8 OpenVINO IR that ``tools/quantize.py`` wrote next to ``checkpoint``, if it is
    there and newer than the checkpoint (an older one belongs to other weights)."""
    checkpoint = Path(checkpoint)
    path = checkpoint.with_suffix(".int8.xml")
    if path.is_file() and checkpoint.is_file() \
            and path.stat().st_mtime >= checkpoint.stat().st_mtime:
        return path
    return None


def build_runtime(name: str, model: nn.Module, device: torch.device | str = "cpu",
                  precision: str = "fp32", cache_dir: str | Path | None = None,
                  int8_model: str | Path | None = None) -> nn.Module:
    """Runtime ``name`` (one of :data:`RUNTIME_NAMES`) for ``model`` (training or inference
    form). Raises ``RuntimeUnavailable`` naming the missing package or unsupported setting.
    ``auto`` with ``precision="auto"`` also chooses the precision (see :class:`AutoRuntime`)."""
    device = torch.device(device)
    if name == "auto":
        pairs, skipped = auto_candidates(device, precision, int8_model)
        for line in skipped:
            logger.info("runtime auto: not measuring %s", line)
        factories = {p: _factory(*p.split(":"), model, device, cache_dir, int8_model)
                     for p in pairs}
        # a precision the user chose is taken as is; one auto chooses must agree with fp32
        reference = "torch:fp32" if precision == "auto" else None
        return AutoRuntime(factories, device, reference=reference)
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIME_NAMES)}")
    RUNTIMES[name].check(device, precision)
    return _factory(name, precision, model, device, cache_dir, None)()


def _factory(name: str, precision: str, model: nn.Module, device: torch.device,
             cache_dir: str | Path | None, int8_model: str | Path | None
             ) -> Callable[[], Runtime]:
    if name in ("torch", "torch-compile"):
        return lambda: RUNTIMES[name](model, device, precision)
    if precision == "int8" and name == "openvino":
        # the float remainder (resizes, sigmoids) in bf16 where the CPU computes it natively
        rest = "bf16" if cpu_has_native_bf16() else "fp32"
        return lambda: OpenVinoRuntime(int8_model, device, rest)
    if precision == "int8":
        return lambda: RUNTIMES[name](int8_model, device)
    if name == "openvino":
        return lambda: OpenVinoRuntime(onnx_graph(model, cache_dir), device, precision)
    return lambda: RUNTIMES[name](onnx_graph(model, cache_dir), device)


def shape_class(shape: torch.Size) -> tuple[int, ...]:
    """Inputs whose runtimes rank alike: same batch and channels, pixel count within sqrt(2)."""
    batch, channels, height, width = shape
    return batch, channels, round(2 * math.log2(height * width))


class AutoRuntime(nn.Module):
    """The fastest of several runtimes (and precisions), measured on the actual input.

    On the first input of each ``shape_class`` every candidate runs once to warm up and then
    ``trials`` times, timed. With a ``reference`` (torch fp32), a candidate is kept only if its
    arg-max equals the reference's on at least ``min_agreement`` of that input's pixels; the
    fastest kept one (by its best time) serves every later input of that class. ``chosen`` maps
    shape classes to candidate names, ``agreement`` and ``timings`` to each candidate's figures.
    """

    def __init__(self, factories: dict[str, Callable[[], nn.Module]],
                 device: torch.device | str = "cpu", trials: int = 2,
                 reference: str | None = None, min_agreement: float = MIN_AGREEMENT) -> None:
        super().__init__()
        if not factories:
            raise RuntimeUnavailable("no runtime can run here")
        if reference is not None and reference not in factories:
            raise ValueError(f"reference {reference!r} is not among the candidates")
        self.factories = dict(factories)
        self.device = torch.device(device)
        self.trials = trials
        self.reference = reference
        self.min_agreement = min_agreement
        self.runtimes: dict[str, nn.Module] = {}
        self.chosen: dict[tuple[int, ...], str] = {}
        self.agreement: dict[tuple[int, ...], dict[str, float]] = {}
        self.timings: dict[tuple[int, ...], dict[str, float]] = {}
        self.eval()

    def _candidates(self) -> dict[str, nn.Module]:
        for name in list(self.factories):
            if name in self.runtimes:
                continue
            try:
                self.runtimes[name] = self.factories[name]()
            except RuntimeUnavailable as exc:  # e.g. the exporter's package is missing
                if name == self.reference:
                    raise
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
        order = sorted(runtimes, key=lambda n: n != self.reference)  # the reference first
        timings, agreement, reference_labels = {}, {}, None
        best, best_out = None, None
        for candidate in order:
            timings[candidate], out = self._timed(runtimes[candidate], images)
            labels = out.argmax(1)
            if reference_labels is None and candidate == self.reference:
                reference_labels = labels
            if reference_labels is not None:
                agreement[candidate] = (labels == reference_labels).double().mean().item()
            passes = agreement.get(candidate, 1.0) >= self.min_agreement
            if passes and (best is None or timings[candidate] < timings[best]):
                best, best_out = candidate, out
        self.chosen[key], self.timings[key], self.agreement[key] = best, timings, agreement
        shape = "x".join(map(str, images.shape))
        for candidate in order:
            kept = agreement.get(candidate, 1.0) >= self.min_agreement
            check = "" if candidate not in agreement else (
                f", arg-max agrees with {self.reference} on {100 * agreement[candidate]:.2f}% "
                f"of pixels" + ("" if kept else
                                f" < {100 * self.min_agreement:g}%: rejected"))
            logger.info("runtime auto, input %s: %s %.1f ms%s", shape, candidate,
                        1000 * timings[candidate], check)
        logger.info("runtime auto, input %s: chose %s (%.1f ms)", shape, best,
                    1000 * timings[best])
        return best_out
