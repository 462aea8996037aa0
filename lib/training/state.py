"""The run state: everything a run is made of, and the checkpoint it reads and writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.data.dataset import DatasetInfo
from lib.models.checkpoint import save_checkpoint
from lib.training.config import TrainConfig
from lib.training.divergence import diverged, weights_finite
from lib.training.ema import WeightEma
from lib.training.monitor import TrainingHistory
from lib.training.optim import WarmupPolyLR
from lib.training.validation import BestModel

logger = logging.getLogger("bisenet")

def build_checkpoint(
    cfg: TrainConfig, info: DatasetInfo, model: nn.Module, iteration: int,
    optimizer=None, scheduler=None, scaler=None,
) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {
        "model": cfg.model,
        "n_classes": cfg.data.n_classes,
        "state_dict": model.state_dict(),
        "class_names": list(info.class_names),
        "palette": info.palette.tolist(),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "ignore_index": cfg.data.ignore_index,
        "iteration": iteration,
        "config": cfg.as_flat_dict(),
    }
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer.state_dict()
        checkpoint["scheduler"] = scheduler.state_dict()
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint



def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate without the heads' multiplier."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_mult", 1.0)



def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   iteration: int = 0) -> WarmupPolyLR:
    """The LR schedule of ``cfg`` positioned at ``iteration``.

    The schedule is a function of the config and the iteration only, so a resumed run rebuilds it
    from the command line: a new ``--max-iter``/``--lr``/warm-up applies from the resumed iteration.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr * group.get("lr_mult", 1.0)
    return WarmupPolyLR(optimizer, cfg.max_iter, cfg.warmup_iter, cfg.warmup_ratio,
                        power=cfg.poly_power, last_epoch=iteration - 1)



@dataclass
class RunState:
    """Everything a run is made of; ``checkpoint()`` and ``load()`` write and read the same dict."""

    cfg: TrainConfig
    info: DatasetInfo
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupPolyLR
    scaler: torch.amp.GradScaler
    ddp_model: nn.Module | None = None  # the DistributedDataParallel wrapper, when distributed
    compiled: nn.Module | None = None  # torch.compile of ``net`` (--compile); never saved
    iteration: int = 0
    last_checkpoint: Path | None = None
    ema: WeightEma | None = None  # --ema-decay
    best: BestModel = field(default_factory=BestModel)  # --eval-every
    history: TrainingHistory = field(default_factory=TrainingHistory)  # behind curves.png
    class_weights: tuple[float, ...] | None = None  # --class-weights, resolved

    @property
    def net(self) -> nn.Module:
        """The module to call for training steps (compiled, then the DDP wrapper, if any)."""
        if self.compiled is not None:
            return self.compiled
        return self.ddp_model if self.ddp_model is not None else self.model

    def checkpoint(self) -> dict[str, Any]:
        checkpoint = build_checkpoint(self.cfg, self.info, self.model, self.iteration,
                                      self.optimizer, self.scheduler, self.scaler)
        checkpoint["best"] = self.best.as_dict()
        checkpoint["history"] = self.history.as_dict()
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        # the resolved weights (the config holds only 'auto' or the file): compared on resume
        checkpoint["class_weights"] = (None if self.class_weights is None
                                       else list(self.class_weights))
        return checkpoint

    def model_checkpoint(self, module: nn.Module) -> dict[str, Any]:
        """A model file (no optimizer state) of ``module``'s weights at this iteration."""
        return build_checkpoint(self.cfg, self.info, module, self.iteration)

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.iteration = int(checkpoint["iteration"])
        self.scheduler = make_scheduler(self.optimizer, self.cfg, self.iteration)
        self.best = BestModel.from_dict(checkpoint.get("best"))
        self.history = TrainingHistory.from_dict(checkpoint.get("history"), self.iteration)
        if self.ema is not None:
            if checkpoint.get("ema"):
                self.ema.load_state_dict(checkpoint["ema"])
            else:  # EMA switched on for a resumed run: it starts from the resumed weights
                logger.info("EMA of the weights starts at iteration %d", self.iteration)

    def ensure_finite(self) -> None:
        """Refuse to go on from non-finite weights (checked before every checkpoint)."""
        if not weights_finite(self.model):
            raise diverged(self, "the weights are not finite")

    def save(self, path: Path) -> Path:
        """Write the full state to ``path``, never from non-finite weights."""
        self.ensure_finite()
        save_checkpoint(path, self.checkpoint())
        return path



