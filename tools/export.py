"""Export a checkpoint's inference form (BatchNorm folded, no auxiliary heads) to ONNX or
TorchScript.

    python tools/export.py --ckpt res/model_final.pth --format onnx --output res/model.onnx
    python tools/export.py --ckpt ... --format onnx --argmax        # the graph outputs labels
    python tools/export.py --ckpt ... --format torchscript --output res/model.pt

Input: ``images`` float32 [N, 3, H, W], normalised with the checkpoint's mean/std (Cityscapes:
RGB / 255, mean (0.3257, 0.3690, 0.3223), std (0.2112, 0.2148, 0.2115)). Output: ``logits``
[N, C, H, W], or with --argmax ``labels`` int64 [N, H, W]. The ONNX batch, height and width are
dynamic (any size, not only multiples of 32).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lib.checkpoint import CheckpointError, load_model  # noqa: E402
from lib.deploy import to_inference_form  # noqa: E402
from lib.models import MODEL_NAMES  # noqa: E402
from lib.published import NAMES_HELP, published_entry  # noqa: E402
from lib.runs import default_checkpoint  # noqa: E402


class WithArgmax(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).argmax(1)


def export(model: nn.Module, path: pathlib.Path, fmt: str, argmax: bool = False,
           size: Sequence[int] = (512, 1024), opset: int = 17) -> pathlib.Path:
    """Write ``model`` (a training-form or inference-form BiSeNet) to ``path``."""
    module = to_inference_form(model, channels_last=False).cpu()
    if argmax:
        module = WithArgmax(module)
    module.eval()
    example = torch.randn(1, 3, *size)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        traced.save(str(path))
        return path
    output = "labels" if argmax else "logits"
    dynamic = {
        "images": {0: "batch", 2: "height", 3: "width"},
        output: {0: "batch", 1: "height", 2: "width"} if argmax
        else {0: "batch", 2: "height", 3: "width"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=["images"],
                          output_names=[output], dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False)
    return path


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None,
                        help=f"checkpoint, {NAMES_HELP} (default: res/model_final.pth if it "
                             "exists, else the newest trained run's model_final.pth)")
    parser.add_argument("--model", choices=MODEL_NAMES, default=None)
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--output", default=None,
                        help="default: next to the checkpoint (res/<name> for published weights)")
    parser.add_argument("--argmax", action="store_true", help="output labels instead of logits")
    parser.add_argument("--size", nargs=2, type=int, default=[512, 1024],
                        help="example input size used for tracing")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    if args.ckpt is None:
        args.ckpt = str(default_checkpoint("res/model_final.pth", "res"))
    try:
        model, _ = load_model(args.ckpt, "cpu", args.model)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    # next to the checkpoint; published weights by name go to res/<name>, not into the hub cache
    source = pathlib.Path("res" if published_entry(args.ckpt) else "", args.ckpt)
    output = pathlib.Path(args.output or source.with_suffix(suffix))
    export(model, output, args.format, args.argmax, args.size, args.opset)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
