"""Config dataclasses from YAML plus ``key=value`` overrides (TRL-style fields with help text).

A run's config is a tree of dataclasses. :func:`load_config` fills it from a YAML file, then applies
command-line overrides such as ``train.max_steps=200`` or ``objective.w_min=3``. Unknown keys are an
error that names the key and the closest valid ones: a typo must never be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "load_config", "config_from_dict", "config_to_dict", "apply_overrides", "help_text"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclasses."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans (only true/false) and floats (``1e-4`` too). PyYAML's 1.1 rules also read
    yes/no/on/off as booleans, which turned ``mixed_precision: no`` (accelerate's spelling) into ``False``."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 exponent floats: YAML 1.1 wants a dot and a signed exponent, so it reads 1e-4 and 1.5e3 as
# strings, in files and overrides alike.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys, so a repeated `train:` section silently dropped the first one.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: construct_mapping merges those
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the default constructor reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                    f"found the key {key!r} twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type (int -> float is allowed, nothing else implicit)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        value = {} if value is None else value  # an empty section (`train:` alone) keeps the defaults
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of its keys, got {value!r}")
        return config_from_dict(tp, value, prefix=f"{where}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # No setting has a use for nan or inf, and they fail far from the key (nan betas in AdamW, a nan loss).
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        hint = " (put the value in quotes to keep it as text)" if tp is str else ""
        raise ConfigError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}{hint}")
    return value


def config_from_dict(cls: type[C], data: dict, prefix: str = "", base: C | None = None) -> C:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise :class:`ConfigError`. Keys the dict lacks
    keep their values in ``base`` (default: ``cls``'s defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown(str(key), list(types_), prefix)
        tp, factory = types_[key], factories[key]
        section = dataclasses.is_dataclass(tp) and (value is None or isinstance(value, dict))
        if section and factory is not dataclasses.MISSING:
            # A section starts from its field's default, not its class's: LCD's train.output_dir is outputs/lcd
            # whichever other train keys are given.
            kwargs[key] = config_from_dict(tp, value, f"{prefix}{key}.", base=factory())
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def config_to_dict(config) -> dict:
    """The plain-dict form of a config (what :func:`load_config` reads back)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML (``3``, ``1e-4``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section in the file (`train:` alone)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None)
            raise ConfigError(f"override {item!r}: the value is not valid YAML (put text in quotes): "
                              f"{str(e).splitlines()[0]}{f' ({problem})' if problem else ''}") from e
    return data


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> C:
    """Load ``cls`` from a YAML file (optional) and ``key=value`` overrides.

    Args:
        cls: the top-level config dataclass.
        path: YAML file; missing keys keep their defaults.
        overrides: ``section.key=value`` strings applied after the file.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: unknown keys, wrong types, or values that fail validation.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        try:
            data = _yaml(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must be a mapping of config sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    return config_from_dict(cls, data)


def help_text(cls, prefix: str = "", defaults: Any = None) -> str:
    """One line per key with its default and help, for ``--help-config``. Defaults are read from ``cls()`` (a
    section's default can differ from its class's, e.g. a run's own ``train.output_dir``)."""
    if defaults is None:
        defaults = cls()
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(help_text(tp, f"{prefix}{f.name}.", getattr(defaults, f.name)))
            continue
        lines.append(f"  {prefix}{f.name} = {getattr(defaults, f.name)!r}    {f.metadata.get('help', '')}")
    return "\n".join(lines)
