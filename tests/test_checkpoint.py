import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.data.toy_cityscapes import generate_toy_cityscapes
from lib.models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from lib.models.zoo import build_model
from lib.training.runs import latest_usable_checkpoint, list_checkpoints, prune_checkpoints

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def _checkpoint(model, name="bisenetv2", n_classes=5, iteration=0):
    return {"model": name, "n_classes": n_classes, "state_dict": model.state_dict(),
            "iteration": iteration}


def test_round_trip_builds_the_same_model_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = build_model("bisenetv2", 5, aux_heads=False).eval()
    path = save_checkpoint(tmp_path / "m.pth", _checkpoint(model))
    loaded, meta = load_model(path)
    assert not loaded.training and meta["model"] == "bisenetv2" and meta["n_classes"] == 5
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_bare_published_style_state_dict_is_recognised(tmp_path):
    model = build_model("bisenetv1", 7, aux_heads=True)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded, meta = load_model(tmp_path / "bare.pth")
    assert (meta["model"], meta["n_classes"]) == ("bisenetv1", 7)
    # DDP-saved weights carry a "module." prefix; it is stripped.
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    assert load_model(tmp_path / "ddp.pth")[1]["model"] == "bisenetv1"


def test_wrong_model_or_class_count_names_both(tmp_path):
    path = save_checkpoint(tmp_path / "m.pth", _checkpoint(build_model("bisenetv2", 5, False)))
    with pytest.raises(CheckpointError, match="bisenetv2 model, but bisenetv1 was requested"):
        load_model(path, model_name="bisenetv1")
    with pytest.raises(CheckpointError, match="5 classes, but 19 were requested"):
        load_model(path, n_classes=19)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pth", _checkpoint(build_model("bisenetv2", 5, False)))
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated, corrupt"):
        load_checkpoint(tmp_path / "cut.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth holds a list"):
        load_checkpoint(tmp_path / "list.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a BiSeNet checkpoint"):
        load_model(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_atomic_save_leaves_no_temporary_files_and_replaces(tmp_path):
    save_checkpoint(tmp_path / "c.pth", {"state_dict": {"a": torch.ones(2)}})
    save_checkpoint(tmp_path / "c.pth", {"state_dict": {"a": torch.zeros(2)}})
    assert os.listdir(tmp_path) == ["c.pth"]
    assert torch.equal(load_checkpoint(tmp_path / "c.pth")["state_dict"]["a"], torch.zeros(2))


def test_prune_keeps_newest_and_latest_usable_skips_damaged(tmp_path):
    for it in (100, 200, 300, 1000):
        save_checkpoint(tmp_path / f"checkpoint_iter{it:07d}.pth",
                        {"state_dict": {"w": torch.full((1,), float(it))}, "iteration": it})
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint_iter0000300.pth", "checkpoint_iter0001000.pth"]
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-copy, a full disk ...
    path, ckpt = latest_usable_checkpoint(tmp_path)
    assert path.name == "checkpoint_iter0000300.pth" and ckpt["iteration"] == 300


def _checkpoint_from_layout(layout: dict, toy_root, run_dir) -> dict:
    """A checkpoint with exactly the keys, config and state structure that the trainer wrote
    before lib/ became packages (tests/data/checkpoint_layout_v0.json, recorded from a real run),
    filled with deterministic tensors of the published layout's shapes."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for line in (DATA / "bisenetv2_state_dict.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        shape = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
        if key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(1)
        elif key.endswith("running_var"):
            state_dict[key] = torch.ones(shape)
        else:
            state_dict[key] = 0.05 * torch.randn(shape, generator=generator)
    optimizer = {
        "state": {int(i): {"momentum_buffer": torch.zeros(shape)}
                  for i, shape in layout["optimizer_state_shapes"].items()},
        "param_groups": layout["optimizer_param_groups"],
    }
    config = {**layout["config"], "data_root": str(toy_root), "output_dir": str(run_dir)}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    checkpoint = {
        "model": layout["model"], "n_classes": layout["n_classes"], "state_dict": state_dict,
        "class_names": layout["class_names"], "palette": layout["palette"],
        "mean": layout["mean"], "std": layout["std"], "ignore_index": layout["ignore_index"],
        "iteration": layout["iteration"], "config": config, "optimizer": optimizer,
        "scheduler": layout["scheduler"], "scaler": layout["scaler"], "best": layout["best"],
        "history": layout["history"],
        "ema": {"state_dict": {k: v.clone() for k, v in state_dict.items()},
                "updates": layout["ema"]["updates"], "decay": layout["ema"]["decay"]},
    }
    assert list(checkpoint) == layout["top_level"]
    return checkpoint


def test_a_checkpoint_written_before_the_packages_resumes_and_evaluates(tmp_path):
    layout = json.loads((DATA / "checkpoint_layout_v0.json").read_text())
    toy_root = generate_toy_cityscapes(tmp_path / "toy", n_train=4, n_val=2, height=64,
                                       width=128)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoint_iter0000001.pth",
                    _checkpoint_from_layout(layout, toy_root, run_dir))
    # the options it was written with, and one more iteration
    command = [sys.executable, "bisenetv2/train.py", "--data-root", str(toy_root), "--device",
               "cpu", "--output-dir", str(run_dir), "--crop-size", "64", "128", "--max-iter", "3",
               "--warmup-iter", "1", "--batch-size", "2", "--num-workers", "0",
               "--checkpoint-every", "1", "--eval-every", "2", "--ema-decay", "0.9",
               "--resume", "auto"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "at iteration 1" in proc.stdout
    assert "max_iter: extending 2 -> 3" in proc.stdout
    final = load_checkpoint(run_dir / "model_final.pth")
    assert final["iteration"] == 3
    # what the new code writes has the same layout: the same keys (then the resolved class
    # weights), the same config keys plus the options added since
    assert list(final)[:len(layout["top_level"])] == layout["top_level"]
    assert list(final)[len(layout["top_level"]):] == ["class_weights", "file"]  # file: by load
    assert set(final["config"]) - set(layout["config"]) == {
        "accumulate", "class_weights", "data_cache", "device_normalise"}
    assert set(layout["config"]) <= set(final["config"])
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt",
                           str(run_dir / "checkpoint_iter0000001.pth"), "--device", "cpu",
                           "--num-workers", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\| mIoU\s+\|\s+[0-9.]+", proc.stdout)
