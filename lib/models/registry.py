"""Model names, construction, and recognition of a state dict's model and class count."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from bisenetv1.model import BiSeNetV1
from bisenetv2.model import BiSeNetV2
from diss.model import BiSeNetDiss

MODEL_NAMES: tuple[str, ...] = ("bisenetv1", "bisenetv2", "diss")

MODELS: dict[str, Callable[..., nn.Module]] = {
    "bisenetv1": BiSeNetV1,
    "bisenetv2": BiSeNetV2,
    "diss": BiSeNetDiss,
}

# key of the main classifier's weight ([n_classes, C, 1, 1]) in each model
_CLASSIFIER_KEYS = {
    "bisenetv1": "conv_out.conv_out.weight",
    "bisenetv2": "head.conv_out.1.weight",
    "diss": "conv_out.conv_out.weight",
}


# key prefixes of wrapped models: DistributedDataParallel / DataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def build_model(name: str, n_classes: int, aux_heads: bool = True) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) with ``n_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    return MODELS[name](n_classes=n_classes, aux_heads=aux_heads)


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the prefixes wrappers add to every key: ``module.`` ((Distributed)DataParallel) and
    ``_orig_mod.`` (``torch.compile``), in any nesting.

    A prefix is only stripped when *all* keys carry it, so a model that really has a ``module``
    child is safe.
    """
    state_dict = dict(state_dict)
    while state_dict:
        prefix = next((p for p in _WRAPPER_PREFIXES
                       if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def infer_model_name(state_dict: Mapping[str, Any]) -> str:
    """Tell the model from the key names: ``sp.*`` -> bisenetv1, ``detail.*`` -> bisenetv2,
    ``cp.*`` without ``sp.*`` -> diss. Raises ``ValueError`` for anything else."""
    keys = strip_module_prefix(state_dict).keys()
    if any(k.startswith("detail.") for k in keys):
        return "bisenetv2"
    if any(k.startswith("sp.") for k in keys):
        return "bisenetv1"
    if any(k.startswith("cp.") for k in keys):
        return "diss"
    sample = ", ".join(list(keys)[:5]) or "no keys"
    raise ValueError(f"state dict matches no known model (first keys: {sample})")


def infer_n_classes(state_dict: Mapping[str, Any]) -> int:
    """Number of classes: the output channels of the main classifier."""
    state_dict = strip_module_prefix(state_dict)
    key = _CLASSIFIER_KEYS[infer_model_name(state_dict)]
    if key not in state_dict:
        raise KeyError(f"state dict has no main classifier weight {key!r}")
    return int(state_dict[key].shape[0])
