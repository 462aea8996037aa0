"""The one configuration mechanism: a dataclass of hyper-parameters, overridable from the CLI.

Each model folder defines its recipe as a ``TrainConfig`` with the paper's (or the seed's) values;
``parse_config`` turns every field into a command-line option whose default is the recipe's value::

    python bisenetv2/train.py --max-iter 1000 --batch-size 8 --lr 0.01

Options are spelled with dashes; the underscore spellings of the seed's scripts are accepted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lib.data.config import DATASET_DEFAULTS, DataConfig, dataset_defaults
from lib.data.config import option as _opt
from lib.data.transforms import TrainTransform
from lib.evaluation.evaluator import DEFAULT_SCALES, EvalOptions
from lib.models.zoo import model_names

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    # model
    model: str = _opt("bisenetv2", "model to train: bisenetv1, bisenetv2 or diss")
    pretrained: str = _opt(
        "none", "ImageNet backbone weights: a file, 'auto' (download or local cache; for "
        "bisenetv2 also 'backbone_v2') or 'none'"
    )
    # data (nested; on the command line the options keep their flat names)
    data: DataConfig = field(default_factory=DataConfig)
    # augmentation
    crop_size: tuple[int, int] = _opt((512, 1024), "training crop height and width")
    scale_range: tuple[float, float] = _opt((0.25, 2.0), "random scale range of the full image")
    jitter: float = _opt(0.4, "brightness, contrast and saturation jitter strength")
    # optimisation
    max_iter: int = _opt(150_000, "training iterations")
    batch_size: int = _opt(16, "global batch size, split evenly over all processes")
    accumulate: int = _opt(
        1, "gradient accumulation: each process runs its share of --batch-size as N "
        "micro-batches, one optimizer step per iteration (BatchNorm and OHEM see the "
        "micro-batch; README, Training on one GPU)")
    lr: float = _opt(5e-2, "base learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "weight decay (not applied to BatchNorm weights and biases)")
    head_lr_mult: float = _opt(10.0, "learning-rate multiplier of the output heads")
    warmup_iter: int = _opt(1000, "warm-up iterations")
    warmup_ratio: float = _opt(0.1, "learning rate at the first iteration, as a fraction of --lr")
    poly_power: float = _opt(0.9, "power of the poly decay")
    ohem_thresh: float = _opt(0.7, "OHEM: keep pixels whose probability of the truth is below this")
    class_weights: str | None = _opt(
        None, "per-class loss weights for imbalanced data: 'auto' (ENet's 1/ln(1.02 + p) of each "
        "class's pixel frequency p in the training labels, computed at start) or a file written "
        "by tools/compute_class_weights.py (default: none, every class weighs 1)")
    aux_weight: float = _opt(1.0, "weight of each auxiliary (booster) loss")
    fp16: bool = _opt(False, "mixed precision: fp16 autocast + GradScaler on CUDA, bf16 on CPU")
    sync_bn: bool = _opt(True, "synchronised BatchNorm when training with several processes")
    channels_last: bool | None = _opt(
        None, "channels-last memory format for the model and its inputs (default: the device's "
        "measured choice, lib/training/step.py: on for CUDA, off for the CPU)")
    compile: bool | None = _opt(
        None, "torch.compile the training step's model, which costs minutes of compilation "
        "first (default: the device's measured choice, lib/training/step.py: on for CUDA runs of "
        "at least 5000 iterations without SyncBN, off for the CPU)")
    compile_mode: str = _opt(
        "default", "torch.compile mode: default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs")
    # run
    device: str = _opt("auto", "auto, cuda or cpu")
    num_workers: int | None = _opt(
        None, "data-loading workers per process (default: the CPUs this process may use, "
        "divided by the processes per node, minus one)")
    data_cache: str = _opt(
        "auto", "decoded-image cache of the training split (each image and label decoded once, "
        "then memory-mapped): auto ($BISENET_CACHE or ~/.cache/bisenet, subfolder decoded; "
        "skipped with a warning when the disk lacks room), shm (/dev/shm), a folder, or off")
    device_normalise: bool | None = _opt(
        None, "workers send uint8 crops and the device normalises them (default: on for CUDA, "
        "off for the CPU, where it measured slower)")
    seed: int = _opt(0, "seed of the data order, augmentation and initialisation")
    output_dir: str = _opt(
        "", "this run's folder for checkpoints and logs (default: a new <runs-dir>/<timestamp>)")
    runs_dir: str = _opt("", "folder holding one sub-folder per run (default: res/<model>)")
    log_every: int = _opt(50, "log every N iterations")
    checkpoint_every: int = _opt(5000, "write a checkpoint every N iterations (0: only the last)")
    keep_checkpoints: int = _opt(3, "how many periodic checkpoints to keep")
    resume: str | None = _opt(None, "resume from a checkpoint file, or 'auto' for the latest")
    finetune_from: str | None = _opt(
        None, "initialise from a model file or published weights by name (bisenetv2-city, "
        "bisenetv1-coco, ...); class layers re-initialised on a class-count change"
    )
    check_data: bool = _opt(True, "check every label file before training starts")
    # evaluation after training
    eval_at_end: bool = _opt(True, "evaluate on the validation split when training ends")
    eval_modes: tuple[str, ...] = _opt(("ss",), "evaluation modes: ss ssc msf mscf")
    eval_scales: tuple[float, ...] = _opt(DEFAULT_SCALES, "scales of the msf / mscf modes")
    eval_crop_size: tuple[int, int] = _opt((1024, 1024), "crop height and width of ssc / mscf")
    eval_short_side: int | None = _opt(
        None, "resize the short side to this before evaluating (ADE20K / COCO-Stuff protocol)"
    )

    # watching the run
    eval_every: int = _opt(
        0, "evaluate (single scale) every N iterations and keep model_best.pth (0: off)")
    tensorboard: bool = _opt(True, "write TensorBoard event files in the run folder")
    ema_decay: float = _opt(
        0.0, "exponential moving average of the weights with this decay, evaluated and saved "
        "beside them (0: off)")

    def eval_options(self) -> EvalOptions:
        """The protocol of this recipe's evaluation (also saved in checkpoints, read by
        evaluate.py)."""
        return EvalOptions(modes=self.eval_modes, scales=self.eval_scales,
                           crop_size=self.eval_crop_size, short_side=self.eval_short_side)

    def runs_root(self) -> str:
        """The folder whose sub-folders are this model's runs (``--resume auto`` searches it)."""
        return self.runs_dir or f"res/{self.model}"

    def train_transform(self) -> TrainTransform:
        """The training augmentation: scale, crop, flip, colour jitter, normalisation."""
        return TrainTransform(self.crop_size, self.scale_range, jitter=self.jitter,
                              mean=self.data.mean, std=self.data.std,
                              ignore_index=self.data.ignore_index)

    def as_flat_dict(self) -> dict[str, Any]:
        """Every option by its command-line name (what checkpoints save as ``config``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**dataclasses.asdict(values.pop("data")), **values}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`as_flat_dict` (unknown keys are an error)."""
        data_names = {f.name for f in dataclasses.fields(DataConfig)}
        data = DataConfig(**{k: v for k, v in values.items() if k in data_names})
        return cls(data=data, **{k: v for k, v in values.items() if k not in data_names})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with options changed by their command-line names (data options included)."""
        return TrainConfig.from_flat({**self.as_flat_dict(), **changes})


def option_fields() -> list[tuple[dataclasses.Field, type]]:
    """Every command-line option's field and the dataclass that declares it, data ones first."""
    return [(f, DataConfig) for f in dataclasses.fields(DataConfig)] + [
        (f, TrainConfig) for f in dataclasses.fields(TrainConfig) if f.name != "data"]


def _argument_for(f: dataclasses.Field, owner: type, default) -> tuple[list[str], dict]:
    names = [f"--{f.name.replace('_', '-')}"]
    if "_" in f.name:
        names.append(f"--{f.name}")
    kwargs: dict = {"default": default, "help": f"{f.metadata['help']} (default: %(default)s)"}
    hint = typing.get_type_hints(owner)[f.name]
    origin = typing.get_origin(hint)
    if hint is bool or (origin in (typing.Union, types.UnionType)
                        and set(typing.get_args(hint)) == {bool, type(None)}):
        # "bool | None": --x / --no-x, and None (not given) leaves the choice to the code
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is tuple:
        args = typing.get_args(hint)
        kwargs["type"] = args[0]
        kwargs["nargs"] = "+" if args[-1] is Ellipsis else len(args)
    elif origin in (typing.Union, types.UnionType):  # "X | None"
        kwargs["type"] = next(a for a in typing.get_args(hint) if a is not type(None))
    else:
        kwargs["type"] = hint
    return names, kwargs


def build_parser(recipe: TrainConfig, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = recipe.as_flat_dict()
    for f, owner in option_fields():
        names, kwargs = _argument_for(f, owner, defaults[f.name])
        parser.add_argument(*names, **kwargs)
    # Passed by the legacy torch.distributed.launch; the environment carries the same value.
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0,
                        help=argparse.SUPPRESS)
    return parser


def parse_config(
    recipe: TrainConfig,
    argv: Sequence[str] | None = None,
    description: str = "",
    presets: dict[str, TrainConfig] | None = None,
) -> TrainConfig:
    """Parse the command line on top of ``recipe``.

    ``presets`` maps a name (e.g. ``quickstart``, ``ade20k``) to an alternative recipe;
    ``--quickstart`` or ``--recipe quickstart`` then switches every default to that recipe, and
    further options still override it. A ``--dataset`` other than the recipe's brings that
    dataset's class count, mean/std and evaluation protocol (see :func:`dataset_defaults`),
    except the options given on the command line.
    """
    presets = presets or {}
    pre = argparse.ArgumentParser(add_help=False)
    for name in presets:
        pre.add_argument(f"--{name}", action="store_true")
    if presets:
        pre.add_argument("--recipe", choices=sorted(presets), default=None)
    known, rest = pre.parse_known_args(argv)
    chosen = [name for name in presets if getattr(known, name)]
    if presets and known.recipe is not None and known.recipe not in chosen:
        chosen.append(known.recipe)
    if len(chosen) > 1:
        raise SystemExit(f"choose one of --{', --'.join(chosen)}")
    base = presets[chosen[0]] if chosen else recipe

    def full_parser() -> argparse.ArgumentParser:
        parser = build_parser(base, description)
        for name in presets:
            parser.add_argument(f"--{name}", action="store_true", help=f"use the {name} recipe")
        if presets:
            parser.add_argument("--recipe", choices=sorted(presets), default=None,
                                help="use this recipe (same as --NAME)")
        return parser

    args = full_parser().parse_args(rest)
    # which dataset-dependent options were given: parsed once more with a marker as default
    marker = object()
    probe = full_parser()
    probe.set_defaults(**{name: marker for name in DATASET_DEFAULTS})
    probed = probe.parse_args(rest)
    given = {name for name in DATASET_DEFAULTS if getattr(probed, name) is not marker}
    values = {f.name: getattr(args, f.name) for f, _ in option_fields()}
    base_values = base.as_flat_dict()
    defaults = (dataset_defaults(values["dataset"]) if values["dataset"] != base.data.dataset
                else {})
    for name in DATASET_DEFAULTS:
        if name not in given:
            values[name] = defaults.get(name, base_values[name])
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    cfg = TrainConfig.from_flat(values)
    validate_config(cfg)
    return cfg


def for_dataset(recipe: TrainConfig, dataset: str, **changes) -> TrainConfig:
    """``recipe`` on the named ``dataset``: its class count, mean/std and evaluation protocol,
    then ``changes``."""
    return recipe.replace(**{**dataset_defaults(dataset), "dataset": dataset, **changes})


def validate_config(cfg: TrainConfig) -> None:
    """Reject values that would otherwise fail late or silently train the wrong thing."""
    def fail(msg: str) -> None:
        raise ValueError(msg)

    if cfg.model not in model_names():
        fail(f"--model {cfg.model!r} is not one of {', '.join(model_names())}")
    cfg.data.validate()
    if cfg.max_iter < 1 or cfg.batch_size < 1:
        fail("--max-iter and --batch-size must be positive")
    if cfg.accumulate < 1 or cfg.batch_size % cfg.accumulate:
        fail(f"--accumulate {cfg.accumulate} must be a positive divisor of --batch-size "
             f"{cfg.batch_size}")
    if cfg.warmup_iter >= cfg.max_iter:
        fail(f"--warmup-iter ({cfg.warmup_iter}) must be smaller than --max-iter ({cfg.max_iter})")
    if not 0 < cfg.scale_range[0] <= cfg.scale_range[1]:
        fail(f"--scale-range {cfg.scale_range} must be two increasing positive numbers")
    if min(cfg.crop_size) < 32:
        fail(f"--crop-size {cfg.crop_size} is too small (at least 32x32)")
    if cfg.lr <= 0:
        fail(f"--lr must be positive, got {cfg.lr}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        fail(f"--num-workers must be 0 or more, got {cfg.num_workers}")
    if cfg.eval_every < 0:
        fail(f"--eval-every must be 0 (off) or positive, got {cfg.eval_every}")
    if not 0 <= cfg.ema_decay < 1:
        fail(f"--ema-decay must be in [0, 1) (0 turns it off), got {cfg.ema_decay}")
    if cfg.compile_mode not in COMPILE_MODES:
        fail(f"--compile-mode {cfg.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
    bad_modes = set(cfg.eval_modes) - {"ss", "ssc", "msf", "mscf"}
    if bad_modes:
        fail(f"unknown --eval-modes {sorted(bad_modes)}: use ss, ssc, msf, mscf")
    try:
        cfg.eval_options()
    except ValueError as exc:
        fail(f"evaluation options (--eval-*): {exc}")
