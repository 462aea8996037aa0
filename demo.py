"""Run a BiSeNet checkpoint on an image, a folder of images, or a video, and colourise the result.

    python demo.py --ckpt res/model_final.pth --img_path ./pic.jpg        # the seed's command
    python demo.py --ckpt res/model_final.pth --img-path photos/ --output res/demo/
    python demo.py --ckpt res/model_final.pth --video drive.mp4 --layout overlay
    python demo.py --ckpt bisenetv2-ade20k --img-path room.jpg   # published weights by name
    python demo.py --ckpt ... --img-path big.png --tile 1024 1024 --overlap 0.33 --flip
    python demo.py --ckpt ... --camera 0                         # webcam, with an FPS counter

Images are written as ``<output>/<name>.png`` with the input and its segmentation side by side
(``--layout side``, default) or blended (``--layout overlay``); a video is written back as an mp4.
``--tile H W`` predicts large images tile by tile with the evaluator's crop arithmetic (the
prediction of ``evaluate.py --mode ssc`` with that crop size and stride ``1 - overlap``).
``--camera`` shows a capture device's stream segmented in a window, or writes it to a video file
when there is no display or ``--output`` is given.
The model, class count, class names and colours and normalisation come from the checkpoint (its
dataset's: Cityscapes, COCO-Stuff, ADE20K, CamVid or custom data); a bare published state dict
works too (``--model`` if its keys are ambiguous, ``--dataset`` for its names and colours). Each
image's largest classes are printed by name.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from lib.common.distributed import select_device
from lib.common.visualize import colourise
from lib.data.dataset import IMAGE_EXTENSIONS
from lib.data.datasets import DATASETS
from lib.data.datasets.cityscapes import MEAN, STD
from lib.data.palette import make_palette
from lib.deployment.examples import normalise
from lib.deployment.runtimes import (
    RUNTIME_NAMES,
    RuntimeUnavailable,
    build_runtime,
    int8_model_for,
)
from lib.evaluation.evaluator import EvalOptions
from lib.evaluation.tiling import tiled_scores, tiling_options
from lib.models.checkpoint import CheckpointError, default_checkpoint, load_model
from lib.models.published import NAMES_HELP
from lib.models.zoo import model_names

DEFAULT_OUTPUT = "res/demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", "--weight-path", default=None,
                        help=f"checkpoint, {NAMES_HELP} (default: res/model_final.pth if it "
                             "exists, else the newest trained run's model_final.pth)")
    parser.add_argument("--img_path", "--img-path", default=None,
                        help="an image file or a folder of images")
    parser.add_argument("--video", default=None, help="a video file")
    parser.add_argument("--camera", default=None, metavar="N",
                        help="a capture device's index (0: the first webcam), or a video file "
                             "played as if it were one; shown with its FPS")
    parser.add_argument("--output", default=None,
                        help="output folder, or an .mp4/.avi file for a video or camera "
                             "(default: res/demo; a camera: a window if there is a display)")
    parser.add_argument("--tile", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="sliding-window inference with tiles of this size, for images "
                             "larger than the training crops (evaluate.py's ssc arithmetic)")
    parser.add_argument("--overlap", type=float, default=1 / 3,
                        help="with --tile: the fraction of a tile its neighbours share; the "
                             "stride is 1 - overlap (default: 1/3, evaluate.py's stride 2/3)")
    parser.add_argument("--flip", action="store_true",
                        help="with --tile: also predict each tile mirrored (as mscf does)")
    parser.add_argument("--layout", choices=["side", "overlay", "mask"], default="side",
                        help="input and segmentation side by side, blended, or the mask alone")
    parser.add_argument("--model", choices=model_names(), default=None)
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
                 runtime: str = "auto", tiling: EvalOptions | None = None) -> None:
        model, meta = load_model(ckpt, device, model_name)
        self.device, self.tiling = device, tiling  # see lib.evaluation.tiling.tiling_options
        precision = ("fp16" if device.type == "cuda" else "bf16") if reduced_precision else (
            "auto" if runtime == "auto" else "fp32")
        self.model = build_runtime(runtime, model, device, precision,
                                   int8_model=int8_model_for(ckpt))
        n_classes = self.n_classes = meta["n_classes"]
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
        image = normalise(image_rgb, self.mean, self.std)
        if self.tiling is None:
            logits = self.model(image)
        else:
            logits = tiled_scores(self.model, image.to(self.device), self.tiling, self.n_classes)
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


def _open_capture(source: str | int, what: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise SystemExit(f"error: cannot open {what} {source}")
    return capture


def _segmented_frames(segment: Segmenter, capture: cv2.VideoCapture, layout: str,
                      show_fps: bool = False) -> Iterator[np.ndarray]:
    """The capture's frames segmented and composed (BGR), with the FPS drawn if asked."""
    fps = FpsCounter()
    while True:
        ok, bgr = capture.read()
        if not ok:
            return
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        frame = cv2.cvtColor(compose(image, segment(image)[1], layout), cv2.COLOR_RGB2BGR)
        if show_fps:
            draw_fps(frame, fps.tick())
        yield frame


def _write_video(frames: Iterator[np.ndarray], target: Path, fps: float, total: int | None,
                 source: str | int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for frame in tqdm(frames, total=total, desc="frames"):
            if writer is None:
                fourcc = cv2.VideoWriter_fourcc(*("mp4v" if target.suffix == ".mp4" else "MJPG"))
                writer = cv2.VideoWriter(str(target), fourcc, fps, frame.shape[1::-1])
            writer.write(frame)
    except KeyboardInterrupt:  # a camera has no end: Ctrl-C closes the file properly
        pass
    if writer is None:
        raise SystemExit(f"error: no frame could be read from {source}")
    writer.release()
    return target


def _video_target(output: Path, stem: str) -> Path:
    return output if output.suffix.lower() in (".mp4", ".avi") else output / f"{stem}.mp4"


def run_video(segment: Segmenter, source: Path, output: Path, layout: str) -> Path:
    capture = _open_capture(str(source), "video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    try:
        return _write_video(_segmented_frames(segment, capture, layout),
                            _video_target(output, source.stem), fps, frames, source)
    finally:
        capture.release()


class FpsCounter:
    """Frames per second of the processing loop, over the last ``window`` frames."""

    def __init__(self, window: int = 30) -> None:
        self.times: list[float] = []
        self.window = window

    def tick(self) -> float:
        """Register a finished frame; the current rate (0 before the second frame)."""
        self.times = [*self.times[-self.window:], time.perf_counter()]
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def draw_fps(frame_bgr: np.ndarray, fps: float) -> None:
    """``FPS 12.3`` in white on a black box in the top-left corner, in place."""
    text = f"FPS {fps:.1f}"
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
    cv2.rectangle(frame_bgr, (0, 0), (width + 8, height + baseline + 8), (0, 0, 0), -1)
    cv2.putText(frame_bgr, text, (4, height + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                (255, 255, 255), 1, cv2.LINE_AA)


def has_display() -> bool:
    """Whether cv2.imshow can open a window: OpenCV built with a GUI, and a display to use."""
    gui = any(line.split(":")[0].strip() == "GUI" and "NONE" not in line
              for line in cv2.getBuildInformation().splitlines())
    return gui and (sys.platform != "linux" or bool(os.environ.get("DISPLAY")
                                                    or os.environ.get("WAYLAND_DISPLAY")))


def run_camera(segment: Segmenter, camera: str, output: Path | None, layout: str) -> Path | None:
    """Segment a capture device's stream (``camera``: its index, or a video file standing in
    for one) with an FPS counter: to a window (q or Esc closes it), or to ``output`` (a video
    file, or a folder for ``camera.mp4``) when given or when there is no display."""
    source: str | int = int(camera) if camera.isdigit() else camera
    capture = _open_capture(source, "camera")
    frames = _segmented_frames(segment, capture, layout, show_fps=True)
    try:
        if output is None and has_display():
            for frame in frames:
                cv2.imshow("BiSeNet", frame)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            cv2.destroyAllWindows()
            return None
        name = Path(camera).stem if isinstance(source, str) else f"camera{source}"
        target = _video_target(output or Path(DEFAULT_OUTPUT), name)
        return _write_video(frames, target, capture.get(cv2.CAP_PROP_FPS) or 25.0, None, source)
    finally:
        capture.release()


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if sum(source is not None for source in (args.img_path, args.video, args.camera)) != 1:
        raise SystemExit("error: give one of --img_path (image or folder), --video or --camera")
    device = select_device(args.device)
    if args.ckpt is None:
        args.ckpt = str(default_checkpoint("res/model_final.pth", "res"))
    try:
        tiling = (tiling_options(args.tile, args.overlap, args.flip) if args.tile is not None
                  else None)
    except ValueError as exc:
        raise SystemExit(f"error: --tile {' '.join(map(str, args.tile))} --overlap "
                         f"{args.overlap}: {exc}") from None
    try:
        segment = Segmenter(args.ckpt, device, args.model, args.fp16, args.dataset, args.runtime,
                            tiling)
    except (CheckpointError, RuntimeUnavailable) as exc:
        raise SystemExit(f"error: {exc}") from None
    output = Path(args.output or DEFAULT_OUTPUT)
    if args.camera is not None:
        shown = run_camera(segment, args.camera, output if args.output else None, args.layout)
        written = [] if shown is None else [shown]
    elif args.video:
        written = [run_video(segment, Path(args.video), output, args.layout)]
    else:
        written = run_images(segment, Path(args.img_path), output, args.layout)
    for path in written[:5]:
        print(f"wrote {path}")
    if len(written) > 5:
        print(f"... and {len(written) - 5} more in {output}")
    return written


if __name__ == "__main__":
    main()
