"""Run a BiSeNet checkpoint on an image, a folder of images, or a video, and colourise the result.

    python demo.py --ckpt res/model_final.pth --img_path ./pic.jpg        # the seed's command
    python demo.py --ckpt res/model_final.pth --img-path photos/ --output res/demo/
    python demo.py --ckpt res/model_final.pth --video drive.mp4 --layout overlay
    python demo.py --ckpt bisenetv2-ade20k --img-path room.jpg   # published weights by name

Images are written as ``<output>/<name>.png`` with the input and its segmentation side by side
(``--layout side``, default) or blended (``--layout overlay``); a video is written back as an mp4.
The model, class count, class names and colours and normalisation come from the checkpoint (its
dataset's: Cityscapes, COCO-Stuff, ADE20K, CamVid or custom data); a bare published state dict
works too (``--model`` if its keys are ambiguous, ``--dataset`` for its names and colours). Each
image's largest classes are printed by name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from lib.checkpoint import CheckpointError, load_model
from lib.data import IMAGE_EXTENSIONS
from lib.datasets import DATASETS
from lib.datasets.cityscapes import MEAN, STD
from lib.distributed import select_device
from lib.inference import normalise
from lib.models import MODEL_NAMES
from lib.published import NAMES_HELP
from lib.runs import default_checkpoint
from lib.runtimes import RUNTIME_NAMES, RuntimeUnavailable, build_runtime, int8_model_for
from lib.visualize import colourise, make_palette


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--weight-path", default=None,
                        help=f"checkpoint, {NAMES_HELP} (default: res/model_final.pth if it "
                             "exists, else the newest trained run's model_final.pth)")
    parser.add_argument("--img_path", "--img-path", default=None,
                        help="an image file or a folder of images")
    parser.add_argument("--video", default=None, help="a video file")
    parser.add_argument("--output", default="res/demo", help="output folder (or .mp4 for video)")
    parser.add_argument("--layout", choices=["side", "overlay", "mask"], default="side",
                        help="input and segmentation side by side, blended, or the mask alone")
    parser.add_argument("--model", choices=MODEL_NAMES, default=None)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="class names, colours and mean/std of this dataset (default: the "
                             "checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--fp16", action="store_true",
                        help="force reduced precision: fp16 on CUDA, bf16 on the CPU (default "
                             "with --runtime auto: the precision is chosen by measurement)")
    parser.add_argument("--runtime", choices=RUNTIME_NAMES, default="auto",
                        help="auto: the fastest installed runtime and precision, measured on the "
                             "first image of each size, kept only if its arg-max agrees with "
                             "fp32 on >= 99.5%% of the pixels (default); torch: PyTorch eager; "
                             "torch-compile: torch.compile")
    return parser


class Segmenter:
    """Checkpoint -> callable mapping an RGB uint8 image to its class map and colour picture."""

    def __init__(self, ckpt: str, device: torch.device, model_name: str | None = None,
                 reduced_precision: bool = False, dataset: str | None = None,
                 runtime: str = "auto") -> None:
        model, meta = load_model(ckpt, device, model_name)
        precision = ("fp16" if device.type == "cuda" else "bf16") if reduced_precision else (
            "auto" if runtime == "auto" else "fp32")
        self.model = build_runtime(runtime, model, device, precision,
                                   int8_model=int8_model_for(ckpt))
        n_classes = meta["n_classes"]
        # names and colours: the dataset asked for, else those the checkpoint records, else its
        # dataset's; a bare state dict gets Cityscapes' for 19 classes, generated ones otherwise
        spec = DATASETS.get(dataset or (meta.get("config") or {}).get("dataset"))
        if spec is not None and spec.n_classes != n_classes:
            raise CheckpointError(f"{ckpt} has {n_classes} classes, {spec.name} "
                                  f"{spec.n_classes}")
        if dataset is not None:
            meta = {key: value for key, value in meta.items()
                    if key not in ("class_names", "palette", "mean", "std")}
        self.mean = meta.get("mean", spec.mean if spec else MEAN)
        self.std = meta.get("std", spec.std if spec else STD)
        palette = meta.get("palette", spec.palette if spec else make_palette(n_classes))
        self.palette = np.asarray(palette, np.uint8)
        self.class_names = tuple(meta.get("class_names") or (
            spec.class_names if spec else [f"class {i}" for i in range(n_classes)]))

    def describe(self, labels: np.ndarray, top: int = 5) -> str:
        """The ``top`` largest classes of a class map by name, with their share of the pixels."""
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        order = np.argsort(-counts, kind="stable")[:top]
        return ", ".join(f"{self.class_names[i]} {100 * counts[i] / labels.size:.1f}%"
                         for i in order if counts[i])

    def __call__(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = self.model(normalise(image_rgb, self.mean, self.std))
        labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        return labels, colourise(labels, self.palette)


def compose(image_rgb: np.ndarray, colour: np.ndarray, layout: str) -> np.ndarray:
    if layout == "side":
        return np.concatenate([image_rgb, colour], axis=1)
    if layout == "overlay":
        return cv2.addWeighted(image_rgb, 0.5, colour, 0.5, 0.0)
    return colour


def _list_images(path: Path) -> list[Path]:
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        return images
    if not path.is_file():
        raise SystemExit(f"error: image not found: {path}")
    return [path]


def run_images(segment: Segmenter, source: Path, output: Path, layout: str) -> list[Path]:
    images = _list_images(source)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(images, desc="images", disable=len(images) < 2):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"error: cannot read image {path} (corrupt or not an image)")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        labels, colour = segment(image)
        print(f"{path.name}: {segment.describe(labels)}")
        chosen = getattr(segment.model, "chosen", {})
        if chosen and path == images[0]:
            print(f"runtime auto chose {', '.join(dict.fromkeys(chosen.values()))}")
        target = output / f"{path.stem}.png"
        cv2.imwrite(str(target), cv2.cvtColor(compose(image, colour, layout), cv2.COLOR_RGB2BGR))
        written.append(target)
    return written


def run_video(segment: Segmenter, source: Path, output: Path, layout: str) -> Path:
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise SystemExit(f"error: cannot open video {source}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = output if output.suffix.lower() in (".mp4", ".avi") else output / f"{source.stem}.mp4"
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    with tqdm(total=frames, desc="frames") as bar:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            frame = cv2.cvtColor(compose(image, segment(image)[1], layout), cv2.COLOR_RGB2BGR)
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*("mp4v" if target.suffix == ".mp4" else "MJPG"))
                writer = cv2.VideoWriter(str(target), fourcc, fps, frame.shape[1::-1])
            writer.write(frame)
            bar.update()
    capture.release()
    if writer is None:
        raise SystemExit(f"error: no frame could be read from {source}")
    writer.release()
    return target


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if (args.img_path is None) == (args.video is None):
        raise SystemExit("error: give one of --img_path (image or folder) or --video")
    device = select_device(args.device)
    if args.ckpt is None:
        args.ckpt = str(default_checkpoint("res/model_final.pth", "res"))
    try:
        segment = Segmenter(args.ckpt, device, args.model, args.fp16, args.dataset, args.runtime)
    except (CheckpointError, RuntimeUnavailable) as exc:
        raise SystemExit(f"error: {exc}") from None
    output = Path(args.output)
    if args.video:
        written = [run_video(segment, Path(args.video), output, args.layout)]
    else:
        written = run_images(segment, Path(args.img_path), output, args.layout)
    for path in written[:5]:
        print(f"wrote {path}")
    if len(written) > 5:
        print(f"... and {len(written) - 5} more in {output}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
