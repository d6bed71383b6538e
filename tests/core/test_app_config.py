"""The Flower app's run configuration is the product's one config schema, nothing more or less."""

import tomllib
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.config import flatten_dict

from amlp_core.config import Config, build_config, flat_dict

REPO = Path(__file__).resolve().parents[2]


def _app_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def test_run_config_has_exactly_the_schemas_keys():
    assert set(_app_config()) == set(flat_dict(Config()))


def test_run_config_builds_a_valid_config():
    cfg = build_config(_app_config())
    assert cfg.data.synthetic and cfg.federation.sites >= 2


def test_app_bundle_holds_the_code_and_nothing_else():
    import io
    import zipfile

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 10 * 1024 * 1024
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/app.py" in names and "client/app.py" in names and "amlp_core/models/vit.py" in names
    assert not [n for n in names if n.startswith(("tests/", "simulations/", "deploy/", "runs/", ".venv/"))]
