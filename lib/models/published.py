"""The published BiSeNet weights by name: ``--ckpt bisenetv2-city``, ``--pretrained backbone_v2``.

A name stands for a file of the public release of the best-known implementation (the files of
the table below, each a bare state dict). It resolves to that file in the torch hub cache
(``$TORCH_HOME/hub/checkpoints/``), downloaded there on first use; offline, the error says the
exact path to put the file. A file found there is checked against the published layout (every
key and shape, the class dimension included) before it is used, so that a truncated download or
a file saved under the wrong name is refused with the key that differs.

An existing file of the same name as one of these names wins: ``--ckpt`` stays a path first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib.models import pretrained
from lib.models.zoo import build_model, has_aux_heads


@dataclass(frozen=True)
class PublishedWeights:
    """One published model file and what it holds."""

    file_name: str
    model: str
    n_classes: int
    dataset: str

    @property
    def url(self) -> str:
        return pretrained.RELEASE_URL + self.file_name


PUBLISHED: dict[str, PublishedWeights] = {
    "bisenetv1-city": PublishedWeights("model_final_v1_city_new.pth", "bisenetv1", 19,
                                       "cityscapes"),
    "bisenetv2-city": PublishedWeights("model_final_v2_city.pth", "bisenetv2", 19, "cityscapes"),
    "bisenetv1-coco": PublishedWeights("model_final_v1_coco_new.pth", "bisenetv1", 171,
                                       "coco-stuff"),
    "bisenetv2-coco": PublishedWeights("model_final_v2_coco.pth", "bisenetv2", 171, "coco-stuff"),
    "bisenetv1-ade20k": PublishedWeights("model_final_v1_ade20k.pth", "bisenetv1", 150, "ade20k"),
    "bisenetv2-ade20k": PublishedWeights("model_final_v2_ade20k.pth", "bisenetv2", 150, "ade20k"),
}


# for the --ckpt help of every command that loads a model
NAMES_HELP = (f"or published weights by name ({', '.join(PUBLISHED)}: the file in the torch hub "
              "cache, downloaded when missing)")


class PublishedWeightsError(RuntimeError):
    """A published name whose file cannot be found, downloaded, or has the wrong layout."""


def known_names() -> str:
    return ", ".join([*PUBLISHED, pretrained.BACKBONE_V2_NAME])


def published_entry(spec: str | Path) -> tuple[str, PublishedWeights] | None:
    """``(name, entry)`` when ``spec`` names published weights (and is no existing file)."""
    name = str(spec).strip().lower()
    if name == pretrained.BACKBONE_V2_NAME and not Path(spec).is_file():
        raise PublishedWeightsError(
            f"{pretrained.BACKBONE_V2_NAME} is BiSeNetV2's ImageNet backbone, not a segmentation "
            f"model: train with --pretrained {pretrained.BACKBONE_V2_NAME}, or give a model: "
            f"{', '.join(PUBLISHED)}")
    if name not in PUBLISHED or Path(spec).is_file():
        return None
    return name, PUBLISHED[name]


def published_file(name: str) -> Path:
    """The file of published model ``name`` in the hub cache, downloaded when missing."""
    entry = PUBLISHED[name]
    return pretrained.cached_or_downloaded(
        entry.url, (entry.file_name,), f"published weights {name} ({entry.file_name})",
        alternatives=", or give the path of a local copy instead of the name",
        error=PublishedWeightsError,
    )


def check_published_layout(state_dict: Mapping[str, Any], name: str, path: Path) -> None:
    """Raise unless ``state_dict`` has exactly the keys and shapes of published model ``name``.

    The auxiliary heads may be absent altogether (a copy saved for inference), not in part.
    """
    entry = PUBLISHED[name]
    has_aux = has_aux_heads(entry.model, state_dict)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = build_model(entry.model, entry.n_classes, aux_heads=has_aux).state_dict()
    pretrained.check_keys(
        expected, state_dict, path,
        f"the published {name} weights ({entry.model}, {entry.n_classes} classes, "
        f"{entry.dataset})",
        error=PublishedWeightsError,
    )


__all__ = ["PUBLISHED", "PublishedWeights", "PublishedWeightsError", "published_entry",
           "published_file", "check_published_layout", "known_names", "NAMES_HELP"]
