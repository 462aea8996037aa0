"""The command line of every ``evaluate.py``: load a checkpoint, run the evaluator, print the table.

    python evaluate.py                                   # res/model_final.pth, single scale
    python evaluate.py --ckpt res/bisenetv2/model_final.pth --mode ss ssc msf mscf
    torchrun --nproc_per_node=2 evaluate.py --ckpt ... --mode msf
    python evaluate.py --ckpt ... --split test --save-pred res/test_pred   # server submission
    python evaluate.py --ckpt bisenetv2-city         # published weights by name (hub cache)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.common import distributed
from lib.common.log import interactive, setup_logging
from lib.data.config import DataConfig, dataset_defaults
from lib.data.dataset import build_dataset, dataset_info, prepare_dataset
from lib.data.datasets import DATASETS
from lib.deployment.runtimes import (
    RUNTIME_NAMES,
    RuntimeUnavailable,
    build_runtime,
    int8_model_for,
)
from lib.evaluation.evaluator import MODES, EvalOptions, PredictionWriter, evaluate
from lib.evaluation.metrics import SegmentationMetrics, format_iou_table, segmentation_metrics
from lib.models.checkpoint import CheckpointError, default_checkpoint, load_model
from lib.models.published import NAMES_HELP
from lib.models.zoo import model_names, variant

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
        parser.add_argument("--model", choices=model_names(), default=None,
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
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the scores of each mode to FILE: mIoU, frequency-"
                             "weighted IoU, pixel accuracy, macro and micro F1, per-class IoU "
                             "and F1")
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


@dataclass(frozen=True)
class EvaluationData:
    """What to evaluate on and how: the data options, the protocol, and whether the dataset is
    another than the checkpoint's (its own names and colours are then used)."""

    data: DataConfig
    protocol: Mapping[str, Any]  # the eval_* values of the dataset's (or checkpoint's) protocol
    other_dataset: bool

    def options(self, args: argparse.Namespace) -> EvalOptions:
        """The protocol, the options given on the command line (``add_protocol_arguments``)
        winning."""
        return protocol_options(args, self.protocol)


def decide_dataset(args: argparse.Namespace, meta: Mapping[str, Any]) -> EvaluationData:
    """The one place that decides the evaluation's dataset and protocol, from the command line
    and a checkpoint's metadata (``meta``; a bare state dict has no saved config).

    The dataset is ``--dataset``, else the checkpoint's, else the one a bare state dict's class
    count implies; a class count that names no single dataset asks for ``--dataset``. Another
    dataset than the checkpoint's brings its own protocol (for BiSeNetV1, the smaller crops its
    published weights used on ADE20K and COCO-Stuff); the options given on the command line win.
    The data options (root, lists, label map) come from the command line or the checkpoint;
    classes, ignore index and normalisation from the checkpoint (a bare state dict: its
    dataset's).
    """
    saved = meta.get("config") or {}
    name = args.dataset or saved.get("dataset") or meta.get("dataset")
    if not name:
        raise ValueError(f"{meta.get('file', 'the checkpoint')} has {meta.get('n_classes')} "
                         "classes, which does not tell its dataset: pass --dataset "
                         f"({', '.join(DATASETS)}, list or folders)")
    other_dataset = name != saved.get("dataset")
    model = meta.get("model")
    protocol = saved
    if other_dataset:
        own = variant(model).eval_protocol.get(name, {}) if model else {}
        protocol = {**saved, **dataset_defaults(name), **own}
    defaults = DATASETS.get(name) or DataConfig()
    n_classes = meta.get("n_classes") or dataset_defaults(name).get("n_classes")
    data = DataConfig(
        dataset=name,
        data_root=getattr(args, "data_root", None) or saved.get("data_root") or "data",
        val_list=getattr(args, "val_list", None),
        label_map=getattr(args, "label_map", None) or saved.get("label_map"),
        n_classes=int(n_classes or DataConfig().n_classes),
        ignore_index=int(meta.get("ignore_index", 255)),
        # the normalisation the model was trained with; a bare state dict: its dataset's
        mean=tuple(meta.get("mean", defaults.mean)),
        std=tuple(meta.get("std", defaults.std)),
    )
    return EvaluationData(data, protocol, other_dataset)


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


def _run(args, dist_info: distributed.DistInfo, model_name: str | None) -> dict[str, Any]:
    model, meta = load_model(args.ckpt, dist_info.device, model_name)
    # BatchNorm folded, no auxiliary heads: the eval-mode model's outputs, faster
    model = build_runtime(args.runtime, model, dist_info.device,
                          "auto" if args.runtime == "auto" else "fp32",
                          int8_model=int8_model_for(args.ckpt))
    decided = decide_dataset(args, meta)
    cfg, options = decided.data, decided.options(args)
    spec = DATASETS.get(cfg.dataset)
    if dist_info.is_main:
        prepare_dataset(cfg)
    distributed.barrier()
    info = dataset_info(cfg, meta.get("class_names"))
    dataset = build_dataset(cfg, args.split)
    if dist_info.is_main:
        logger.info("%s (%d classes) from %s on %d %s images; %s; runtime %s", meta["model"],
                    meta["n_classes"], meta["file"], len(dataset), args.split,
                    options.describe(), args.runtime)
    writer = None
    if args.save_pred:
        palette = info.palette if decided.other_dataset else meta.get("palette", info.palette)
        palette = np.asarray(palette, np.uint8)
        writer = PredictionWriter(args.save_pred,
                                  label_to_id=spec.train_to_raw() if spec else None,
                                  palette=palette if args.save_colour else None,
                                  ignore_index=cfg.ignore_index)
    results = evaluate(model, dataset, cfg.n_classes, options, device=dist_info.device,
                       ignore_index=cfg.ignore_index, writer=writer, num_workers=args.num_workers,
                       progress=dist_info.is_main and interactive())
    summary: dict[str, Any] = {}
    labelled = any(int(conf.sum()) > 0 for conf in results.values())
    if dist_info.is_main:
        if labelled:
            print(format_iou_table(results, info.class_names))
            metrics = {mode: segmentation_metrics(conf) for mode, conf in results.items()}
            summary = {mode: m.miou for mode, m in metrics.items()}
            if args.json:
                write_scores(args.json, metrics, info.class_names, meta["file"], args.split,
                             options)
        else:
            logger.info("split %s has no labels: predictions only", args.split)
        if args.save_pred:
            logger.info("predictions written to %s", Path(args.save_pred).resolve())
    return summary


def write_scores(path: str | Path, metrics: Mapping[str, SegmentationMetrics],
                 class_names: Sequence[str], checkpoint: str, split: str,
                 options: EvalOptions) -> Path:
    """The ``--json`` file: what was evaluated, and every score of each mode (fractions in
    [0, 1]; null for a class absent from both the labels and the predictions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "checkpoint": checkpoint, "split": split, "protocol": options.describe(),
        "modes": {mode: m.as_dict(class_names) for mode, m in metrics.items()},
    }, indent=1) + "\n")
    logger.info("scores written to %s", path)
    return path
