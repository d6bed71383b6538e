"""Configuration files: a run's YAML, a hospital's site file, and the ``config.yaml`` a run folder keeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from amlp_core.atomic import atomic_write_text
from amlp_core.config.parsing import build_config, section_updates
from amlp_core.config.schema import SITE_KEYS, SITE_REQUIRED, Config, SiteConfig
from amlp_core.errors import ConfigError
from amlp_core.reading import read_text


def _read_yaml(path: Path, what: str) -> Mapping[str, Any]:
    """A YAML mapping from ``path``; ConfigError naming the file otherwise."""
    text = read_text(path, what, ConfigError)  # a regular file of bounded size: never a FIFO or /dev/zero
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ConfigError(
            f"{what} {path} is not valid YAML{at}: {getattr(e, 'problem', None) or type(e).__name__}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be a configuration") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, base: Config | None = None) -> Config:
    """Read a YAML config file on top of ``base`` (the schema's defaults when None), apply flat overrides,
    validate."""
    cfg = build_config(_read_yaml(Path(path), "config file"), base=base)
    return build_config(overrides, base=cfg) if overrides else cfg


def read_site_file(path: str | Path) -> dict[str, Any]:
    """A hospital's site YAML as flat keys (only :data:`SITE_KEYS`), each of :data:`SITE_REQUIRED` set.

    Raises:
        ConfigError: unreadable file, a key a site may not set, or a required key missing, naming both.
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
    missing = [key for key in SITE_REQUIRED if not flat.get(key)]
    if missing:
        raise ConfigError(f"site file {path} must set {' and '.join(missing)}: a site never takes them from the run")
    return flat


def apply_site_file(cfg: Config, path: str | Path) -> Config:
    """The run's config with a hospital's site file applied: the run's own ``site`` section (the site's
    terms) is dropped first, so that only the site decides them (:func:`read_site_file`)."""
    base = cfg.replace(site=dataclasses.asdict(SiteConfig()))
    return build_config(read_site_file(path), base=base)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
