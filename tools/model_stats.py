"""Parameters and FLOPs of the models in inference form (eval mode, no auxiliary heads).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; it
counts convolutions and matrix products, not batch norm, activations or resizing). The model runs
on the ``meta`` device, so only shapes are computed and the table appears instantly::

    python tools/model_stats.py
    python tools/model_stats.py --model bisenetv2 --size 1024 2048 --n-classes 19
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from lib.models.zoo import build_model, model_names


def model_stats(name: str, n_classes: int, size: tuple[int, int]) -> dict[str, float]:
    """Parameter count (millions) and GFLOPs of ``name`` in eval mode for one ``size`` image."""
    with torch.device("meta"):
        model = build_model(name, n_classes, aux_heads=False).eval()
        with_aux = build_model(name, n_classes, aux_heads=True)
        image = torch.zeros(1, 3, *size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_params_m": sum(p.numel() for p in with_aux.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=model_names(), help="one model (default: all)")
    parser.add_argument("--n-classes", type=int, default=19, help="number of classes")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"),
                        help="input height and width (default 512 1024)")
    args = parser.parse_args(argv)
    if args.n_classes < 1 or min(args.size) < 1:
        parser.error("--n-classes and --size must be positive")
    rows = []
    for name in [args.model] if args.model else model_names():
        stats = model_stats(name, args.n_classes, tuple(args.size))
        rows.append([name, args.n_classes, f"{args.size[0]}x{args.size[1]}",
                     f"{stats['params_m']:.2f}", f"{stats['train_params_m']:.2f}",
                     f"{stats['gflops']:.1f}"])
    headers = ["model", "classes", "input", "params (M)", "params with aux heads (M)", "GFLOPs"]
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
