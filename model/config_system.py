"""The project's one config system: dataclasses loaded from YAML with dotted overrides.

Every config is a dataclass deriving from `Config`; every field is declared with
`knob(default, doc)` so it has a default and a one-line doc. Loading is strict: an
unknown key, a value of the wrong type or a value outside a `Literal[...]` choice is a
one-line `ConfigError` naming the key (and the file when there is one).

    cfg = load_config(ExperimentConfig, "configs/x.yaml", ["model.dim=256"])
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key (and file)."""


class InputMissing(FileNotFoundError):
    """A file or folder the user named (in a config, an option) is missing; the message names it.
    Entry points print it as one line (exit 2); any other FileNotFoundError is a bug with a traceback."""


def knob(default: Any, doc: str, key: str = "") -> Any:
    """A config field with a default and a one-line doc (shown by `describe`). `key`: its name in
    YAML, overrides and `to_dict` when that is no Python name (`checkpoint.async`)."""
    metadata = {"doc": doc, "key": key} if key else {"doc": doc}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(**dataclasses.asdict(d))) if dataclasses.is_dataclass(default) \
            else (lambda d=default: type(d)(d))
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _key(f: dataclasses.Field) -> str:
    """A field's name in YAML and overrides."""
    return f.metadata.get("key") or f.name


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + "|".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_value(tp: Any, value: Any, key: str) -> Any:
    """Return `value` coerced to `tp` (int -> float only), or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(args[0], value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return [_check_value(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


@dataclasses.dataclass
class Config:
    """Base of every config dataclass: strict construction, dict/YAML round-trip."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(hints[f.name], getattr(self, f.name), f.name))

    @classmethod
    def from_dict(cls, data: dict, prefix: str = ""):
        """Build from a (possibly partial) mapping; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        names = {_key(f): f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
        kwargs = {names[k]: _check_value(hints[names[k]], v, prefix + k) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}") from None

    def to_dict(self) -> dict:
        """Nested plain values by YAML key: `from_dict` reads it back."""
        def plain(v):
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {_key(f): plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[last] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['model.dim=256', 'train.lr=3e-4'] -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads '3e-4' as a string
        _set_dotted(tree, key.strip(), value)
    return tree


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _merge(base, extra: dict):
    """Overrides into a YAML tree; a numeric key indexes into a list (`data.datasets.0.path=...`)."""
    if isinstance(base, list):
        out = list(base)
        for k, v in extra.items():
            if not (k.isdigit() and int(k) < len(out)):
                raise ConfigError(f"override index '{k}': the list has {len(out)} entries")
            out[int(k)] = _merge(out[int(k)], v) if isinstance(v, dict) else v
        return out
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), (dict, list)) else v
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()):
    """Load `cls` from a YAML file (optional) plus dotted overrides; errors name key and file."""
    data: dict = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    try:
        data = _merge(data, parse_overrides(list(overrides)))
        return cls.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per knob: 'dotted.key = default  # doc' (for --help-config)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{_key(f)} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines
