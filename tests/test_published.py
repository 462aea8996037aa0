"""Published weights by name (``--ckpt bisenetv2-coco``, ``--pretrained backbone_v2``), hubconf.py,
and published-format state dicts of 171 (COCO-Stuff) and 150 (ADE20K) classes.

No test touches the network: the files are made here in the published layout (checked against the
listings of ``tests/data``) and put into a temporary torch hub cache; downloads go to a closed
local port (refused at once) or to a local HTTP server.
"""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from test_models import expected_layout
from tools_loader import load_tool

import demo
import lib.evaluation.command as evaluate_cmd
from bisenetv1.model import BiSeNetV1
from bisenetv2.model import BiSeNetV2
from lib.data.datasets import DATASETS
from lib.models import pretrained
from lib.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_finetune_weights,
    load_model,
)
from lib.models.zoo import build_model

REPO = Path(__file__).resolve().parents[1]
# the normalisation of the published COCO-Stuff and ADE20K models (their training configs)
COCO_MEAN, COCO_STD = (0.46962251, 0.4464104, 0.40718787), (0.27469736, 0.27012361, 0.28515933)
ADE_MEAN, ADE_STD = (0.49343230, 0.46819794, 0.43106043), (0.25680755, 0.25506608, 0.27422913)
# name -> (file of the release, model class, classes, mean, std, first and last class name)
CASES = {
    "bisenetv2-coco": ("model_final_v2_coco.pth", BiSeNetV2, 171, COCO_MEAN, COCO_STD,
                       "person", "wood"),
    "bisenetv1-ade20k": ("model_final_v1_ade20k.pth", BiSeNetV1, 150, ADE_MEAN, ADE_STD,
                         "wall", "flag"),
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under a temporary TORCH_HOME; downloads go to a port nobody serves."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(pretrained, "RELEASE_URL", f"http://127.0.0.1:{closed_port()}/release/")
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def published_like(model_name: str, n_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A bare state dict in the published layout, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(model_name, n_classes, aux_heads=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    state = model.state_dict()
    # the published layout: every key and shape of the listing, the class dimension changed
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_layout(model_name, n_classes)
    return state


def direct_model(model_class, n_classes: int, file: Path) -> torch.nn.Module:
    """The independent path: the file's tensors in a directly built model, in float64."""
    model = model_class(n_classes=n_classes, aux_heads=True)
    model.load_state_dict(torch.load(file, weights_only=True))
    return model.double().eval()


def direct_logits(model: torch.nn.Module, image_path: Path, mean, std) -> torch.Tensor:
    rgb = cv2.imread(str(image_path))[..., ::-1] / 255.0
    x = (rgb - np.array(mean)) / np.array(std)
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])[0]


def clear_pixels(logits: torch.Tensor) -> np.ndarray:
    """Pixels whose two best logits are too far apart for float32 rounding to swap them."""
    top2 = logits.topk(2, dim=0).values
    return (top2[0] - top2[1] > 1e-4 * logits.abs().max()).numpy()


def write_folders_dataset(root: Path, n_classes: int, rng: np.random.Generator) -> list[Path]:
    """Two 64x96 images with labels of random classes (and some ignore) in the folders layout."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    images = []
    for name in ("a", "b"):
        image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        label = rng.integers(0, n_classes, (64, 96)).astype(np.uint8)
        label[:4] = 255
        cv2.imwrite(str(root / "images" / "val" / f"{name}.png"), image[..., ::-1])
        cv2.imwrite(str(root / "labels" / "val" / f"{name}.png"), label)
        images.append(root / "images" / "val" / f"{name}.png")
    return images


@pytest.mark.parametrize("name", list(CASES))
def test_named_weights_resolve_in_the_hub_cache_and_evaluate_like_a_direct_load(
        name, hub, tmp_path, capsys):
    file_name, model_class, n_classes, mean, std, first, last = CASES[name]
    state = published_like(model_class.model_name, n_classes)
    torch.save(state, hub / file_name)
    checkpoint = load_checkpoint(name)
    assert checkpoint["file"] == str(hub / file_name)

    images = write_folders_dataset(tmp_path / "data", n_classes, np.random.default_rng(0))
    summary = evaluate_cmd.main(["--ckpt", name, "--dataset", "folders", "--data-root",
                                 str(tmp_path / "data"), "--save-pred", str(tmp_path / "pred"),
                                 "--device", "cpu", "--num-workers", "0"])
    table = capsys.readouterr().out
    assert f"| {first} " in table and f"| {last} " in table  # the dataset's class names

    direct = direct_model(model_class, n_classes, hub / file_name)
    intersection, union = np.zeros(n_classes), np.zeros(n_classes)
    for image_path in images:
        logits = direct_logits(direct, image_path, mean, std)
        expected, clear = logits.argmax(0).numpy(), clear_pixels(logits)
        saved = cv2.imread(str(tmp_path / "pred" / "val" / image_path.name), cv2.IMREAD_UNCHANGED)
        assert clear.mean() > 0.99
        assert np.array_equal(saved[clear], expected[clear])
        label = cv2.imread(str(tmp_path / "data" / "labels" / "val" / image_path.name),
                           cv2.IMREAD_UNCHANGED)
        valid = label != 255
        for c in range(n_classes):
            in_pred, in_label = (saved == c) & valid, label == c
            intersection[c] += (in_pred & in_label).sum()
            union[c] += (in_pred | in_label).sum()
    miou = np.mean([i / u for i, u in zip(intersection, union, strict=True) if u > 0])
    # float64 ratios of the same integer counts (from the saved PNGs): any CPU
    assert summary["ss"] == pytest.approx(miou, abs=1e-12)


def test_bare_file_metadata_follows_the_class_count_and_unknown_counts_ask_for_dataset(
        tmp_path, capsys):
    torch.save(published_like("bisenetv2", 171), tmp_path / "coco.pth")
    _, meta = load_model(tmp_path / "coco.pth")
    assert meta["dataset"] == "coco-stuff"
    assert (meta["class_names"][0], meta["class_names"][-1], len(meta["class_names"])) == (
        "person", "wood", 171)
    np.testing.assert_allclose(meta["mean"], COCO_MEAN, rtol=0, atol=1e-8)
    np.testing.assert_allclose(meta["std"], COCO_STD, rtol=0, atol=1e-8)

    torch.save(build_model("bisenetv2", 7, aux_heads=False).state_dict(), tmp_path / "seven.pth")
    assert load_model(tmp_path / "seven.pth")[1]["dataset"] is None
    with pytest.raises(SystemExit):
        evaluate_cmd.main(["--ckpt", str(tmp_path / "seven.pth"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'seven.pth'} has 7 classes" in out and "pass --dataset" in out


def test_wrongly_shaped_or_wrong_model_files_in_the_cache_are_refused(hub):
    torch.save(published_like("bisenetv2", 19), hub / "model_final_v2_coco.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("bisenetv2-coco")
    message = str(info.value)
    assert str(hub / "model_final_v2_coco.pth") in message
    assert "head.conv_out.1.weight (19, 1024, 1, 1) (expected (171, 1024, 1, 1))" in message

    v1 = build_model("bisenetv1", 150, aux_heads=False).state_dict()
    torch.save(v1, hub / "model_final_v2_ade20k.pth")
    with pytest.raises(CheckpointError, match=r"model_final_v2_ade20k\.pth is not the published "
                                              r"bisenetv2-ade20k .*missing keys \[detail\."):
        load_checkpoint("bisenetv2-ade20k")

    # auxiliary heads: all or none (an inference-only copy), never some of them
    state = published_like("bisenetv2", 171)
    inference_only = {k: v for k, v in state.items() if not k.startswith("aux")}
    torch.save(inference_only, hub / "model_final_v2_coco.pth")
    assert load_model("bisenetv2-coco")[1]["n_classes"] == 171
    torch.save({k: v for k, v in state.items() if not k.startswith("aux3.")},
               hub / "model_final_v2_coco.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[aux3\.conv\.conv\.weight"):
        load_checkpoint("bisenetv2-coco")


def test_missing_file_offline_names_the_exact_path(hub, capsys):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("bisenetv2-city")
    message = str(info.value)
    assert f"Put that file at {hub / 'model_final_v2_city.pth'}" in message
    assert f"{pretrained.RELEASE_URL}model_final_v2_city.pth" in message

    with pytest.raises(SystemExit):  # the command line says the same
        evaluate_cmd.main(["--ckpt", "bisenetv1-coco", "--device", "cpu"])
    assert str(hub / "model_final_v1_coco_new.pth") in capsys.readouterr().out

    model = build_model("bisenetv2", 19)
    with pytest.raises(RuntimeError, match="Put that file at " + str(hub / "backbone_v2.pth")):
        pretrained.load_pretrained_backbone(model, "backbone_v2", "bisenetv2")
    # once the file is there, the name loads it into both branches
    source = build_model("bisenetv2", 19)
    torch.save({"detail": source.detail.state_dict(), "segment": source.segment.state_dict()},
               hub / "backbone_v2.pth")
    pretrained.load_pretrained_backbone(model, "backbone_v2", "bisenetv2")
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items()
               if k.startswith(("detail.", "segment.")))
    with pytest.raises(ValueError, match="backbone_v2 is BiSeNetV2's backbone"):
        pretrained.load_pretrained_backbone(build_model("bisenetv1", 19), "backbone_v2",
                                            "bisenetv1")
    with pytest.raises(CheckpointError, match="--pretrained backbone_v2"):
        load_checkpoint("backbone_v2")


def test_named_weights_are_downloaded_when_online(hub, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    state = published_like("bisenetv2", 150)
    torch.save(state, served / "model_final_v2_ade20k.pth")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(pretrained, "RELEASE_URL", f"http://127.0.0.1:{server.server_port}/")
        model, meta = load_model("bisenetv2-ade20k")
    finally:
        server.shutdown()
        server.server_close()
    assert (hub / "model_final_v2_ade20k.pth").read_bytes() == (
        served / "model_final_v2_ade20k.pth").read_bytes()
    assert meta["dataset"] == "ade20k"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_hubconf_loads_published_weights_random_init_and_other_class_counts(hub):
    state = published_like("bisenetv2", 171)
    torch.save(state, hub / "model_final_v2_coco.pth")
    model = torch.hub.load(str(REPO), "bisenetv2", weights="coco", source="local")
    assert not model.training
    own = model.state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], v) for k, v in state.items())

    random = torch.hub.load(str(REPO), "bisenetv2", weights=None, n_classes=5, source="local")
    assert not random.training and random.head.conv_out[1].out_channels == 5

    # another class count: everything but the class layers comes from the file (--finetune-from)
    five = torch.hub.load(str(REPO), "bisenetv2", weights="coco", n_classes=5, source="local")
    class_layers = {k for k, v in five.state_dict().items() if v.shape[:1] == (5,)}
    assert class_layers == {f"{head}.conv_out.1.{p}" for head in
                            ("head", "aux2", "aux3", "aux4", "aux5_4") for p in ("weight", "bias")}
    assert all(torch.equal(v, state[k]) for k, v in five.state_dict().items()
               if k not in class_layers)
    with pytest.raises(ValueError, match="no published weights 'kitti'.*ade20k, city, coco"):
        torch.hub.load(str(REPO), "bisenetv2", weights="kitti", source="local")


def test_finetune_from_a_published_name(hub):
    state = published_like("bisenetv1", 150)
    torch.save(state, hub / "model_final_v1_ade20k.pth")
    model = build_model("bisenetv1", 150)
    message = load_finetune_weights(model, "bisenetv1-ade20k", 150)
    assert str(hub / "model_final_v1_ade20k.pth") in message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_demo_and_export_take_a_published_name(hub, tmp_path, monkeypatch):
    torch.save(published_like("bisenetv2", 171), hub / "model_final_v2_coco.pth")
    rng = np.random.default_rng(1)
    cv2.imwrite(str(tmp_path / "pic.png"), rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    direct = direct_model(BiSeNetV2, 171, hub / "model_final_v2_coco.pth")
    logits = direct_logits(direct, tmp_path / "pic.png", COCO_MEAN, COCO_STD)
    expected, clear = logits.argmax(0).numpy(), clear_pixels(logits)
    monkeypatch.chdir(tmp_path)

    (written,) = demo.main(["--ckpt", "bisenetv2-coco", "--img-path", "pic.png", "--layout",
                            "mask", "--device", "cpu", "--output", "out"])
    colours = cv2.imread(str(written))[..., ::-1]
    palette = DATASETS["coco-stuff"].palette  # the dataset's colours, not generated ones
    assert np.array_equal(colours[clear], palette[expected][clear])

    # exported next to res/, not into the hub cache; the graph computes the file's model
    written = load_tool("export").main(["--ckpt", "bisenetv2-coco", "--size", "64", "96"])
    assert written == Path("res") / "bisenetv2-coco.onnx"
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.float().numpy()})
    with torch.no_grad():
        want = direct(x)
    # float32 graph against the float64 model: float32 rounding (~1e-6 relative) on any CPU
    torch.testing.assert_close(torch.from_numpy(got).double(), want, rtol=0,
                               atol=1e-4 * want.abs().max().item())
