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


def test_run_config_is_the_schema_defaults_with_the_embedded_preset_value_for_value():
    """One set of defaults: pyproject.toml's run config restates the schema's defaults and the named
    EMBEDDED_RUN preset, and nothing else (a value changed in one place only fails here)."""
    from amlp_core.presets import EMBEDDED_RUN

    app, expected = _app_config(), flat_dict(build_config(EMBEDDED_RUN))
    differ = {k: (app[k], expected[k]) for k in expected if app[k] != expected[k]}
    assert not differ, f"pyproject.toml [tool.flwr.app.config] differs from the schema + EMBEDDED_RUN: {differ}"


def test_simulate_with_a_config_file_starts_from_the_embedded_run(tmp_path):
    """`fedamlp simulate --config FILE` lays the file over the app's embedded default run (not over the bare
    schema), then flags and --set over that."""
    from amlp_core.presets import EMBEDDED_RUN
    from fedamlp.cli import build_parser, simulate_config

    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  pretrain_rounds: 1\n")
    args = build_parser().parse_args(["simulate", "--config", str(path), "--set", "train.seed=7"])
    cfg = simulate_config(args)
    assert cfg.federation.pretrain_rounds == 1 and cfg.train.seed == 7
    assert cfg.federation.sites == EMBEDDED_RUN["federation.sites"] != Config().federation.sites
    assert cfg.model.img_size == EMBEDDED_RUN["model.img_size"]
    plain = simulate_config(build_parser().parse_args(["simulate"]))
    assert flat_dict(plain) == flat_dict(build_config(_app_config()))


def test_app_bundle_holds_the_code_and_nothing_else():
    import io
    import zipfile

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 10 * 1024 * 1024
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/app.py" in names and "client/app.py" in names and "amlp_core/models/vit.py" in names
    assert not [n for n in names if n.startswith(("tests/", "simulations/", "deploy/", "runs/", ".venv/"))]
