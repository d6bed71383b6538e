"""The Flower app's run configuration is the product's one config schema, nothing more or less."""

import tomllib
from pathlib import Path

import pytest
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


def test_the_run_config_is_generated_and_up_to_date(tmp_path):
    """pyproject.toml's run config is exactly what server/app_config.py generates; the generator mends a
    stale file and its --check says so."""
    from server.app_config import MARKER, current, main, render

    text = (REPO / "pyproject.toml").read_text()
    assert current(text) == render(), "pyproject.toml's run configuration is stale: run python -m server.app_config"
    stale = tmp_path / "pyproject.toml"
    stale.write_text(text.replace("semi_paste_weight = 0.5", "semi_paste_weight = 0.7"))
    assert main(["--check", "--pyproject", str(stale)]) == 1
    assert "semi_paste_weight = 0.7" in stale.read_text()  # --check changes nothing
    assert main(["--pyproject", str(stale)]) == 0
    assert stale.read_text() == text and main(["--check", "--pyproject", str(stale)]) == 0
    assert text.index(MARKER) > text.index("[tool.flwr.app.components]")  # the rest of the file is kept


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
    assert cfg.federation.sites == Config().federation.sites == 3  # one default: the schema's
    assert cfg.data.synthetic_cases == EMBEDDED_RUN["data.synthetic_cases"] != Config().data.synthetic_cases
    assert cfg.model.img_size == EMBEDDED_RUN["model.img_size"]
    plain = simulate_config(build_parser().parse_args(["simulate"]))
    assert flat_dict(plain) == flat_dict(build_config(_app_config()))


@pytest.mark.slow  # over 5 s (real processes or a long run)
def test_app_bundle_holds_the_code_and_nothing_else():
    import io
    import zipfile

    fab = build_fab_from_disk(REPO)
    assert len(fab) < 10 * 1024 * 1024
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server/app.py" in names and "client/app.py" in names and "amlp_core/models/vit.py" in names
    assert not [n for n in names if n.startswith(("tests/", "simulations/", "deploy/", "runs/", ".venv/"))]
