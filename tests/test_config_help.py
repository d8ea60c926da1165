"""`fedmeta config` lists every run-configuration key with its default, range and meaning."""

from __future__ import annotations

import tomllib

from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.config import RunConfig
from fedmeta.config_help import as_toml, config_keys


def test_every_key_is_listed_with_a_meaning() -> None:
    keys = config_keys()
    assert [k.key for k in keys] == list(RunConfig().to_flat())
    assert [k.key for k in keys if not k.meaning] == []
    by_key = {k.key: k for k in keys}
    assert by_key["rounds"].allowed == "integer >= 1, <= 100000"
    assert by_key["accountant"].allowed == "prv | rdp | gdp"
    assert by_key["fraction-train"].allowed == "number > 0.0, <= 1.0"


def test_the_toml_listing_is_the_default_config() -> None:
    text = as_toml(config_keys())
    assert RunConfig.from_flat(tomllib.loads(text)) == RunConfig()


def test_the_command_prints_every_key(tmp_path) -> None:
    result = CliRunner().invoke(app, ["config"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for key in RunConfig().to_flat():
        assert key in result.output
    toml = CliRunner().invoke(app, ["config", "--toml"])
    assert toml.exit_code == 0 and RunConfig.from_flat(tomllib.loads(toml.output)) == RunConfig()
