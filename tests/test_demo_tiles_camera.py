"""demo.py on images larger than the training crops (--tile: the prediction of evaluate.py's ssc,
and of mscf at scale 1 with --flip, pixel for pixel) and on a capture device (--camera, a real
video file standing in for the device: every frame segmented, an FPS counter drawn)."""

import cv2
import numpy as np
import pytest
import torch

import demo
from lib.data.palette import make_palette
from lib.deployment.examples import normalise
from lib.evaluation.command import main as evaluate_main
from lib.models.checkpoint import save_checkpoint
from lib.models.zoo import build_model

N_CLASSES = 4
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("bisenetv2", N_CLASSES, aux_heads=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    save_checkpoint(path, {"model": "bisenetv2", "n_classes": N_CLASSES,
                           "state_dict": model.state_dict(), "mean": MEAN, "std": STD})
    return path, model


def _class_ids(mask_bgr: np.ndarray) -> np.ndarray:
    """Class ids of a ``--layout mask`` picture, read back through the palette."""
    palette = make_palette(N_CLASSES)
    rgb = mask_bgr[..., ::-1]
    matches = (rgb[:, :, None, :] == palette[None, None]).all(-1)
    assert (matches.sum(-1) == 1).all(), "a pixel of the mask is no palette colour"
    return matches.argmax(-1)


@pytest.mark.parametrize("flip", [False, True])
def test_tiled_prediction_equals_evaluate_crop_mode(ckpt, tmp_path, flip):
    path, model = ckpt
    root = tmp_path / "data"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    # smooth content at 4x lower resolution: the whole-image and tiled predictions differ
    image = cv2.resize(rng.integers(0, 256, (25, 38, 3), np.uint8), (150, 100))
    cv2.imwrite(str(root / "images" / "val" / "big.png"), image)
    cv2.imwrite(str(root / "labels" / "val" / "big.png"),
                rng.integers(0, N_CLASSES, (100, 150), np.uint8))

    crop = ["--crop-size", "48", "64", "--crop-stride", "0.5"]
    mode = ["--mode", "mscf", "--scales", "1", "--flip"] if flip else ["--mode", "ssc"]
    evaluate_main(["--ckpt", str(path), "--dataset", "folders", "--data-root", str(root),
                   "--device", "cpu", "--num-workers", "0", "--save-pred",
                   str(tmp_path / "pred"), *mode, *crop])
    expected = cv2.imread(str(tmp_path / "pred" / "val" / "big.png"), cv2.IMREAD_UNCHANGED)

    written = demo.main(["--ckpt", str(path), "--img-path", str(root / "images" / "val" /
                                                                   "big.png"),
                         "--output", str(tmp_path / "demo"), "--layout", "mask", "--tile", "48",
                         "64", "--overlap", "0.5", "--runtime", "torch", "--device", "cpu",
                         *(["--flip"] if flip else [])])
    tiled = _class_ids(cv2.imread(str(written[0])))
    assert tiled.shape == expected.shape == (100, 150)
    assert (tiled == expected).all()

    # the tiles matter: the whole image at once predicts other classes on part of the pixels
    with torch.inference_mode():
        whole = model(normalise(image[..., ::-1].copy(), MEAN, STD)).argmax(1)[0].numpy()
    assert (whole != expected).mean() > 0.01


def test_bad_overlap_is_refused_naming_it(ckpt, tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match=r"--overlap 1.0: the tile overlap must be in \[0, 1\)"):
        demo.main(["--ckpt", str(ckpt[0]), "--img-path", str(tmp_path / "a.png"), "--tile", "4",
                   "4", "--overlap", "1", "--device", "cpu"])


def _frames(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def test_camera_stream_is_segmented_with_an_fps_counter(ckpt, tmp_path):
    """A video file stands in for the device; the same file through --video (no counter) is the
    reference for everything outside the counter's box."""
    source = tmp_path / "device.mp4"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 96))
    gradient = np.linspace(150, 230, 160, dtype=np.uint8)[None, :, None]
    for i in range(7):
        writer.write(np.broadcast_to(gradient, (96, 160, 3)) - np.uint8(5 * i))
    writer.release()

    common = ["--ckpt", str(ckpt[0]), "--runtime", "torch", "--device", "cpu"]
    camera = demo.main([*common, "--camera", str(source), "--output", str(tmp_path / "cam.mp4")])
    plain = demo.main([*common, "--video", str(source), "--output", str(tmp_path / "plain.mp4")])
    assert camera == [tmp_path / "cam.mp4"]
    shown, reference = _frames(camera[0]), _frames(plain[0])
    assert len(shown) == len(reference) == 7
    assert all(frame.shape == (96, 320, 3) for frame in shown)  # input | segmentation

    box = (slice(0, 20), slice(0, 60))  # inside the counter's box, whatever the digits
    for i, (got, want) in enumerate(zip(shown, reference, strict=True)):
        outside = got.astype(int)[30:] - want.astype(int)[30:]
        assert np.abs(outside).mean() < 3, f"frame {i}: not the segmented frame"
        dark = (got[box] < 60).all(-1).mean()
        white = (got[box] > 190).all(-1).mean()
        assert dark > 0.4 and white > 0.03, f"frame {i}: no FPS counter ({dark=}, {white=})"
        assert (want[box] < 60).all(-1).mean() < 0.05  # the video frames have no such box
