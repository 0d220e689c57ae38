"""The method registry: every pretraining method registers itself here, and the engine asks for it by name.

Like the correspondence providers (:func:`volcontrast.spatial.correspondence.register_provider`), a method is
added by calling :func:`register_method` in its own module::

    register_method("pcl", PCL, section="contrast", config=ContrastConfig, summary="positional contrast")

A method owns, in its own file: its class (a :class:`~volcontrast.methods.base.PretrainMethod`), its config
section (a dataclass that appears as a top-level section of the pretraining YAML, e.g. ``spade:``), its
validation (``validate_config``), its step sampler (``build_sampler``), its log columns and its collapse
monitors (``monitors``). Presets a method contributes (e.g. ``alice-paper``) are registered with
:func:`register_preset`.

This module imports nothing of the engine: the engine imports it. :func:`list_methods` and friends import
:mod:`volcontrast.methods` once so the built-in methods are registered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from volcontrast.errors import InputError


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its class, the config section it reads and a one-line summary."""

    name: str
    cls: type
    section: str | None = None  # config section (top-level YAML key) the method reads, if any
    summary: str = ""
    # partial config (nested dict) that makes one step small enough for a CPU at 16³ crops: the contract test
    # and `volcontrast bench gpu --smoke` run every registered method with it
    small: dict[str, Any] = dataclasses.field(default_factory=dict)


_METHODS: dict[str, MethodSpec] = {}
_SECTIONS: dict[str, type] = {}
_PRESETS: dict[str, dict[str, Any]] = {}


def _load_builtins() -> None:
    import volcontrast.methods  # noqa: F401  (registers the built-in methods)


def register_section(name: str, config: type) -> None:
    """A config section ``name`` of the pretraining config, built from dataclass ``config`` (defaults when the
    YAML has no such section). Registering the same class twice is a no-op; another class under a taken name
    is an error."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"section {name!r}: {config!r} is not a dataclass")
    known = _SECTIONS.get(name)
    if known is not None and known is not config:
        raise ValueError(f"config section {name!r} is already registered by {known.__module__}.{known.__name__}")
    _SECTIONS[name] = config


def register_method(name: str, cls: type, *, section: str | None = None, config: type | None = None,
                    summary: str = "", small: dict[str, Any] | None = None) -> MethodSpec:
    """Register method ``name`` (the ``--method`` value). ``config``, when given, registers ``section``;
    ``small`` is a partial config for tiny CPU runs (16³ crops) of this method."""
    if name in _METHODS and _METHODS[name].cls is not cls:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].cls.__module__}")
    if config is not None:
        if section is None:
            raise ValueError(f"method {name!r}: a config class needs a section name")
        register_section(section, config)
    elif section is not None and section not in _SECTIONS:
        raise ValueError(f"method {name!r}: unknown config section {section!r}; register it with a config class")
    spec = MethodSpec(name=name, cls=cls, section=section, summary=summary, small=dict(small or {}))
    _METHODS[name] = spec
    return spec


def register_preset(name: str, values: dict[str, Any]) -> None:
    """A named partial pretraining config (nested dict) that ``--preset NAME`` applies on top of the defaults."""
    if name in _PRESETS and _PRESETS[name] != values:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = values


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises:
        InputError: (``--method``) unknown name, listing the registered ones.
    """
    _load_builtins()
    if name not in _METHODS:
        raise InputError("--method", f"unknown method {name!r}; choose one of {', '.join(list_methods())}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of every registered method, in registration order."""
    _load_builtins()
    return list(_METHODS)


def config_sections() -> dict[str, type]:
    """Registered config sections: name -> dataclass."""
    _load_builtins()
    return dict(_SECTIONS)


def method_presets() -> dict[str, dict[str, Any]]:
    """Presets registered by methods."""
    _load_builtins()
    return dict(_PRESETS)


__all__ = [
    "MethodSpec",
    "config_sections",
    "get_method",
    "list_methods",
    "method_presets",
    "register_method",
    "register_preset",
    "register_section",
]
