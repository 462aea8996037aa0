"""The quickstart (short) recipe against a plain training loop, at equal time, on toy sets
the recipe was not tuned on.

For each toy set (generated with ``lib.data.toy_cityscapes``'s variant options: colour partly
informative, other sizes, seeds, object densities and textures):

* **ours**: ``bisenetv2/train.py --quickstart`` with ``--data-root`` set to the toy (plus any
  ``--ours`` overrides), run as a subprocess; its training wall time is read from its log (first
  line to the saved final model: label check, model construction, data loading and all
  iterations);
* **plain**: a training loop written here without the repository's trainer, data pipeline,
  optimizer groups or scheduler: BiSeNetV2, SGD (lr 5e-2, momentum 0.9, weight decay 5e-4 on every
  parameter), linear warm-up from 0 over 50 iterations then poly (power 0.9), OHEM on all five
  outputs, batches of 8 crops of 128x256 after a random scale in (0.5, 1.5) and a horizontal flip,
  no colour jitter, no DataLoader workers. It gets the same wall time as ours' training (setup
  included): it cannot know its iteration count in advance, so its poly decay runs on the fraction
  of that time used, and it stops when the time is up (to within half an iteration).

Both are then evaluated the same way (``lib.evaluation.evaluator``, single scale, the same val
images) and a
table is printed: toy set | colour-only baseline | ours mIoU | plain mIoU | wall time and
iterations of each | load average at the start of each.

The CPU may be shared, so wall time is noisy: the runs are interleaved (ours, plain, ours, plain,
...), the 1-minute load average is printed at the start of each run and reported in the table,
and each result is appended to ``<work-dir>/results.jsonl`` as soon as it is known. On a machine
busy with other work, ``--budget cpu`` gives plain the CPU seconds that ours' processes used
(the trainer, its data workers, start-up included) instead of its wall time.

    python tools/short_recipe_study.py                             # the three default sets
    python tools/short_recipe_study.py --sets wide --ours "--lr 0.05 --jitter 0"

Comparing several candidate recipes: the plain loop does not depend on ours' options, only on
the time it is given, so ``--reuse-plain`` takes a plain result already in ``results.jsonl`` for
the same toy set and budget kind when its time is within 3% of the new ours' time (the table
marks it), and runs plain again otherwise. ``--seed N`` repeats a comparison with another
training seed of both (the toy sets stay the same), since one run on 16-24 validation images is
noisy.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import torch

from bisenetv2.model import BiSeNetV2
from lib.data.config import DataConfig
from lib.data.dataset import build_dataset
from lib.data.datasets.cityscapes import LABEL_ID_TO_TRAIN_ID, MEAN, STD, find_cityscapes_pairs
from lib.data.toy_cityscapes import colour_baseline_miou, generate_toy_cityscapes
from lib.evaluation.evaluator import EvalOptions, evaluate
from lib.evaluation.metrics import iou_from_confusion
from lib.models.checkpoint import load_checkpoint
from lib.training.loss import OhemCrossEntropy

REPO = Path(__file__).resolve().parents[1]

# Toy sets the quickstart recipe was not tuned on (it was tuned on the default toy: 150 / 30
# images of 128x256, seed 0, shared palette). Keyword arguments of generate_toy_cityscapes.
STUDY_SETS: dict[str, dict] = {
    # the shape: few large images, colour partly informative
    "wide": dict(n_train=64, n_val=16, height=256, width=512, seed=101, class_colour_prob=0.5),
    # the quickstart's size, another seed, crowded scenes with faint textures
    "crowded": dict(n_train=120, n_val=24, height=128, width=256, seed=202,
                    class_colour_prob=0.3, object_density=1.8, texture_strength=0.6),
    # another size, colour mostly informative, sparse scenes with strong textures
    "sparse": dict(n_train=80, n_val=16, height=192, width=384, seed=303,
                   class_colour_prob=0.8, object_density=0.6, texture_strength=1.4),
}

N_CLASSES, IGNORE = 19, 255


def load_average() -> float:
    return os.getloadavg()[0]


def log_seconds(log_file: Path) -> float:
    """Seconds from the first line of a training log to the line saving the final model."""
    stamps = []
    for line in log_file.read_text().splitlines():
        match = re.match(r"(\d\d):(\d\d):(\d\d) ", line)
        if match and (not stamps or "model_final.pth" in line):
            h, m, s = (int(v) for v in match.groups())
            stamps.append(3600 * h + 60 * m + s)
    if len(stamps) < 2:
        raise RuntimeError(f"{log_file}: no final model saved")
    return float((stamps[-1] - stamps[0]) % 86400)  # across midnight too


def run_ours(root: Path, out_dir: Path, extra: list[str]) -> dict:
    """Our quickstart recipe through our trainer, as a user runs it; evaluation done outside."""
    command = [sys.executable, "bisenetv2/train.py", "--quickstart", "--data-root", str(root),
               "--output-dir", str(out_dir), "--no-eval-at-end", *extra]
    tic = time.perf_counter()
    cpu_before = _children_cpu_seconds()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - tic
    cpu = _children_cpu_seconds() - cpu_before
    checkpoint = load_checkpoint(out_dir / "model_final.pth")
    model = BiSeNetV2(n_classes=N_CLASSES)
    model.load_state_dict(checkpoint["state_dict"])
    return {"model": model, "seconds": log_seconds(out_dir / "train.log"),
            "process_seconds": total, "cpu_seconds": cpu,
            "iterations": int(checkpoint["iteration"]),
            "command": shlex.join(command[1:])}


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process (and their own children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    label = LABEL_ID_TO_TRAIN_ID[cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)]
    return image, label


def _plain_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  crop: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Random scale in (0.5, 1.5), pad (0 / ignore) to the crop if smaller, random crop, flip."""
    scale = rng.uniform(0.5, 1.5)
    height, width = (max(1, round(n * scale)) for n in image.shape[:2])
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    if pad_h or pad_w:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=0)
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=IGNORE)
    top = rng.integers(0, image.shape[0] - crop[0] + 1)
    left = rng.integers(0, image.shape[1] - crop[1] + 1)
    image = image[top:top + crop[0], left:left + crop[1]]
    label = label[top:top + crop[0], left:left + crop[1]]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def run_plain(root: Path, budget: float, seed: int = 0, lr: float = 5e-2, batch: int = 8,
              crop: tuple[int, int] = (128, 256), warmup: int = 50,
              clock=time.perf_counter) -> dict:
    """The plain loop, stopped when ``budget`` seconds of ``clock`` (setup included) have passed.

    ``clock`` is wall time (``time.perf_counter``) or this process's CPU time
    (``time.process_time``, every thread), the fair budget on a machine shared with other work.
    """
    tic = clock()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    samples = [_read_pair(i, lab) for i, lab in find_cityscapes_pairs(root, "train")]
    mean = np.asarray(MEAN, np.float32) * 255
    std = np.asarray(STD, np.float32) * 255
    model = BiSeNetV2(n_classes=N_CLASSES)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    criterion = OhemCrossEntropy(thresh=0.7, ignore_index=IGNORE)
    order: list[int] = []
    it = 0
    train_start = clock()
    while True:
        now = clock()
        # stop where the next iteration would end further past the budget than we are short of it
        per_iteration = (now - train_start) / it if it else 0.0
        if now - tic + 0.5 * per_iteration >= budget:
            break
        # poly on the fraction of the remaining time used (the iteration count is unknown)
        progress = (now - train_start) / max(budget - (train_start - tic), 1e-6)
        factor = (it + 1) / warmup if it < warmup else (1 - min(progress, 1.0)) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        images, labels = [], []
        for _ in range(batch):
            if not order:
                order = list(rng.permutation(len(samples)))
            image, label = _plain_sample(*samples[order.pop()], rng, crop)
            images.append((image.astype(np.float32) - mean) / std)
            labels.append(label.astype(np.int64))
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(np.stack(labels))
        loss = sum(criterion(out, y) for out in model(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        it += 1
    return {"model": model, "seconds": clock() - tic, "iterations": it}


def evaluate_miou(model: torch.nn.Module, root: Path) -> float:
    """Single-scale mIoU on the val split, through the repository's evaluator."""
    val_set = build_dataset(DataConfig(data_root=str(root)), "val")
    model.eval()
    conf = evaluate(model, val_set, N_CLASSES, EvalOptions(modes=("ss",)), device="cpu",
                    progress=False, num_workers=0)["ss"]
    return float(iou_from_confusion(conf)[1])


def reusable_plain(results: Path, generator: dict, budget: str, seconds: float,
                   tolerance: float = 0.03, seed: int = 0) -> dict | None:
    """The newest plain result of ``results`` for this toy set, budget kind and training seed
    whose time is within ``tolerance`` (relative) of ``seconds``, or None."""
    if not results.is_file():
        return None
    key = "cpu_seconds" if budget == "cpu" else "seconds"
    found = None
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if (row["generator"] == generator and row["budget"] == budget
                and row.get("seed", 0) == seed
                and abs(row["plain"][key] - seconds) <= tolerance * seconds):
            found = row["plain"]
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(STUDY_SETS), choices=list(STUDY_SETS))
    parser.add_argument("--ours", default="", help="extra options on top of --quickstart")
    parser.add_argument("--work-dir", default="res/short_recipe_study")
    parser.add_argument("--tag", default="", help="label of this run in results.jsonl")
    parser.add_argument("--budget", choices=("wall", "cpu"), default="wall",
                        help="what 'equal time' means: wall-clock seconds (a quiet machine), or "
                             "CPU seconds of each run's processes (a machine shared with other "
                             "work, where wall time says little)")
    parser.add_argument("--generator", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override generate_toy_cityscapes arguments of every set, e.g. "
                             "n_train=4 n_val=2 height=64 width=128 (a quick check of the script)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of both ours (--seed) and plain (data order, "
                             "augmentation, initialisation); the toy sets stay the same")
    parser.add_argument("--reuse-plain", action="store_true",
                        help="take plain's result from results.jsonl when one of the same "
                             "set, seed and budget kind had a time within 3%% of ours'")
    args = parser.parse_args(argv)
    overrides = {key: (float(value) if "." in value else int(value))
                 for key, value in (item.split("=", 1) for item in args.generator)}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.ours) + (["--seed", str(args.seed)] if args.seed else [])
    budget_key = "cpu_seconds" if args.budget == "cpu" else "seconds"
    rows = []
    for name in args.sets:
        generator = {**STUDY_SETS[name], **overrides}
        root = work / "data" / (name + "".join(f"_{k}{v}" for k, v in overrides.items()))
        if not (root / "leftImg8bit").is_dir():
            generate_toy_cityscapes(root, **generator)
        colour_miou = colour_baseline_miou(root)[0]
        out_dir = work / "ours" / (name + (f"_{args.tag}" if args.tag else "")
                                   + (f"_seed{args.seed}" if args.seed else ""))
        load_ours = load_average()
        print(f"{datetime.now():%H:%M:%S} {name}: ours starts, load {load_ours:.2f}", flush=True)
        ours = run_ours(root, out_dir, extra)
        ours["miou"] = evaluate_miou(ours.pop("model"), root)
        load_plain = load_average()
        print(f"{datetime.now():%H:%M:%S} {name}: ours {100 * ours['miou']:.1f}% in "
              f"{ours[budget_key]:.0f} s ({ours['iterations']} it); plain starts with the same "
              f"budget, load {load_plain:.2f}", flush=True)
        reused = (reusable_plain(work / "results.jsonl", generator, args.budget,
                                 ours[budget_key], seed=args.seed)
                   if args.reuse_plain else None)
        if reused is not None:
            plain = {**reused, "reused": True}
        elif args.budget == "cpu":
            plain = run_plain(root, ours["cpu_seconds"], seed=args.seed, clock=time.process_time)
            plain["cpu_seconds"] = plain["seconds"]
        else:
            plain = run_plain(root, ours["seconds"], seed=args.seed)
        if "model" in plain:
            plain["miou"] = evaluate_miou(plain.pop("model"), root)
        mark = " (reused)" if reused else ""
        print(f"{datetime.now():%H:%M:%S} {name}: plain{mark} {100 * plain['miou']:.1f}% in "
              f"{plain[budget_key]:.0f} s ({plain['iterations']} it)", flush=True)
        row = {"set": name, "budget": args.budget, "generator": generator, "seed": args.seed,
               "colour_baseline": colour_miou,
               "ours_options": args.ours, "tag": args.tag, "ours": ours, "plain": plain,
               "load_ours": load_ours, "load_plain": load_plain}
        with open(work / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)

    print(f"\nours: --quickstart {args.ours}".rstrip()
          + f"; training seed {args.seed}; equal {args.budget} time")
    print("| toy set | colour-only | ours mIoU | plain mIoU | ours time / iterations "
          "| plain time / iterations | load at start (ours, plain) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        o, p = r["ours"], r["plain"]
        mark = " (reused)" if p.get("reused") else ""
        print(f"| {r['set']} | {100 * r['colour_baseline']:.1f}% | {100 * o['miou']:.1f}% "
              f"| {100 * p['miou']:.1f}% | {o[budget_key]:.0f} s / {o['iterations']} "
              f"| {p[budget_key]:.0f} s / {p['iterations']}{mark} "
              f"| {r['load_ours']:.2f}, {r['load_plain']:.2f} |")


if __name__ == "__main__":
    main()
