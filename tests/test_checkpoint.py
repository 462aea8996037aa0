import os

import pytest
import torch

from lib.models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from lib.models.zoo import build_model
from lib.training.runs import latest_usable_checkpoint, list_checkpoints, prune_checkpoints


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
