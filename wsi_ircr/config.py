"""Validated, frozen dataclass configs: the one place every command resolves its configuration.

Precedence, highest first: an explicit command-line option > ``--set key=value`` > the
YAML file (``--config``) > the dataclass default. Every YAML key maps to a dataclass
field; unknown keys, wrong types and out-of-range values are ``UserError``s that name the
file and the key. Values of explicit options (paths above all) are set as they are, never
parsed as YAML, so a ``#`` or ``:`` in a path is kept.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from wsi_ircr.errors import UserError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _exponent_number(text: str) -> float | str:
    """``"1e-4"`` -> 1e-4: PyYAML (YAML 1.1) reads exponents without a dot as strings.

    Anything else (``"nan"``, ``"inf"``, words) is returned unchanged, to be rejected.
    """
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) and "e" in text.lower() else text


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert lists to tuples and nested dicts."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: must not be null")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, found {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where}: expected {len(args)} values, found {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, found {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):
            value = _exponent_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, found {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, found {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, found {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, found {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; every key must be a field (nested allowed)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise UserError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML/JSON-ready) view of a dataclass config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _parse_scalar(text: str, item: str, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"{where} {item!r}: the value is not valid YAML; quote it or fix the brackets") from None


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], where: str = "override") -> dict:
    """Apply ``a.b=value`` strings (values parsed as YAML) to a nested dict copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"{where} {item!r}: expected KEY=VALUE, e.g. steps=2000")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"{where} {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_scalar(text, item, where)
    return out


def _merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping; bad files are ``UserError``s naming the file.

    A ``base: FILE`` key (relative to this file's folder) reads FILE first and lays this
    file's keys over it (nested sections merge key by key); bases may have bases.
    """
    data = _read_one_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    path = Path(path)
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base must be the name of another YAML file, found {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in _seen + (path.resolve(),):
        raise UserError(f"{path}: base {base!r} leads back to itself; break the cycle")
    return _merged(read_yaml(base_path, _seen + (path.resolve(),)), data)


def _read_one_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; pass a YAML config (see configs/)") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping of keys to values, found {type(data).__name__}")
    return data


def _set_path(data: dict, key: str, value: Any, where: str) -> None:
    """``data[a][b] = value`` for ``key = "a.b"`` (sections created as needed)."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"{where}: {p!r} is not a section")
    node[parts[-1]] = value


def resolve_config(cls: type[T], path: str | Path | None = None, overrides=(), explicit: dict | None = None,
                   complete: Callable[[dict], dict] | None = None) -> T:
    """``cls`` from defaults < YAML ``path`` < ``overrides`` (``key=value`` strings, values
    parsed as YAML) < ``explicit`` (dotted key -> value, taken as is; None = not given).
    ``complete`` fills in the merged mapping before it is validated (e.g. what a starting
    checkpoint decides, ``train.config.complete_from_init``)."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides), where="--set")
    for key, value in (explicit or {}).items():
        if value is not None:
            _set_path(data, key, value, f"option {key}")
    if complete is not None:
        data = complete(data)
    return from_dict(cls, data, str(path) if path is not None else "config")


def load_config(cls: type[T], path: str | Path | None = None, overrides=()) -> T:
    """Load ``cls`` from a YAML file (or defaults) plus ``key=value`` overrides."""
    return resolve_config(cls, path, overrides)
