"""Logging on rank 0 only (to the console and to a file); progress bars for a person watching."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def setup_logging(log_file: str | Path | None = None, rank: int = 0) -> logging.Logger:
    """Configure the root logger once per process and return the repository's logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(
        "%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(message)s",
        datefmt="%H:%M:%S",
    )
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(level)
    return logging.getLogger("bisenet")


def interactive() -> bool:
    """A person is watching: a progress bar instead of (in addition to) the log lines."""
    return sys.stderr.isatty()


def progress_bar(total: int, start: int, enabled: bool) -> Any:
    """A tqdm bar over the iterations (its ETA and s/it are tqdm's own), or None."""
    if not enabled:
        return None
    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True,
                file=sys.stderr)
