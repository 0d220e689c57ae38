"""Configs are data: typed dataclasses that load from and save to YAML (no code execution).

``from_dict(Cls, data)`` builds nested dataclasses from plain dicts and rejects unknown keys with a clear
message; ``to_dict`` is the inverse; ``load_yaml``/``save_yaml`` add the file layer (``yaml.safe_load``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from volcontrast.errors import InputError

T = TypeVar("T")


def extra_sections(cls: type) -> dict[str, type]:
    """Sections a dataclass takes besides its fields: ``cls.extra_sections()`` if it defines it (the pretraining
    config's method sections come from the method registry), else none."""
    fn = getattr(cls, "extra_sections", None)
    return dict(fn()) if callable(fn) else {}


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested) -> plain dicts/lists of JSON/YAML-safe scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name in extra_sections(type(obj)):
            out[name] = to_dict(getattr(obj, name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()  # numpy scalars
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ValueError``."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    extras = extra_sections(cls)
    unknown = sorted(set(data) - names - set(extras))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names | set(extras))}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items() if k in names}
    obj = cls(**kwargs)
    for k, tp in extras.items():
        if k in data:
            setattr(obj, k, _convert(tp, data[k], f"{where}.{k}"))
    return obj


def merge(base: T, overrides: dict[str, Any], *, where: str = "config") -> T:
    """A copy of dataclass ``base`` with (nested) ``overrides`` applied."""
    data = to_dict(base)

    def _merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                _merge(dst[k], v)
            else:
                dst[k] = v

    _merge(data, overrides)
    return from_dict(type(base), data, where=where)


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without None values (recursively; emptied sub-dicts dropped): unset CLI flags change nothing."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = drop_none(v)
            if not v:
                continue
        if v is not None:
            out[k] = v
    return out


def resolve(cls: type[T], presets: dict[str, dict[str, Any]], preset: str | None = None,
            yaml_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults <- ``presets[preset]`` <- YAML <- ``overrides`` (nested dicts; None values ignored).

    Raises:
        InputError: unknown preset, unknown keys or wrong types (one line).
    """
    cfg = cls()
    try:
        if preset:
            if preset not in presets:
                raise InputError("--preset", f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
            cfg = merge(cfg, presets[preset])
        if yaml_data:
            try:
                cfg = merge(cfg, yaml_data)
            except ValueError as exc:  # name the YAML file (load_yaml records it)
                raise InputError(getattr(yaml_data, "source", "config"), str(exc)) from None
        if overrides:
            cfg = merge(cfg, drop_none(overrides))
    except ValueError as exc:
        raise InputError("config", str(exc)) from None
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "config file not found")
    from volcontrast.utils.files import read_text

    try:
        data = yaml.safe_load(read_text(p))
    except yaml.YAMLError as exc:
        raise InputError(p, f"not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(p, "config must be a mapping of keys to values")
    return YamlDict(data, source=str(p))


class YamlDict(dict):
    """A loaded YAML mapping that remembers its file (``source``), so errors about its keys can name it."""

    def __init__(self, data: dict[str, Any], source: str):
        super().__init__(data)
        self.source = source


def save_yaml(path: str | os.PathLike, obj: Any) -> Path:
    from volcontrast.utils.files import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
