"""Typed configs: nested dataclasses <-> YAML, dotted ``key.sub=value`` overrides, validation.

Configs validate themselves in ``__post_init__`` with :func:`check_range` / :func:`check_choice`
/ :func:`check_positive`; :func:`load_config` builds one from ``base`` < YAML file < overrides via
:func:`from_dict`; :func:`save_config` writes it next to checkpoints; :func:`diff_configs` guards
resumes. Every error is a ``ValueError`` naming the dotted field and the value (type mismatches
raise :class:`ConfigTypeError`, also a ``TypeError``). Standard library + pyyaml only (no torch).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import numbers
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Callable, Any, Literal, Union

import yaml

# YAML 1.1 (PyYAML) reads "1e-4" and "1.0e5" as strings; YAML 1.2 reads them as floats.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves exponent floats without a dot (``1e-4``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


class ConfigTypeError(TypeError, ValueError):
    """A config value has the wrong type (catchable as either TypeError or ValueError)."""


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Any:
    """Raise ``ValueError("name must be in [lo, hi), got value")`` unless ``value`` lies in the
    interval (``None`` bound = unbounded). ``integer=True`` also rejects non-ints and bools.
    NaN and non-numbers are always rejected. Returns ``value``."""
    interval = (f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else lo}, "
                f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
    ok = isinstance(value, int if integer else numbers.Real) and not isinstance(value, bool)
    ok = ok and value == value  # NaN fails every comparison
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        kind = "an integer in" if integer else "in"
        raise ValueError(f"{name} must be {kind} {interval}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Raise ``ValueError("name must be one of ['a', 'b'], got 'c'")`` unless ``value`` is one
    of ``choices``. Returns ``value``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices!r}, got {value!r}")
    return value


def check_positive(name: str, value: Any, integer: bool = False) -> Any:
    """``check_range(name, value, 0, None, lo_open=True, integer=integer)``: strictly > 0."""
    return check_range(name, value, 0, None, lo_open=True, integer=integer)


def _bad(path: str, value: Any, tp: Any) -> ConfigTypeError:
    expected = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    return ConfigTypeError(f"{path or 'config'}: expected {expected}, got {value!r} "
                           f"({type(value).__name__})")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and coerce it where that is lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # Optional[X]: let X's (more precise) error through
            return _convert(value, options[0], path)
        if any(type(value) is a for a in options):
            return value
        for option in options:
            try:
                return _convert(value, option, path)
            except (TypeError, ValueError):
                pass
        raise _bad(path, value, tp)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigTypeError(f"{path}: must be one of {list(args)!r}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, path=path)
        raise _bad(path, value, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        fixed = origin is tuple and args and args[-1] is not Ellipsis  # not tuple[X, ...]
        if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
            raise _bad(path, value, tp)
        item_types = args if fixed else (args[:1] or (Any,)) * len(value)
        items = [_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(path, value, tp)
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, f"{path}.{k}"): _convert(v, vt, f"{path}.{k}")
                for k, v in value.items()}
    if tp is float or tp is int:
        if isinstance(value, str):  # "1e-4" from a YAML 1.1 loader
            try:
                value = float(value.strip())
            except ValueError:
                raise _bad(path, value, tp) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, value, tp)
        if tp is float:
            return float(value)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _bad(path, value, tp)
        return int(value)
    if tp is type(None) and value is None:
        return None
    if isinstance(tp, type):
        if type(value) is tp or (isinstance(value, tp) and tp not in (str, bool)):
            return value
        if issubclass(tp, PurePath) and isinstance(value, str):
            return tp(value)
    raise _bad(path, value, tp)


def from_dict(cls: type, data: Mapping[str, Any], *, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) mapping; ``path`` is the dotted prefix used in
    error messages. Unknown keys, missing required fields and type mismatches raise errors
    naming the dotted field; keys left out take the dataclass defaults."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise _bad(path, data, cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {(f'{path}.' if path else '') + close[0]!r}?" if close else ""
            under = f" under {path!r}" if path else ""
            raise ValueError(f"unknown config key {dotted!r}{hint} "
                             f"(allowed keys{under}: {list(fields)})")
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing required config field {dotted!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation: say where in the tree it happened
        if not path:
            raise
        raise ValueError(f"{path}: {e}") from e


def _is_instance_of_dataclass(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _plain(obj: Any) -> Any:
    if _is_instance_of_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return str(obj) if isinstance(obj, PurePath) else obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass instance (or mapping) -> plain nested dict of YAML/JSON types (tuples -> lists)."""
    if not isinstance(obj, Mapping) and not _is_instance_of_dataclass(obj):
        raise TypeError(f"to_dict needs a dataclass instance or a mapping, got {obj!r}")
    return _plain(obj)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=3", "a.c=[1,2]", "name=foo"]`` -> ``{"a": {"b": 3, "c": [1, 2]}, "name": "foo"}``.
    Values are parsed as YAML (``1e-4`` is a float, ``x=`` is ``None``); later items win."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ValueError(f"bad override {item!r}: expected key.sub=value, e.g. train.lr=3e-5")
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ValueError(f"bad override {item!r}: cannot parse value: {e}") from e
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part.strip(), {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with "
                                 f"{'.'.join(parts[: i + 1])!r} set to a non-mapping value")
        node[parts[-1].strip()] = value
    return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: Iterable[str] | Mapping[str, Any] = (), *,
                base: Mapping[str, Any] | None = None) -> Any:
    """Build ``cls`` from ``base`` < YAML file at ``path`` < ``overrides`` (``key=value``
    strings or a nested dict). Errors from the file are prefixed with its path."""
    data = dict(base or {})
    overrides = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    if path is None:
        return from_dict(cls, merge(data, overrides))
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {os.fspath(path)!r}")
    try:
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as e:
            raise ValueError(f"invalid YAML: {e}") from e
        loaded = {} if loaded is None else loaded  # an empty file means "all defaults"
        if not isinstance(loaded, Mapping):
            raise ValueError(f"top level must be a mapping, got {type(loaded).__name__}")
        return from_dict(cls, merge(merge(data, loaded), overrides))
    except ValueError as e:  # keep ConfigTypeError; other ValueError subclasses -> ValueError
        kind = type(e) if type(e) in (ValueError, ConfigTypeError) else ValueError
        raise kind(f"{os.fspath(path)}: {e}") from e


def dump_config(cfg: Any) -> str:
    """YAML text of a config (dataclass or dict), fields in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None,
                          allow_unicode=True)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically (temp file in the same dir + ``os.replace``)."""
    text = dump_config(cfg)
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """Write a file so that a crash never leaves it half-written: ``write(f)`` fills a temporary
    binary file in the same directory, which is fsynced, made 0644 and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def diff_configs(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between two configs (dicts or dataclasses); a key present
    on one side only counts as different. NaN equals NaN, tuples equal lists."""
    def same(x: Any, y: Any) -> bool:  # NaN == NaN here
        return x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y)

    def walk(x: Mapping, y: Mapping, prefix: str) -> list[str]:
        out = []
        for key in [*x, *(k for k in y if k not in x)]:
            dotted = f"{prefix}{key}"
            if isinstance(x.get(key), Mapping) and isinstance(y.get(key), Mapping):
                out += walk(x[key], y[key], dotted + ".")
            elif key not in x or key not in y or not same(x[key], y[key]):
                out.append(dotted)
        return out

    return walk(to_dict(a), to_dict(b), "")
