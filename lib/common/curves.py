"""``curves.png``: the training loss (log scale), the learning rate and the validation mIoU
against the iteration, drawn with matplotlib.

matplotlib is optional for training: :func:`write_training_curves` imports it when called and
raises ``ModuleNotFoundError`` when it is missing; the trainer then logs once that curves.png is
skipped and why. The Agg backend draws straight into the file (no display, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CURVES_SIZE_INCHES = (8.0, 9.0)  # width, height
CURVES_DPI = 100  # so curves.png is 800 x 900 pixels


def curves_figure(iterations: Sequence[int], loss: Sequence[float], lr: Sequence[float],
                  val_iterations: Sequence[int], val_miou: Sequence[float], max_iter: int):
    """A matplotlib Figure of three panels sharing the iteration axis: training loss (log
    scale), learning rate, and validation mIoU (%) as points."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=CURVES_SIZE_INCHES, dpi=CURVES_DPI, layout="constrained")
    loss_axes, lr_axes, miou_axes = figure.subplots(3, 1, sharex=True)
    # a log axis cannot show a non-positive (or NaN) loss; such points are left out
    shown = [(i, v) for i, v in zip(iterations, loss, strict=True) if v > 0]
    loss_axes.plot([i for i, _ in shown], [v for _, v in shown], color="tab:red",
                   label="training loss (mean since the previous log line)")
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("loss")
    lr_axes.plot(iterations, lr, color="tab:blue", label="learning rate (without head multiplier)")
    lr_axes.set_ylabel("learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    miou_axes.plot(val_iterations, [100 * v for v in val_miou], "o-", color="tab:green",
                   label="validation mIoU (single scale)")
    miou_axes.set_ylabel("mIoU (%)")
    miou_axes.set_xlabel("iteration")
    miou_axes.set_xlim(0, max_iter)
    for axes, has_data in ((loss_axes, shown), (lr_axes, lr), (miou_axes, val_miou)):
        axes.grid(True, which="both", alpha=0.3)
        if has_data:
            axes.legend(loc="best")
        else:
            axes.text(0.5, 0.5, "no values", transform=axes.transAxes, ha="center")
    figure.suptitle(f"training curves ({max_iter} iterations)")
    return figure


def write_training_curves(path: str | Path, iterations: Sequence[int], loss: Sequence[float],
                          lr: Sequence[float], val_iterations: Sequence[int],
                          val_miou: Sequence[float], max_iter: int) -> Path:
    """Draw :func:`curves_figure` into the PNG ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = curves_figure(iterations, loss, lr, val_iterations, val_miou, max_iter)
    FigureCanvasAgg(figure).print_png(str(path))
    return Path(path)
