import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import demo
from lib.data.palette import make_palette
from lib.deployment.examples import normalise
from lib.models.checkpoint import save_checkpoint
from lib.models.zoo import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("bisenetv2", 4, aux_heads=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    save_checkpoint(path, {"model": "bisenetv2", "n_classes": 4, "state_dict": model.state_dict(),
                           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    return path, model


def _image(path, seed, shape=(70, 110)):
    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), np.uint8)
    cv2.imwrite(str(path), image)
    return image[..., ::-1]  # RGB


def test_image_colours_are_the_palette_of_the_prediction(ckpt, tmp_path):
    path, model = ckpt
    _image(tmp_path / "pic.jpg", 0)
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "pic.jpg")), cv2.COLOR_BGR2RGB)  # after JPEG
    written = demo.main(["--ckpt", str(path), "--img_path", str(tmp_path / "pic.jpg"),
                         "--output", str(tmp_path / "out"), "--device", "cpu"])
    out = cv2.cvtColor(cv2.imread(str(written[0])), cv2.COLOR_BGR2RGB)
    assert out.shape == (70, 220, 3)  # input and segmentation side by side
    with torch.inference_mode():
        pred = model(normalise(rgb, [0.5] * 3, [0.25] * 3)).argmax(1)[0].numpy()
    expected = make_palette(4)[pred]
    # auto may choose a reduced precision: only one agreeing with fp32 on >= 99.5% of the pixels
    assert (out[:, 110:] == expected).all(-1).mean() >= 0.995


def test_folder_of_images_and_seed_spelling(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(2):
        _image(tmp_path / "in" / f"{i}.png", i)
    proc = subprocess.run([sys.executable, "demo.py", "--ckpt", str(ckpt[0]), "--img-path",
                           str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--layout",
                           "overlay", "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("runtime auto chose ") == 1  # said once, after the first image
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0.png", "1.png"]
    assert cv2.imread(str(tmp_path / "o" / "0.png")).shape == (70, 110, 3)


def test_video_is_written_back_with_every_frame(ckpt, tmp_path):
    source = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for i in range(5):
        writer.write(np.full((64, 96, 3), 40 * i, np.uint8))
    writer.release()
    target = demo.main(["--ckpt", str(ckpt[0]), "--video", str(source), "--output",
                        str(tmp_path / "v"), "--device", "cpu"])[0]
    capture = cv2.VideoCapture(str(target))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 5
    assert int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 192


def test_clear_errors(ckpt, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="cannot read image .*bad.jpg"):
        demo.main(["--ckpt", str(ckpt[0]), "--img_path", str(bad), "--output", str(tmp_path)])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="other.pth is not a BiSeNet checkpoint"):
        demo.main(["--ckpt", str(tmp_path / "other.pth"), "--img_path", str(bad)])
