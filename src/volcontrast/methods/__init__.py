"""Pretraining methods: one module per method, each registering itself in :mod:`volcontrast.methods.registry`.

Importing this package registers the built-in methods (simclr, gcl, pcl, spade, spade-nodebias, alice, voco,
mae); :func:`build_method` builds any registered one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from volcontrast.methods.base import PretrainMethod
from volcontrast.methods.registry import get_method, list_methods, register_method, register_preset
from volcontrast.nets.base import Backbone
from volcontrast.views.geometry import CaseTable

if TYPE_CHECKING:
    from volcontrast.engine.config import PretrainConfig

# each import registers its methods; this order is the order `--help` and the benchmark list them in
BUILTIN_MODULES = ("contrastive", "spade", "alice", "voco", "mae")
for _module in BUILTIN_MODULES:
    importlib.import_module(f"volcontrast.methods.{_module}")


def build_method(name: str, backbone: Backbone, config: PretrainConfig, table: CaseTable) -> PretrainMethod:
    """The registered method ``name`` on ``backbone``. Raises InputError (``--method``) for unknown names."""
    return get_method(name).cls(backbone, config, table)


__all__ = ["PretrainMethod", "build_method", "get_method", "list_methods", "register_method", "register_preset"]
