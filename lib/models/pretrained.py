"""ImageNet backbone weights for training: ``--pretrained PATH | auto | none``.

* BiSeNetV1 and diss: torchvision's ResNet-18 ImageNet weights (``ResNet18_Weights.IMAGENET1K_V1``)
  are loaded into the context path's ``cp.resnet``.
* BiSeNetV2: the published ``backbone_v2.pth`` (ImageNet-pretrained detail and semantic branches)
  is loaded into ``detail`` and ``segment``.

``auto`` (for BiSeNetV2 also the file's name, ``backbone_v2``) looks in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) and downloads into it when the file is missing. When neither
works, training stops with an error telling where to put the file; it never silently falls back
to random weights. ``none`` trains from scratch.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lib.models.registry import strip_module_prefix, variant

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
# the same ImageNet weights under torchvision's older file name
RESNET18_FILES = ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth")
# where the published BiSeNet weights are released (backbone_v2.pth and the trained models)
RELEASE_URL = "https://github.com/CoinCheung/BiSeNet/releases/download/0.0.0/"
BACKBONE_V2_FILES = ("backbone_v2.pth",)
BACKBONE_V2_NAME = "backbone_v2"  # --pretrained backbone_v2: the published file by name
DOWNLOAD_TIMEOUT_S = 20.0
_V2_BRANCHES = ("detail", "segment")


class PretrainedWeightsError(RuntimeError):
    """Backbone weights that cannot be found, downloaded or loaded; the message says what to do."""


def hub_checkpoint_dir() -> Path:
    """Folder where torch hub keeps downloaded weights (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_pretrained_backbone(model: nn.Module, spec: str | None, model_name: str) -> str:
    """Load ImageNet backbone weights into ``model`` according to ``spec``.

    Args:
        model: a freshly built model of the variant ``model_name``.
        spec: path of a weight file, ``"auto"`` (hub cache, else download; ``"backbone_v2"``
            says the same for BiSeNetV2) or ``"none"``/None.
        model_name: the model's name (a registered variant, see ``lib.models.registry``), whose
            declared ``load_backbone`` does the loading.

    Returns:
        a one-line description of what was loaded, for the training log.

    Raises:
        FileNotFoundError: ``spec`` is a path that does not exist.
        PretrainedWeightsError: ``auto`` could neither find nor download the weights, or the
            file's keys or shapes do not fit the backbone (the message names them).
    """
    model_variant = variant(model_name)
    own_name = getattr(model, "model_name", model_name)
    if own_name != model_name:
        raise ValueError(f"model_name is {model_name!r} but the model is a {own_name!r}")
    if spec is None or spec.strip().lower() in ("", "none"):
        return "pretrained backbone: none, training from scratch (random initialisation)"
    if model_variant.load_backbone is None:
        raise ValueError(f"{model_name} declares no pretrained backbone: use --pretrained none")
    return model_variant.load_backbone(model, spec)


def _weights_file(spec: str, by_name: bool, url: str, file_names: tuple[str, ...],
                  what: str) -> Path:
    """The file ``spec`` names: a path, or (``auto`` or the weights' name) the hub cache."""
    if spec.strip().lower() == "auto" or by_name:
        alternatives = (", or pass --pretrained PATH with a local copy, or pass --pretrained none "
                        "to train from scratch")
        return cached_or_downloaded(url, file_names, f"--pretrained {spec.strip()}: {what}",
                                    alternatives)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained {spec}: no such file (give a weight file, 'auto' or 'none')"
        )
    return path


def _names_backbone_v2(spec: str) -> bool:
    return spec.strip().lower() == BACKBONE_V2_NAME and not Path(spec).expanduser().is_file()


def load_resnet18_backbone(model: nn.Module, spec: str) -> str:
    """torchvision's ImageNet ResNet-18 into the context path's ``cp.resnet`` (BiSeNetV1, diss)."""
    if _names_backbone_v2(spec):
        raise ValueError(f"--pretrained {BACKBONE_V2_NAME} is BiSeNetV2's backbone; "
                         f"{model.model_name} uses the torchvision ResNet-18 ImageNet weights "
                         "(--pretrained auto)")
    path = _weights_file(spec, False, RESNET18_URL, RESNET18_FILES,
                         "torchvision ImageNet ResNet-18 weights")
    count = _load_resnet18(model.cp.resnet, _read(path), path)
    return f"pretrained backbone: {count} ImageNet ResNet-18 tensors from {path} into cp.resnet"


def load_v2_backbone(model: nn.Module, spec: str) -> str:
    """The published ``backbone_v2.pth`` into BiSeNetV2's ``detail`` and ``segment`` branches."""
    path = _weights_file(spec, _names_backbone_v2(spec), RELEASE_URL + BACKBONE_V2_FILES[0],
                         BACKBONE_V2_FILES, "BiSeNetV2 ImageNet backbone (backbone_v2.pth)")
    count = _load_v2_branches(model, _read(path), path)
    return f"pretrained backbone: {count} detail/semantic branch tensors from {path}"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub opens URLs without a timeout; a default keeps a dead network from hanging forever
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def cached_or_downloaded(
    url: str, file_names: tuple[str, ...], what: str, alternatives: str = "",
    error: type[Exception] = PretrainedWeightsError,
) -> Path:
    """The first of ``file_names`` found in the torch hub cache, else ``url`` downloaded there.

    Raises ``error`` naming ``what``, the URL and the exact path to put the file when neither works
    (offline, HTTP error, read-only cache); ``alternatives`` is appended to that advice.
    """
    folder = hub_checkpoint_dir()
    for name in file_names:
        if (folder / name).is_file():
            return folder / name
    target = folder / file_names[0]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # downloads into ``folder`` (checking the hash embedded in the file name, if any)
            torch.hub.load_state_dict_from_url(
                url, model_dir=str(folder), map_location="cpu", progress=False,
                check_hash=True, file_name=file_names[0], weights_only=True,
            )
    except Exception as exc:  # URLError, timeouts, HTTP errors, hash mismatch, read-only cache
        raise error(
            f"{what}: not in the local cache, and downloading {url} failed "
            f"({type(exc).__name__}: {exc}). Put that file at {target} (the folder follows "
            f"$TORCH_HOME){alternatives}."
        ) from exc
    if not target.is_file():
        raise error(f"{what}: download of {url} left no file at {target}")
    return target


def _read(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(
            f"cannot read pretrained weights {path} ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return strip_module_prefix(obj)


def check_keys(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], path: Path, what: str,
    error: type[Exception] = PretrainedWeightsError,
) -> None:
    """Raise ``error`` if ``found`` does not fit ``expected`` exactly (names and shapes), naming
    ``path`` and the keys that differ.

    ``num_batches_tracked`` counters may be absent: old checkpoints predate them.
    """
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    wrong = [
        f"{k} {tuple(getattr(found[k], 'shape', ()))} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in found and (not isinstance(found[k], torch.Tensor) or found[k].shape != v.shape)
    ]
    if wrong:
        problems.append(f"shape mismatch {_short(wrong)}")
    if problems:
        raise error(f"{path} is not {what}: " + "; ".join(problems))


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    merged = module.state_dict()  # supplies absent num_batches_tracked counters
    merged.update(state)
    module.load_state_dict(merged, strict=True)


def _load_resnet18(resnet: nn.Module, state: Mapping[str, Any], path: Path) -> int:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # ImageNet classifier
    check_keys(resnet.state_dict(), state, path, "a torchvision ResNet-18 state dict")
    _load_into(resnet, state)
    return len(state)


def _load_v2_branches(model: nn.Module, state: Mapping[str, Any], path: Path) -> int:
    # The published file nests one state dict per branch ({"detail": {...}, "segment": {...}});
    # a flat dict with "detail."/"segment." prefixes (e.g. cut from a full model) works too.
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if key in _V2_BRANCHES and isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    expected = {
        f"{branch}.{k}": v
        for branch in _V2_BRANCHES
        for k, v in getattr(model, branch).state_dict().items()
    }
    check_keys(
        expected, flat, path,
        "a BiSeNetV2 backbone (detail.* and segment.* weights only; to start from a full "
        "model checkpoint use --finetune-from)",
    )
    for branch in _V2_BRANCHES:
        prefix = f"{branch}."
        _load_into(
            getattr(model, branch),
            {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)},
        )
    return len(flat)
