"""Checkpoints: atomic writes, safe loading, and building a model from a checkpoint file.

A checkpoint written by this repository is a dict::

    {"model": "bisenetv2", "n_classes": 19, "state_dict": {...}, "class_names": [...],
     "mean": [...], "std": [...], "iteration": 1234, "config": {...},
     "optimizer": {...}, "scheduler": {...}, "scaler": {...}}   # the last three for resuming

Periodic checkpoints and the final ``model_final.pth`` of a training run carry all of it (the final
one too, so that a finished run can be extended with a larger ``--max-iter``).

A bare state dict, such as the published ``model_final_v2_city.pth``, is accepted wherever a
checkpoint is: the model name and class count are then inferred from its keys, and the dataset
from the class count where only one dataset has that many classes (see
:func:`lib.data.datasets.dataset_for_class_count`). The published files can also be given by name
(``bisenetv2-city``, see :mod:`lib.models.published`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lib.data.datasets import DATASETS, dataset_for_class_count
from lib.models.published import (
    PublishedWeightsError,
    check_published_layout,
    known_names,
    published_entry,
    published_file,
)
from lib.models.zoo import (
    build_model,
    has_aux_heads,
    infer_model_name,
    infer_n_classes,
    model_names,
    strip_module_prefix,
)

logger = logging.getLogger(__name__)

# what a finished training run leaves in its folder; evaluate.py, demo.py and the tools default
# to the newest one
FINAL_NAME = "model_final.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with the reason and the path in the message."""


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` so that a crash at any moment leaves either the old file or the new one.

    The data goes to a temporary file in the same folder, is flushed to disk, and is then renamed
    over ``path`` (a rename within one file system is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (or a bare state dict) on the CPU with ``weights_only=True``.

    ``path`` may also name published weights (``bisenetv2-city``): their file in the torch hub
    cache is used (downloaded when missing) and checked against the published layout; the
    result then records ``published`` (the name), ``dataset`` and ``file`` (the path).
    Always returns the checkpoint form: a bare state dict is wrapped as ``{"state_dict": ...}``.
    """
    try:
        published = published_entry(path)
        if published is not None:
            path = published_file(published[0])
    except PublishedWeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give a checkpoint file, or the name "
                              f"of published weights: {known_names()})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"cannot read checkpoint {path} ({exc}); the file is "
                                  "truncated, corrupt, or not a PyTorch state dict") from exc
        raise CheckpointError(refused_pickle_message(path, str(exc))) from None
    except Exception as exc:  # truncated zip, not a torch file ...
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file is "
            "truncated, corrupt, or not a PyTorch state dict"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    state_dict = obj["state_dict"]
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors")
    obj["state_dict"] = strip_module_prefix(state_dict)
    if published is not None:
        name, entry = published
        try:
            check_published_layout(obj["state_dict"], name, path)
        except PublishedWeightsError as exc:
            raise CheckpointError(str(exc)) from exc
        obj.update(published=name, dataset=entry.dataset)
    obj["file"] = str(path)
    return obj


def refused_pickle_message(path: str | Path, torch_message: str) -> str:
    """What to tell the user about a file that ``torch.load(weights_only=True)`` refused.

    Such a file is a pickle holding Python objects other than tensors (a whole model, an
    optimizer of another library, or code to run: unpickling may call any function the file
    names). It is refused without unpickling anything; the text says how to convert it once,
    for a file whose source is trusted (tools/convert_checkpoint.py).
    """
    found = re.search(r"GLOBAL (\S+)", torch_message)
    what = f" (it names {found.group(1)})" if found else ""
    converted = Path(path).with_name(Path(path).stem + "_weights.pth")
    return (
        f"{path} holds Python objects other than tensors{what}, or is a plain pickle rather "
        "than a torch.save() file of tensors; it was refused for safety, because unpickling it "
        "could run any code the file names. If you trust its source, convert it once into a "
        "file of tensors only (this does unpickle it):\n"
        f"  python tools/convert_checkpoint.py --trust {path} {converted}\n"
        f"and use {converted}"
    )


def convert_trusted_checkpoint(source: str | Path, target: str | Path) -> int:
    """Unpickle ``source`` **without** the weights-only guard and save its tensors to ``target``.

    Only for a trusted file: unpickling runs whatever the file names. Accepts a torch.save()
    file (zip or legacy) or a plain pickle of a model, of a ``{"state_dict": ...}`` checkpoint
    or of a state dict; writes the state dict's tensors (non-tensor entries dropped) as a bare
    state dict. Returns the number of tensors written.
    """
    try:
        obj = torch.load(source, map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError):  # a plain pickle: no torch magic number
        with open(source, "rb") as f:
            obj = pickle.load(f)  # noqa: S301 - the caller vouched for the file
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, neither a model nor a "
                              "state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors")
    save_checkpoint(target, tensors)
    return len(tensors)


def _fill_dataset_metadata(checkpoint: dict[str, Any], n_classes: int) -> None:
    """Give a checkpoint without metadata (a bare state dict) its dataset's names, colours and
    normalisation, when the dataset is known or follows from the class count."""
    saved = checkpoint.get("config") or {}
    implied = dataset_for_class_count(n_classes)
    dataset = (checkpoint.get("dataset") or saved.get("dataset")
               or (implied.name if implied else None))
    checkpoint["dataset"] = dataset
    spec = DATASETS.get(dataset)
    if spec is None or spec.n_classes != n_classes or "class_names" in checkpoint:
        return  # Cityscapes' names and colours are the defaults everywhere
    checkpoint.update(class_names=list(spec.class_names), palette=np.asarray(spec.palette),
                      mean=tuple(spec.mean), std=tuple(spec.std))


def describe_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, model_name: str | None = None,
    n_classes: int | None = None,
) -> tuple[str, int]:
    """Return (model name, class count) of ``checkpoint``, checking them against what was asked."""
    state_dict = checkpoint["state_dict"]
    try:
        found_name = checkpoint.get("model") or infer_model_name(state_dict)
        found_classes = int(checkpoint.get("n_classes") or infer_n_classes(state_dict))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a BiSeNet checkpoint of this repository ({exc}); "
            f"known models: {', '.join(model_names())}"
        ) from exc
    if model_name is not None and model_name != found_name:
        raise CheckpointError(
            f"{path} holds a {found_name} model, but {model_name} was requested"
        )
    if n_classes is not None and n_classes != found_classes:
        raise CheckpointError(
            f"{path} has {found_classes} classes, but {n_classes} were requested "
            "(use --finetune-from to start from weights with another class count)"
        )
    return found_name, found_classes


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    model_name: str | None = None,
    n_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model stored in ``path``, load its weights strictly, and put it in eval mode.

    ``path`` may name published weights (``bisenetv2-coco``). Returns the model and the
    checkpoint dict (without the weights) for its metadata; its ``dataset`` is the checkpoint's,
    else the one its class count implies (None when ambiguous).
    """
    checkpoint = load_checkpoint(path)
    name, classes = describe_checkpoint(checkpoint, path, model_name, n_classes)
    state_dict = checkpoint.pop("state_dict")
    model = build_model(name, classes, aux_heads=has_aux_heads(name, state_dict))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in {checkpoint['file']} do not fit a {name} model: {exc}") from exc
    checkpoint["model"], checkpoint["n_classes"] = name, classes
    _fill_dataset_metadata(checkpoint, classes)
    return model.to(device).eval(), checkpoint


def load_finetune_weights(model: nn.Module, path: str, n_classes: int) -> str:
    """Load weights from ``path`` (a file, or published weights by name: ``bisenetv2-city``);
    class layers with another class count stay re-initialised."""
    checkpoint = load_checkpoint(path)
    describe_checkpoint(checkpoint, path, model_name=getattr(model, "model_name", None))
    own = model.state_dict()
    source = checkpoint["state_dict"]
    reinitialised, kept = [], {}
    for key, value in source.items():
        if key not in own:
            continue  # e.g. auxiliary heads missing from / added to the target
        if own[key].shape != value.shape:
            if value.shape[0] != own[key].shape[0] and own[key].shape[0] == n_classes:
                reinitialised.append(key)
                continue
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(own[key].shape)}"
            )
        kept[key] = value
    missing = [k for k in own if k not in kept and k not in reinitialised]
    model.load_state_dict(kept, strict=False)
    message = f"fine-tuning from {checkpoint['file']}: {len(kept)} tensors loaded"
    if reinitialised:
        message += f"; class layers re-initialised for {n_classes} classes: {reinitialised}"
    if missing:
        message += f"; {len(missing)} tensors not in the file keep their initialisation"
    return message


def newest_final_model(root: str | Path = "res") -> Path | None:
    """The most recently written ``model_final.pth`` in a run folder under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [p for p in root.rglob(FINAL_NAME) if p.parent != root and p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)


def default_checkpoint(preferred: str | Path, search_root: str | Path = "res") -> Path:
    """``preferred`` when it exists, else the newest trained final model under ``search_root``.

    Says on stderr which file was chosen, so that a default never silently picks a surprise.
    """
    preferred = Path(preferred)
    if preferred.is_file():
        return preferred
    newest = newest_final_model(search_root)
    if newest is None:
        return preferred  # loading then fails with "checkpoint not found: <preferred>"
    print(f"{preferred} not found: using the newest trained model, {newest}", file=sys.stderr)
    return newest
