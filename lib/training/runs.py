"""Run folders: every training run writes into its own folder, and no run touches another's files.

A new run gets ``<runs root>/<YYYYmmdd-HHMMSS>/`` (``-2``, ``-3`` ... appended when that name is
taken; an existing folder is never reused), the runs root being ``--runs-dir`` or ``res/<model>``.
``--output-dir X`` names the run folder exactly. Each run folder holds a ``run.json`` marker
written when the run starts; ``--resume auto`` continues the newest run (by that marker) under the
runs root, or the run in ``--output-dir``.

``evaluate.py`` and ``demo.py`` without ``--ckpt`` use ``res/model_final.pth`` (where published
weights are put) when it exists, else the most recently written ``model_final.pth`` of any run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.models.checkpoint import FINAL_NAME, CheckpointError, load_checkpoint

logger = logging.getLogger("bisenet")

CHECKPOINT_PATTERN = "checkpoint_iter{:07d}.pth"
_CHECKPOINT_RE = re.compile(r"checkpoint_iter(\d+)\.pth$")
RUN_MARKER = "run.json"


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes, and whether it continues an existing run folder."""

    run_dir: Path
    resume_auto: bool  # look for the newest usable checkpoint in run_dir
    new: bool  # the folder was created for this run


def holds_run(folder: Path) -> bool:
    """True when ``folder`` already holds a run's checkpoints or final model."""
    return bool(list_checkpoints(folder)) or (folder / FINAL_NAME).is_file()


def _created(folder: Path) -> float:
    try:
        return float(json.loads((folder / RUN_MARKER).read_text())["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return folder.stat().st_mtime


def list_runs(root: str | Path) -> list[Path]:
    """Run folders directly under ``root``, oldest first (by the time the run started)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and (p / RUN_MARKER).is_file()]
    return sorted(runs, key=lambda p: (_created(p), p.name))


def new_run_dir(root: str | Path, now: float | None = None) -> Path:
    """Create and return a fresh, timestamp-named folder under ``root``; never an existing one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    for n in range(1, 10_000):
        candidate = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            candidate.mkdir()  # atomic: two runs started in the same second get different names
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"cannot create a run folder under {root}")


def write_run_marker(run_dir: Path) -> None:
    marker = run_dir / RUN_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created": time.time(), "command": sys.argv}, indent=1))


def plan_run(runs_root: str, output_dir: str, resume: str | None) -> RunPlan:
    """Decide (on rank 0) the folder of this run; raises ValueError when that would clobber one.

    * ``--output-dir X``: X is the run folder. A new run (no ``--resume``) refuses a folder that
      already holds another run's checkpoints; ``--resume auto`` continues the run in it.
    * otherwise ``--resume auto`` continues the newest run under ``runs_root`` (a legacy flat
      ``runs_root/checkpoint_iter*.pth`` layout counts as one run), and a new run gets a new folder.
    * ``--resume PATH`` continues in PATH's folder unless ``--output-dir`` names another one.
    """
    if output_dir:
        run_dir = Path(output_dir)
        if resume is None and run_dir.is_dir() and holds_run(run_dir):
            raise ValueError(
                f"{run_dir} already holds a run ({_describe(run_dir)}); continue it with "
                f"--resume auto, or choose another --output-dir (or none: each run then gets its "
                f"own folder)")
        existed = run_dir.is_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_marker(run_dir)
        return RunPlan(run_dir, resume == "auto", not existed)
    if resume == "auto":
        runs = list_runs(runs_root)
        if runs:
            return RunPlan(runs[-1], True, False)
        if holds_run(Path(runs_root)):  # checkpoints written before runs had their own folder
            return RunPlan(Path(runs_root), True, False)
        logger.info("--resume auto: no run under %s, starting a new one", runs_root)
    elif resume is not None:
        return RunPlan(Path(resume).parent, False, False)
    run_dir = new_run_dir(runs_root)
    write_run_marker(run_dir)
    return RunPlan(run_dir, False, True)


def _describe(folder: Path) -> str:
    found = list_checkpoints(folder)
    parts = [f"checkpoints up to {found[-1].name}"] if found else []
    if (folder / FINAL_NAME).is_file():
        parts.append(FINAL_NAME)
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# What a resumed run may change. Every TrainConfig field is in exactly one group (a test checks).

# Options that define the run: resuming with another value would silently train something else.
DEFINING_FIELDS = (
    "model", "dataset", "data_root", "train_list", "n_classes", "ignore_index", "label_map",
    "mean", "std", "crop_size", "scale_range", "jitter", "batch_size", "seed", "momentum",
    "weight_decay", "head_lr_mult", "ohem_thresh", "aux_weight", "fp16",
)
# The learning-rate schedule: new values take effect from the resumed iteration.
SCHEDULE_FIELDS = ("max_iter", "lr", "warmup_iter", "warmup_ratio", "poly_power")
# Everything else: how the run is executed, logged, initialised or evaluated.
FREE_FIELDS = (
    "pretrained", "val_list", "class_names", "generate_toy", "sync_bn", "device", "num_workers",
    "output_dir", "runs_dir", "log_every", "checkpoint_every", "keep_checkpoints", "resume",
    "finetune_from", "check_data", "eval_at_end", "eval_modes", "eval_scales", "eval_crop_size",
    "eval_short_side", "eval_every", "tensorboard", "ema_decay", "channels_last", "compile",
    "compile_mode", "accumulate", "data_cache", "device_normalise",
    # its spelling ('auto' or a file) is free; the weights themselves define the run and are
    # compared on resume (lib/training/class_weights.py)
    "class_weights",
)
_PATH_FIELDS = ("data_root", "train_list", "label_map")


class RunFinished(Exception):
    """``--resume`` of a run that has already reached ``--max-iter``: nothing to do."""


def _normalise(name: str, value: object) -> object:
    if isinstance(value, list | tuple):
        return tuple(_normalise(name, v) for v in value)
    if name in _PATH_FIELDS and isinstance(value, str) and value:
        return os.path.abspath(value)
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def compare_resume_config(saved: dict, cfg, path: str | Path) -> list[tuple[str, object, object]]:
    """Check the command line against the config stored in the checkpoint ``path``.

    Raises ValueError naming every run-defining option that differs; returns the schedule options
    that differ as (name, checkpoint value, new value). Fields the checkpoint does not record
    (older checkpoints) are not compared.
    """
    differences, schedule = [], []
    current = cfg.as_flat_dict()
    for name in DEFINING_FIELDS + SCHEDULE_FIELDS:
        if name not in saved:
            continue
        old, new = saved[name], current[name]
        if _normalise(name, old) == _normalise(name, new):
            continue
        if name in SCHEDULE_FIELDS:
            schedule.append((name, old, new))
        else:
            differences.append(f"{_flag(name)}: {old!r} in the checkpoint, {new!r} now")
    if differences:
        raise ValueError(
            f"cannot resume {path}: options that define the run differ from its checkpoint:\n  "
            + "\n  ".join(differences)
            + "\nresume with the run's values, or start a new run (without --resume)")
    return schedule


__all__ = ["RunPlan", "plan_run", "list_runs", "new_run_dir", "holds_run", "RUN_MARKER",
           "RunFinished", "compare_resume_config", "DEFINING_FIELDS", "SCHEDULE_FIELDS",
           "FREE_FIELDS"]


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Periodic checkpoints in ``folder``, oldest iteration first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint_iter*.pth")
             if (m := _CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints."""
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def latest_usable_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest resumable checkpoint in ``folder``; damaged ones are reported and skipped.

    The final model counts too (it carries the optimizer state, so that a finished run can be
    extended); a periodic checkpoint of a later iteration (an extension that crashed) wins over it.
    """
    folder = Path(folder)
    candidates: list[tuple[int, int, Path]] = [
        (int(_CHECKPOINT_RE.search(p.name).group(1)), 0, p) for p in list_checkpoints(folder)]
    final, final_checkpoint = folder / FINAL_NAME, None
    if final.is_file():
        try:
            final_checkpoint = load_checkpoint(final)
        except CheckpointError as exc:
            logger.warning("skipping unusable checkpoint: %s", exc)
        else:
            if "optimizer" in final_checkpoint:
                candidates.append((int(final_checkpoint.get("iteration", 0)), 1, final))
    for _, _, path in sorted(candidates, reverse=True):
        if path == final:
            return path, final_checkpoint
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("skipping unusable checkpoint: %s", exc)
    return None
