"""The model registry: every variant declares itself here, from its own folder.

A variant's ``model.py`` builds its network and ends with ``register(ModelVariant(...))``: its
name, constructor, the key that tells its state dicts apart (the published key layout), its main
classifier's key, its training-time auxiliary heads and how its ImageNet backbone is loaded.
Everything else (training, evaluation, export, checkpoints, published weights) finds a model
through :func:`variant`. ``lib.models.zoo`` imports the variants the repository ships (and any
named in ``$BISENET_MODELS``) so that they are registered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# key prefixes of wrapped models: DistributedDataParallel / DataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class ModelVariant:
    """What the rest of the code needs to know about one model family member."""

    name: str
    build: Callable[..., nn.Module]  # build(n_classes=..., aux_heads=...)
    # a state dict is this variant's when it has a key starting with each of ``key_prefixes``
    # and none starting with ``absent_prefixes`` (the published key layout)
    key_prefixes: tuple[str, ...]
    classifier_key: str  # the main classifier's weight, [n_classes, C, 1, 1]
    aux_prefixes: tuple[str, ...] = ()  # training-time auxiliary heads (inference copies lack them)
    absent_prefixes: tuple[str, ...] = ()
    # load_backbone(model, spec) -> log line: ImageNet weights for ``--pretrained spec``
    load_backbone: Callable[[nn.Module, str], str] | None = None
    # dataset -> evaluation options where this variant's published weights were scored
    # otherwise than the dataset's protocol (e.g. {"ade20k": {"eval_short_side": 512}})
    eval_protocol: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __hash__(self) -> int:  # declarations are compared by name and contents
        return hash(self.name)

    def matches(self, keys: list[str]) -> bool:
        return (all(any(k.startswith(p) for k in keys) for p in self.key_prefixes)
                and not any(k.startswith(self.absent_prefixes) for k in keys))


VARIANTS: dict[str, ModelVariant] = {}


def register(model_variant: ModelVariant) -> ModelVariant:
    """Add a variant (a name registered twice must be the same declaration)."""
    known = VARIANTS.get(model_variant.name)
    if known is not None and known != model_variant:
        raise ValueError(f"model {model_variant.name!r} is already registered differently")
    VARIANTS[model_variant.name] = model_variant
    return model_variant


def model_names() -> tuple[str, ...]:
    return tuple(VARIANTS)


def variant(name: str) -> ModelVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def build_model(name: str, n_classes: int, aux_heads: bool = True) -> nn.Module:
    """Build model ``name`` (one of :func:`model_names`) with ``n_classes`` outputs."""
    model_variant = variant(name)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    return model_variant.build(n_classes=n_classes, aux_heads=aux_heads)


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
    """Tell the model from the key names (each variant's published layout, e.g. ``detail.*`` ->
    bisenetv2, ``sp.*`` -> bisenetv1). Raises ``ValueError`` when no variant, or several, match."""
    keys = list(strip_module_prefix(state_dict).keys())
    found = [v.name for v in VARIANTS.values() if v.matches(keys)]
    if len(found) == 1:
        return found[0]
    sample = ", ".join(keys[:5]) or "no keys"
    if found:
        raise ValueError(f"state dict matches several models ({', '.join(found)})")
    raise ValueError(f"state dict matches no known model (first keys: {sample})")


def infer_n_classes(state_dict: Mapping[str, Any]) -> int:
    """Number of classes: the output channels of the main classifier."""
    state_dict = strip_module_prefix(state_dict)
    key = variant(infer_model_name(state_dict)).classifier_key
    if key not in state_dict:
        raise KeyError(f"state dict has no main classifier weight {key!r}")
    return int(state_dict[key].shape[0])


def has_aux_heads(name: str, state_dict: Mapping[str, Any]) -> bool:
    prefixes = variant(name).aux_prefixes
    return bool(prefixes) and any(k.startswith(prefixes) for k in state_dict)
