"""Raw settings (YAML mappings, ``section.key=value`` strings, Flower's run config) to a validated
:class:`~amlp_core.config.schema.Config`, and back to flat keys."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amlp_core.config.schema import SECTIONS, Config
from amlp_core.errors import ConfigError


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert one raw value (YAML, CLI string, Flower run config) to the field's type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid {key}={value!r}: expected a list of numbers")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(key, v, item_type) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"invalid {key}={value!r}: expected true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"invalid {key}={value!r}: expected a number, not true or false")
        try:
            number = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"invalid {key}={value!r}: expected a finite {annotation.__name__}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"invalid {key}={value!r}: expected an integer")
        if annotation is float and not math.isfinite(number):  # finetune_lr=inf once trained to NaN weights
            raise ConfigError(f"invalid {key}={value!r}: must be a finite number")
        return number
    if annotation is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"invalid {key}={value!r}: expected a string")
        return str(value)
    return value


def section_updates(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Split flat ``section.field`` keys and nested sections into per-section dicts."""
    out: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, Mapping):
            for sub, v in value.items():
                out[key][str(sub).replace("-", "_")] = v
            continue
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(
                f"unknown configuration key {key!r}: expected section.field with section one of {', '.join(SECTIONS)}"
            )
        out[section][name] = value
    return out


def build_section(name: str, values: Mapping[str, Any]) -> Any:
    """One section on its own (e.g. the model config stored in a checkpoint), validated."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ConfigError(f"unknown configuration key '{name}.{sorted(unknown)[0]}'")
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def check_keys(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``raw`` split into sections (:func:`_section_updates`), every key known; values are checked when
    the config is built.

    Raises:
        ConfigError: naming the first unknown key and the section's valid ones.
    """
    sections = section_updates(raw)
    for name, updates in sections.items():
        hints = typing.get_type_hints(SECTIONS[name])
        for key in updates:
            if key not in hints:
                valid = ", ".join(f.name for f in dataclasses.fields(SECTIONS[name]))
                raise ConfigError(f"unknown configuration key '{name}.{key}'; valid keys: {valid}")
    return sections


def build_config(raw: Mapping[str, Any] | None = None, base: Config | None = None) -> Config:
    """Build a validated :class:`Config` from a nested or flat mapping, on top of ``base``.

    Raises:
        ConfigError: for an unknown key, a value of the wrong type or out of range.
    """
    base = base or Config()
    sections = {}
    for name, updates in check_keys(raw or {}).items():
        hints = typing.get_type_hints(SECTIONS[name])
        current = getattr(base, name)
        coerced = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in updates.items()}
        sections[name] = dataclasses.replace(current, **coerced) if coerced else current
    return Config(**sections)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """``{"section.field": value}`` with tuples as ``"a,b,c"`` strings: the Flower run-config form."""
    out = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out
