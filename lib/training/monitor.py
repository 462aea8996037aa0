"""Watching a run: TensorBoard event files, the logged history behind ``curves.png``, progress bar.

Everything here runs at logging or validation time from values the loop has already brought to
the host, so watching a run adds no host-device synchronisation per iteration. Only rank 0
writes; ``--no-tensorboard`` writes no event file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TrainingHistory:
    """The values logged so far (they travel in checkpoints, so curves.png covers resumed runs)."""

    iterations: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_iterations: list[int] = field(default_factory=list)
    val_miou: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, list] | None, upto: int) -> TrainingHistory:
        """The history saved in a checkpoint, cut at its iteration ``upto``."""
        values = values or {}
        history = cls()
        for it, loss, lr in zip(values.get("iterations", []), values.get("loss", []),
                                values.get("lr", []), strict=True):
            if it <= upto:
                history.add_training(it, loss, lr)
        for it, miou in zip(values.get("val_iterations", []), values.get("val_miou", []),
                            strict=True):
            if it <= upto:
                history.add_validation(it, miou)
        return history

    def add_training(self, iteration: int, loss: float, lr: float) -> None:
        self.iterations.append(int(iteration))
        self.loss.append(float(loss))
        self.lr.append(float(lr))

    def add_validation(self, iteration: int, miou: float) -> None:
        self.val_iterations.append(int(iteration))
        self.val_miou.append(float(miou))


class EventLog:
    """TensorBoard scalars and images in the run folder; does nothing when disabled."""

    def __init__(self, run_dir: Path | None, purge_step: int | None = None) -> None:
        self.writer = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the events an interrupted run wrote after its checkpoint
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step or None)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, iteration)

    def images(self, iteration: int, images: dict[str, np.ndarray]) -> None:
        """HxWx3 uint8 RGB images."""
        if self.writer is not None:
            for tag, image in images.items():
                self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["TrainingHistory", "EventLog"]
