"""``--pretrained PATH | auto | none`` for both backbone kinds."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from lib.models.pretrained import load_pretrained_backbone
from lib.models.zoo import build_model


def fake_imagenet_resnet18(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict (classifier included) with random values."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.1)
            else:
                tensor.fill_(3)
    return net.state_dict()


def assert_loaded(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that refuses every download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.mark.parametrize("name", ["bisenetv1", "diss"])
def test_resnet18_file_is_loaded_into_the_context_path(tmp_path, name):
    state = fake_imagenet_resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(name, 19)
    head_before = model.conv_out.conv_out.weight.clone()
    message = load_pretrained_backbone(model, str(path), name)
    assert str(path) in message and "120" in message
    assert_loaded(model.cp.resnet, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert torch.equal(model.conv_out.conv_out.weight, head_before)  # outside the backbone


def test_old_checkpoints_without_batch_counters_load(tmp_path):
    state = {k: v for k, v in fake_imagenet_resnet18(1).items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = build_model("bisenetv1", 19)
    load_pretrained_backbone(model, str(tmp_path / "old.pth"), "bisenetv1")
    assert_loaded(model.cp.resnet, {k: v for k, v in state.items() if not k.startswith("fc.")})


def test_foreign_resnet_file_is_refused_naming_the_keys(tmp_path):
    state = fake_imagenet_resnet18()
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(RuntimeError, match=r"odd.pth.*layer4\.1\.bn2\.weight.*layer5\.0\.conv1"):
        load_pretrained_backbone(build_model("bisenetv1", 19), str(tmp_path / "odd.pth"),
                                 "bisenetv1")
    state = fake_imagenet_resnet18()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(RuntimeError, match=r"conv1\.weight \(64, 3, 3, 3\)"):
        load_pretrained_backbone(build_model("diss", 19), str(tmp_path / "shape.pth"), "diss")


def test_missing_path_and_wrong_model_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_pretrained_backbone(build_model("bisenetv1", 19), str(tmp_path / "nothing.pth"),
                                 "bisenetv1")
    with pytest.raises(ValueError, match="bisenetv2"):
        load_pretrained_backbone(build_model("bisenetv1", 19), "none", "bisenetv2")


@pytest.mark.parametrize("name", ["bisenetv1", "diss"])
def test_auto_offline_without_cache_stops_with_instructions(offline_hub, name):
    with pytest.raises(RuntimeError) as info:
        load_pretrained_backbone(build_model(name, 19), "auto", name)
    message = str(info.value)
    assert str(offline_hub / "resnet18-f37072fd.pth") in message
    assert "--pretrained none" in message and "no network" in message


@pytest.mark.parametrize("file_name", ["resnet18-f37072fd.pth", "resnet18-5c106cde.pth"])
def test_auto_uses_the_hub_cache(offline_hub, file_name):
    state = fake_imagenet_resnet18(2)
    offline_hub.mkdir(parents=True)
    torch.save(state, offline_hub / file_name)
    model = build_model("bisenetv1", 19)
    message = load_pretrained_backbone(model, "auto", "bisenetv1")
    assert file_name in message
    assert_loaded(model.cp.resnet, {k: v for k, v in state.items() if not k.startswith("fc.")})


def v2_branches(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Backbone weights in the published layout: one state dict per branch."""
    torch.manual_seed(seed)
    donor = build_model("bisenetv2", 19, aux_heads=False)
    with torch.no_grad():
        for tensor in donor.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.1)
    return {"detail": donor.detail.state_dict(), "segment": donor.segment.state_dict()}


@pytest.mark.parametrize("layout", ["nested", "flat", "ddp"])
def test_v2_backbone_file_is_loaded_into_both_branches(tmp_path, layout):
    branches = v2_branches(3)
    flat = {f"{b}.{k}": v for b, sd in branches.items() for k, v in sd.items()}
    saved = {"nested": branches, "flat": flat,
             "ddp": {f"module.{k}": v for k, v in flat.items()}}[layout]
    torch.save(saved, tmp_path / "backbone_v2.pth")
    model = build_model("bisenetv2", 19)
    head_before = model.head.conv_out[1].weight.clone()
    message = load_pretrained_backbone(model, str(tmp_path / "backbone_v2.pth"), "bisenetv2")
    assert "backbone_v2.pth" in message
    assert_loaded(model.detail, branches["detail"])
    assert_loaded(model.segment, branches["segment"])
    assert torch.equal(model.head.conv_out[1].weight, head_before)


def test_v2_full_model_or_partial_file_is_refused(tmp_path):
    full = build_model("bisenetv2", 19).state_dict()
    torch.save(full, tmp_path / "full.pth")
    with pytest.raises(RuntimeError, match=r"--finetune-from.*unexpected keys \[bga\."):
        load_pretrained_backbone(build_model("bisenetv2", 19), str(tmp_path / "full.pth"),
                                 "bisenetv2")
    torch.save({"detail": v2_branches(4)["detail"]}, tmp_path / "half.pth")
    with pytest.raises(RuntimeError, match=r"missing keys \[segment\.S1S2"):
        load_pretrained_backbone(build_model("bisenetv2", 19), str(tmp_path / "half.pth"),
                                 "bisenetv2")


def test_v2_auto_offline_and_cached(offline_hub):
    model = build_model("bisenetv2", 19)
    with pytest.raises(RuntimeError) as info:
        load_pretrained_backbone(model, "auto", "bisenetv2")
    assert str(offline_hub / "backbone_v2.pth") in str(info.value)
    assert "--pretrained none" in str(info.value)
    branches = v2_branches(5)
    offline_hub.mkdir(parents=True, exist_ok=True)
    torch.save(branches, offline_hub / "backbone_v2.pth")
    load_pretrained_backbone(model, "auto", "bisenetv2")
    assert_loaded(model.segment, branches["segment"])


@pytest.mark.parametrize("spec", ["none", None])
def test_none_trains_from_scratch_and_changes_nothing(spec):
    model = build_model("bisenetv1", 19)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "scratch" in load_pretrained_backbone(model, spec, "bisenetv1")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
