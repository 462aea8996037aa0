"""The model variants this repository ships, registered by importing their folders.

Import this module (rather than ``lib.models.registry`` alone) wherever a model is looked up by
name: ``bisenetv1/``, ``bisenetv2/`` and ``diss/`` then have registered themselves, and so have
the modules named in ``$BISENET_MODELS`` (comma-separated import paths, e.g. ``mynet.model``
with ``mynet/`` on ``PYTHONPATH``): a variant kept outside this repository.
"""

from __future__ import annotations

import importlib
import os

import bisenetv1.model  # noqa: F401 - registers bisenetv1
import bisenetv2.model  # noqa: F401 - registers bisenetv2
import diss.model  # noqa: F401 - registers diss
from lib.models.registry import (
    build_model,
    has_aux_heads,
    infer_model_name,
    infer_n_classes,
    model_names,
    strip_module_prefix,
    variant,
)

for _module in filter(None, (m.strip() for m in os.environ.get("BISENET_MODELS", "").split(","))):
    importlib.import_module(_module)

__all__ = ["build_model", "has_aux_heads", "infer_model_name", "infer_n_classes", "model_names",
           "strip_module_prefix", "variant"]
