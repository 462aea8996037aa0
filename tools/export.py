"""Export a checkpoint's inference form (BatchNorm folded, no auxiliary heads) for deployment,
then check the written file against the eager model.

    python tools/export.py --ckpt res/model_final.pth --format onnx --output res/model.onnx
    python tools/export.py --ckpt ... --format onnx --argmax        # the graph outputs labels
    python tools/export.py --ckpt ... --format openvino             # res/model_final.xml + .bin
    python tools/export.py --ckpt ... --format pt2                  # AOTInductor package

Input: ``images`` float32 [N, 3, H, W], normalised with the checkpoint's mean/std (Cityscapes:
RGB / 255, mean (0.3257, 0.3690, 0.3223), std (0.2112, 0.2148, 0.2115)). Output: ``logits``
[N, C, H, W], or with --argmax ``labels`` int64 [N, H, W]. Batch, height and width are dynamic
in every format (any size, not only multiples of 32).

After writing, the file is loaded by its runtime (ONNX Runtime, OpenVINO, or
``torch._inductor.aoti_load_package``) and run at two odd sizes against the eager model; the
largest difference relative to the logits' range and the arg-max agreement are printed, and the
export fails (exit 1) beyond 1e-4 or below 99.9%. A .pt2 package is compiled code for this
machine's CPU (or GPU with --device cuda) and is loaded with torch alone:

    import torch
    model = torch._inductor.aoti_load_package("model_final.pt2")
    logits = model(images)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
from collections.abc import Sequence

from torch import nn

from lib.deployment.export import EXPORTERS, FORMATS, SUFFIXES
from lib.deployment.runtimes import RuntimeUnavailable
from lib.deployment.verify import MAX_RELATIVE_DIFF, MIN_AGREEMENT, verify
from lib.models.checkpoint import CheckpointError, default_checkpoint, load_model
from lib.models.published import NAMES_HELP, published_entry
from lib.models.zoo import model_names


def export(model: nn.Module, path: pathlib.Path, fmt: str, argmax: bool = False,
           size: Sequence[int] = (64, 128), device: str = "cpu") -> pathlib.Path:
    """Write ``model`` (training or inference form) to ``path`` in ``fmt`` (one of FORMATS);
    ``device`` matters for pt2 only (the others are portable graphs)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "pt2" and device != "cpu":
        raise ValueError(f"--device {device} applies to --format pt2 only")
    extra = {"device": device} if fmt == "pt2" else {}
    return EXPORTERS[fmt](model, path, argmax=argmax, size=tuple(size), **extra)


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None,
                        help=f"checkpoint, {NAMES_HELP} (default: res/model_final.pth if it "
                             "exists, else the newest trained run's model_final.pth)")
    parser.add_argument("--model", choices=model_names(), default=None)
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", default=None,
                        help="default: next to the checkpoint (res/<name> for published weights)")
    parser.add_argument("--argmax", action="store_true", help="output labels instead of logits")
    parser.add_argument("--size", nargs=2, type=int, default=[64, 128], metavar=("H", "W"),
                        help="example input size for tracing (sizes stay dynamic)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="pt2 only: compile the package for this device")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running the written file against the eager model")
    args = parser.parse_args(argv)
    if args.ckpt is None:
        args.ckpt = str(default_checkpoint("res/model_final.pth", "res"))
    try:
        model, _ = load_model(args.ckpt, "cpu", args.model)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    # next to the checkpoint; published weights by name go to res/<name>, not into the hub cache
    source = pathlib.Path("res" if published_entry(args.ckpt) else "", args.ckpt)
    output = pathlib.Path(args.output or source.with_suffix(SUFFIXES[args.format]))
    try:
        export(model, output, args.format, args.argmax, args.size, args.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    except ImportError as exc:
        raise SystemExit(f"error: --format {args.format} needs the {exc.name!r} package "
                         f"(pip install {exc.name})") from None
    print(f"wrote {output}")
    if args.verify:
        try:
            checks = verify(model, args.format, output, args.argmax, args.device)
        except RuntimeUnavailable as exc:
            raise SystemExit(f"error: cannot check {output}: {exc}; --no-verify skips the "
                             "check") from None
        for check in checks:
            print(f"  check {check}")
        if not all(check.ok for check in checks):
            raise SystemExit(f"error: {output} differs from the eager model beyond "
                             f"{MAX_RELATIVE_DIFF:g} relative or {100 * MIN_AGREEMENT:g}% "
                             "arg-max agreement")
    return output


if __name__ == "__main__":
    main()
