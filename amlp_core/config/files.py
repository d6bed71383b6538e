"""Configuration files: a run's YAML, a hospital's site file, and the ``config.yaml`` a run folder keeps."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from amlp_core.atomic import atomic_write_text
from amlp_core.config.parsing import build_config, section_updates
from amlp_core.config.schema import SITE_KEYS, Config
from amlp_core.errors import ConfigError


def _read_yaml(path: Path, what: str) -> Mapping[str, Any]:
    """A YAML mapping from ``path``; ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, base: Config | None = None) -> Config:
    """Read a YAML config file on top of ``base`` (the schema's defaults when None), apply flat overrides,
    validate."""
    cfg = build_config(_read_yaml(Path(path), "config file"), base=base)
    return build_config(overrides, base=cfg) if overrides else cfg


def apply_site_file(cfg: Config, path: str | Path) -> Config:
    """Apply a hospital's site YAML (only :data:`SITE_KEYS`) on top of the run's config.

    Raises:
        ConfigError: unreadable file, or a key a site may not set, naming both.
    """
    path = Path(path)
    raw = _read_yaml(path, "site file")
    flat = {}
    for section, values in section_updates(raw).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    for key in flat:
        if key not in SITE_KEYS:
            raise ConfigError(
                f"site file {path} sets {key!r}, which the run decides; a site may set: {', '.join(SITE_KEYS)}"
            )
    return build_config(flat, base=cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
