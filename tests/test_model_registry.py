"""A model variant is one folder: a tiny variant declared outside the repository trains, resumes,
evaluates and exports through the ordinary commands, found through the registry alone."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.checkpoint import load_checkpoint
from lib.models.registry import VARIANTS, infer_model_name, infer_n_classes
from lib.models.zoo import build_model, model_names

REPO = Path(__file__).resolve().parents[1]
MIOU = re.compile(r"\| mIoU\s+\|\s+([0-9.]+)")

# The whole variant: its network, its declaration and its training recipe, in its own folder.
TINY_MODEL = '''
import torch
from torch import nn
from torch.nn import functional as F

from lib.models.registry import ModelVariant, register


class TinyNet(nn.Module):
    """Two strided conv-BN-ReLU stages and a 1x1 classifier; an auxiliary head on the first."""

    model_name = "tinynet"

    def __init__(self, n_classes: int = 19, aux_heads: bool = True) -> None:
        super().__init__()
        self.aux_heads = aux_heads
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.head = nn.Conv2d(16, n_classes, 1)
        self.output_names = ("out", "aux") if aux_heads else ("out",)
        if aux_heads:
            self.aux = nn.Conv2d(8, n_classes, 1)

    def head_modules(self):
        return [self.head, self.aux] if self.aux_heads else [self.head]

    def forward(self, x):
        size = x.shape[-2:]
        stem = self.stem(x)
        out = F.interpolate(self.head(self.body(stem)), size, mode="bilinear")
        if not self.training:
            return out
        if not self.aux_heads:
            return (out,)
        return out, F.interpolate(self.aux(stem), size, mode="bilinear")


VARIANT = register(ModelVariant(name="tinynet", build=TinyNet, key_prefixes=("stem.", "body."),
                                classifier_key="head.weight", aux_prefixes=("aux.",)))
'''

TINY_TRAIN = '''
import sys
from pathlib import Path

sys.path.insert(0, {repo!r})
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinynet.model  # registers the variant
from lib.training.config import TrainConfig
from lib.training.trainer import main

RECIPE = TrainConfig(model="tinynet", crop_size=(64, 128), scale_range=(0.75, 1.25),
                     max_iter=6, batch_size=2, lr=1e-2, warmup_iter=1, num_workers=0,
                     log_every=1, checkpoint_every=3, eval_modes=("ss",))

if __name__ == "__main__":
    main(RECIPE)
'''


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    (root / "tinynet").mkdir()
    (root / "tinynet" / "__init__.py").write_text("")
    (root / "tinynet" / "model.py").write_text(textwrap.dedent(TINY_MODEL))
    (root / "tinynet" / "train.py").write_text(textwrap.dedent(TINY_TRAIN.format(repo=str(REPO))))
    return root


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return generate_toy_cityscapes(tmp_path_factory.mktemp("toy"), n_train=4, n_val=2,
                                   height=64, width=128)


def _run(cmd: list[str], variant_dir: Path) -> str:
    # the variant is found by the ordinary commands through $BISENET_MODELS alone
    env = {**os.environ, "PYTHONPATH": str(variant_dir), "BISENET_MODELS": "tinynet.model",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _train(variant_dir: Path, toy_root: Path, out: Path, *extra: str) -> str:
    return _run([str(variant_dir / "tinynet" / "train.py"), "--data-root", str(toy_root),
                 "--device", "cpu", "--output-dir", str(out), *extra], variant_dir)


def test_the_repository_variants_are_registered_from_their_folders():
    assert set(model_names()) >= {"bisenetv1", "bisenetv2", "diss"}
    for name in ("bisenetv1", "bisenetv2", "diss"):
        declared = VARIANTS[name]
        model = build_model(name, 7, aux_heads=True)
        state_dict = model.state_dict()
        assert type(model).__module__ == f"{name}.model"
        assert infer_model_name(state_dict) == name
        assert infer_n_classes(state_dict) == 7
        assert state_dict[declared.classifier_key].shape[0] == 7
        lean_keys = build_model(name, 7, aux_heads=False).state_dict().keys()
        # what the declared auxiliary prefixes cover is exactly what an inference copy lacks
        assert {k for k in state_dict if k.startswith(declared.aux_prefixes)} == (
            state_dict.keys() - lean_keys)


def test_a_variant_outside_the_repository_trains_resumes_evaluates_and_exports(
        variant_dir, toy_root, tmp_path):
    # trained in one go, and resumed from that run's checkpoint of iteration 3: the same weights
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    log = _train(variant_dir, toy_root, whole)
    halves.mkdir()
    shutil.copy(whole / "checkpoint_iter0000003.pth", halves)
    _train(variant_dir, toy_root, halves, "--resume", "auto", "--no-eval-at-end")
    final = load_checkpoint(whole / "model_final.pth")
    resumed = load_checkpoint(halves / "model_final.pth")
    assert (final["model"], final["iteration"], resumed["iteration"]) == ("tinynet", 6, 6)
    assert final["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key

    # evaluate.py finds the variant from the checkpoint's model name and prints the number that
    # training printed at its end (same evaluator, same inference form)
    trained_miou = MIOU.findall(log)
    out = _run(["evaluate.py", "--ckpt", str(whole / "model_final.pth"), "--data-root",
                str(toy_root), "--device", "cpu", "--num-workers", "0"], variant_dir)
    # (the first mIoU row of each: the per-class table; the scores table repeats it)
    assert trained_miou and MIOU.findall(out)[:1] == trained_miou[:1]

    # the ONNX export, run by ONNX Runtime here, gives the eager model's logits
    onnx_path = tmp_path / "tiny.onnx"
    _run(["tools/export.py", "--ckpt", str(whole / "model_final.pth"), "--format", "onnx",
          "--output", str(onnx_path)], variant_dir)
    sys.path.insert(0, str(variant_dir))
    try:
        from tinynet.model import TinyNet
    finally:
        sys.path.remove(str(variant_dir))
    eager = TinyNet(n_classes=19, aux_heads=True)
    eager.load_state_dict(final["state_dict"])
    eager.eval()
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(image).numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: image.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
