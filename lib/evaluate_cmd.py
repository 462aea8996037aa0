"""The command line of every ``evaluate.py``: load a checkpoint, run the evaluator, print the table.

    python evaluate.py                                   # res/model_final.pth, single scale
    python evaluate.py --ckpt res/bisenetv2/model_final.pth --mode ss ssc msf mscf
    torchrun --nproc_per_node=2 evaluate.py --ckpt ... --mode msf
    python evaluate.py --ckpt ... --split test --save-pred res/test_pred   # server submission
    python evaluate.py --ckpt bisenetv2-city         # published weights by name (hub cache)
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lib import distributed
from lib.checkpoint import CheckpointError, load_model
from lib.config import TrainConfig, dataset_defaults
from lib.data import build_dataset, dataset_info, prepare_dataset
from lib.datasets import DATASETS
from lib.evaluator import (
    MODES,
    EvalOptions,
    PredictionWriter,
    evaluate,
    format_iou_table,
    iou_from_confusion,
)
from lib.logger import setup_logging
from lib.models import MODEL_NAMES
from lib.monitor import interactive
from lib.published import NAMES_HELP
from lib.runs import default_checkpoint
from lib.runtimes import RUNTIME_NAMES, RuntimeUnavailable, build_runtime, int8_model_for

logger = logging.getLogger("bisenet")
DEFAULT = EvalOptions()


def build_parser(default_ckpt: str, model_name: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", "--weight-path", default=None,
                        help=f"checkpoint, published state dict, {NAMES_HELP} (default: "
                             f"{default_ckpt} if it exists, else the newest trained run's "
                             "model_final.pth)")
    if model_name is None:
        parser.add_argument("--model", choices=MODEL_NAMES, default=None,
                            help="model of a bare state dict (inferred from its keys if omitted)")
    add_protocol_arguments(parser)
    parser.add_argument("--split", default="val", help="val, test (no labels) or train")
    parser.add_argument("--dataset", default=None, choices=[*DATASETS, "list", "folders"],
                        help="the data's kind, with its class names, colours, label reader and "
                             "protocol (default: the checkpoint's dataset, else cityscapes)")
    parser.add_argument("--data-root", default=None,
                        help="dataset root (default: the checkpoint's, else data)")
    parser.add_argument("--val-list", default=None, help="annotation list (with --dataset list)")
    parser.add_argument("--label-map", default=None,
                        help="JSON/CSV raw label -> train id map (custom data)")
    parser.add_argument("--save-pred", default=None, metavar="DIR",
                        help="write one label PNG per image, in the dataset's own label values "
                             "(Cityscapes: labelIds in the benchmark layout "
                             "<city>/<name>_leftImg8bit.png; ADE20K: 1..150; custom data: class "
                             "ids)")
    parser.add_argument("--save-colour", action="store_true",
                        help="with --save-pred, also write colourised predictions")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--runtime", choices=RUNTIME_NAMES, default="torch",
                        help="torch (default: the numbers training prints, to the pixel), "
                             "torch-compile, onnxruntime, openvino, or auto: the fastest runtime "
                             "and precision, measured per input size, kept only if its arg-max "
                             "agrees with fp32 on >= 99.5%% of the pixels")
    parser.add_argument("--num-workers", type=int, default=4)
    # Passed by the legacy torch.distributed.launch; the environment carries the same value.
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0,
                        help=argparse.SUPPRESS)
    return parser


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The protocol's options. Left out, each takes the value of the recipe the checkpoint was
    trained with (its dataset's protocol), else the Cityscapes protocol."""
    group = parser.add_argument_group("protocol (see README, Evaluation)")
    group.add_argument("--mode", nargs="+", default=["ss"], choices=MODES,
                       help="ss: single scale; ssc: single scale, crops; msf: multi-scale + "
                            "flip; mscf: multi-scale crops + flip (default: %(default)s)")
    group.add_argument("--scales", nargs="+", type=float, default=None,
                       help=f"scales of msf/mscf (default: {' '.join(map(str, DEFAULT.scales))})")
    group.add_argument("--crop-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                       help="crop of ssc/mscf (default: the training recipe's evaluation crop, "
                            f"else {DEFAULT.crop_size[0]} {DEFAULT.crop_size[1]})")
    group.add_argument("--crop-stride", type=float, default=DEFAULT.crop_stride,
                       help="step between crops as a fraction of the crop (default: 2/3)")
    group.add_argument("--short-side", type=int, default=None,
                       help="first resize the short side to this (ADE20K / COCO-Stuff protocol; "
                            "0: never; default: the training recipe's, none for Cityscapes)")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=DEFAULT.flip,
                       help="add horizontal flips in msf/mscf (default: on; --no-flip)")
    group.add_argument("--crop-batch", type=int, default=DEFAULT.crop_batch,
                       help="crops per forward pass (default: %(default)s)")


def protocol_options(args: argparse.Namespace, recipe: Mapping[str, Any] | None = None
                     ) -> EvalOptions:
    """``EvalOptions`` from the command line, gaps filled from a checkpoint's saved config."""
    recipe = recipe or {}

    def given_or_recipe(value, key: str, fallback):
        if value is not None:
            return value
        saved = recipe.get(key)
        return fallback if saved is None else saved

    short_side = given_or_recipe(args.short_side, "eval_short_side", None)
    return EvalOptions(
        modes=tuple(args.mode),
        scales=tuple(given_or_recipe(args.scales, "eval_scales", DEFAULT.scales)),
        crop_size=tuple(given_or_recipe(args.crop_size, "eval_crop_size", DEFAULT.crop_size)),
        crop_stride=args.crop_stride,
        flip=args.flip,
        short_side=short_side or None,
        crop_batch=args.crop_batch,
    )


def dataset_and_protocol(args: argparse.Namespace, saved: Mapping[str, Any],
                         implied: str | None = None, model: str | None = None
                         ) -> tuple[str, EvalOptions, bool]:
    """(dataset, protocol, whether the dataset is not the checkpoint's) from the command line and
    a checkpoint's saved config (empty for a bare state dict).

    The dataset is ``--dataset``, else the checkpoint's, else ``implied`` (what a bare state
    dict's class count says), else Cityscapes. Another dataset than the checkpoint's brings its
    own protocol (for ``model``: BiSeNetV1's published weights used smaller crops on ADE20K and
    COCO-Stuff) and names and colours; the options given on the command line win either way.
    """
    dataset_name = args.dataset or saved.get("dataset") or implied or "cityscapes"
    other_dataset = dataset_name != saved.get("dataset")
    protocol = ({**saved, **dataset_defaults(dataset_name, model)} if other_dataset
                else saved)
    return dataset_name, protocol_options(args, protocol), other_dataset


def main(argv: Sequence[str] | None = None, default_ckpt: str = "res/model_final.pth",
         model_name: str | None = None) -> dict[str, Any]:
    args = build_parser(default_ckpt, model_name).parse_args(argv)
    if args.ckpt is None:
        args.ckpt = str(default_checkpoint(default_ckpt, Path(default_ckpt).parent))
    dist_info = distributed.init_distributed(args.device)
    setup_logging(None, dist_info.rank)
    try:
        return _run(args, dist_info, model_name or args.model)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeUnavailable) as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        distributed.cleanup_distributed()


def evaluation_dataset(args: argparse.Namespace, meta: Mapping[str, Any]) -> str:
    """``--dataset``, else the checkpoint's, else the one a bare state dict's class count
    implies; a class count that names no single dataset asks for ``--dataset``."""
    saved = meta.get("config") or {}
    name = args.dataset or saved.get("dataset") or meta.get("dataset")
    if not name:
        raise ValueError(f"{meta['file']} has {meta['n_classes']} classes, which does not tell "
                         f"its dataset: pass --dataset ({', '.join(DATASETS)}, list or folders)")
    return name


def data_config(args: argparse.Namespace, meta: Mapping[str, Any]) -> TrainConfig:
    """The data side of the recipe: the dataset (:func:`evaluation_dataset`) and its options from
    the command line or the checkpoint (``data_root``, ``val_list``, ``label_map``,
    ``num_workers``), classes, ignore index and normalisation from the checkpoint."""
    saved = meta.get("config") or {}
    dataset_name = evaluation_dataset(args, meta)
    data_defaults = DATASETS.get(dataset_name) or TrainConfig()
    return replace(
        TrainConfig(),
        model=meta["model"],
        n_classes=meta["n_classes"],
        dataset=dataset_name,
        data_root=args.data_root or saved.get("data_root") or TrainConfig().data_root,
        val_list=getattr(args, "val_list", None),
        label_map=args.label_map or saved.get("label_map"),
        ignore_index=int(meta.get("ignore_index", 255)),
        # the normalisation the model was trained with; a bare state dict: its dataset's
        mean=tuple(meta.get("mean", data_defaults.mean)),
        std=tuple(meta.get("std", data_defaults.std)),
        num_workers=args.num_workers,
    )


def _run(args, dist_info: distributed.DistInfo, model_name: str | None) -> dict[str, Any]:
    model, meta = load_model(args.ckpt, dist_info.device, model_name)
    # BatchNorm folded, no auxiliary heads: the eval-mode model's outputs, faster
    model = build_runtime(args.runtime, model, dist_info.device,
                          "auto" if args.runtime == "auto" else "fp32",
                          int8_model=int8_model_for(args.ckpt))
    cfg = data_config(args, meta)
    _, options, other_dataset = dataset_and_protocol(
        args, meta.get("config") or {}, implied=meta.get("dataset"), model=meta["model"])
    spec = DATASETS.get(cfg.dataset)
    if dist_info.is_main:
        prepare_dataset(cfg)
    distributed.barrier()
    info = dataset_info(cfg, meta.get("class_names"))
    dataset = build_dataset(cfg, args.split, train=False)
    if dist_info.is_main:
        logger.info("%s (%d classes) from %s on %d %s images; %s; runtime %s", meta["model"],
                    meta["n_classes"], meta["file"], len(dataset), args.split,
                    options.describe(), args.runtime)
    writer = None
    if args.save_pred:
        palette = info.palette if other_dataset else meta.get("palette", info.palette)
        palette = np.asarray(palette, np.uint8)
        writer = PredictionWriter(args.save_pred,
                                  label_to_id=spec.train_to_raw() if spec else None,
                                  palette=palette if args.save_colour else None,
                                  ignore_index=cfg.ignore_index)
    results = evaluate(model, dataset, cfg.n_classes, options, device=dist_info.device,
                       ignore_index=cfg.ignore_index, writer=writer,
                       progress=dist_info.is_main and interactive())
    summary: dict[str, Any] = {}
    labelled = any(int(conf.sum()) > 0 for conf in results.values())
    if dist_info.is_main:
        if labelled:
            print(format_iou_table(results, info.class_names))
            summary = {mode: iou_from_confusion(conf)[1] for mode, conf in results.items()}
        else:
            logger.info("split %s has no labels: predictions only", args.split)
        if args.save_pred:
            logger.info("predictions written to %s", Path(args.save_pred).resolve())
    return summary
