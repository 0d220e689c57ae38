"""Pretraining methods: one small module per method, wired from views + nets + losses."""

from __future__ import annotations

from volcontrast.engine.config import PretrainConfig
from volcontrast.errors import InputError
from volcontrast.methods.alice import Alice
from volcontrast.methods.base import PretrainMethod
from volcontrast.methods.contrastive import GCL, PCL, SimCLR
from volcontrast.methods.spade import Spade, SpadeNoDebias
from volcontrast.nets.base import Backbone
from volcontrast.views.geometry import CaseTable

METHODS: dict[str, type[PretrainMethod]] = {
    "simclr": SimCLR, "gcl": GCL, "pcl": PCL, "spade": Spade, "spade-nodebias": SpadeNoDebias,
    "alice": Alice,
}


def build_method(name: str, backbone: Backbone, config: PretrainConfig, table: CaseTable) -> PretrainMethod:
    if name not in METHODS:
        raise InputError("--method", f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](backbone, config, table)


__all__ = ["GCL", "METHODS", "PCL", "Alice", "PretrainMethod", "SimCLR", "Spade", "SpadeNoDebias", "build_method"]
