"""Typed configuration: dataclasses built from YAML + `a.b=c` overrides.

Merge order is dataclass defaults <- inherited YAML <- YAML file <- command-line overrides. A YAML file may
start with `inherit: other.yaml` (relative to itself): mappings merge key by key, anything else replaces. Unknown keys are an error that
names the key. Every stage writes the resolved config beside its artifact (`save_config`).

    cfg = load_config("configs/small.yaml", ["teacher.train.max_steps=50", "langs=[en,fr]"])

Each module declares its own config dataclass beside the code that uses it; `mome_ray.pipeline_config`
composes them into the whole run's config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mome_ray.errors import MomeError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Build dataclass `cls` from plain data, checking keys and types. `where` is the dotted path for errors."""
    return _convert(cls, data, cls.__name__ if where is None else where)


def _over_default(tp: Any, key: str, value: Any) -> Any:
    """A mapping given for a dataclass field whose default is built by a factory (e.g. `serve.router`'s own
    batch size) overrides that default's values, not the field class's: `serve.router.num_cpus=1` keeps
    the router's batch size of 32."""
    field = next(f for f in dataclasses.fields(tp) if f.name == key)
    if isinstance(value, dict) and field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
        if dataclasses.is_dataclass(default):
            return deep_merge(to_dict(default), value)
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MomeError(f"config '{where}' must be a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise MomeError(
                f"unknown config key '{_join(where, unknown[0])}'; valid keys there: {', '.join(sorted(fields))}"
            )
        kwargs = {k: _convert(hints[k], _over_default(tp, k, v), _join(where, k)) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except TypeError as e:  # a required field is missing
            raise MomeError(f"config '{where}': {e}") from None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise MomeError(f"config '{where}' must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MomeError(f"config '{where}' must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(kt, k, where): _convert(vt, v, _join(where, str(k))) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise MomeError(f"config '{where}' must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `lang: 1` or `path: 2024` as numbers
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise MomeError(f"config '{where}' must be {tp.__name__}, got {value!r}")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to nested dict `data` (values parsed as YAML: `x=[fr,de]`, `y=null`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MomeError(f"override '{item}' is not of the form key.path=value")
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MomeError(f"override '{item}': '{p}' is not a mapping")
        node[last] = yaml.safe_load(raw) if raw != "" else ""
    return data


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving `inherit:` chains."""
    path = Path(path)
    if not path.is_file():
        raise MomeError(f"config file '{path}' not found; presets live in configs/ (tiny, small, paper)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MomeError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MomeError(f"config file '{path}' must hold a mapping at the top level")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if path.resolve() in _seen:
        raise MomeError(f"config file '{path}' inherits itself (through {[str(p) for p in _seen]})")
    return deep_merge(load_yaml(path.parent / str(parent), _seen + (path.resolve(),)), data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
