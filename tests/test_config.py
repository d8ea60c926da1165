import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmeta.config import ConfigError, RunConfig


def test_defaults_round_trip_through_flat_dict(tmp_path):
    cfg = RunConfig(rounds=7, strategy="fedavg")
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg
    assert "inner-steps" in cfg.to_flat()


@pytest.mark.parametrize(
    "values, key",
    [
        ({"rounds": 0}, "rounds"),
        ({"strategy": "fedprox"}, "strategy"),
        ({"delta": 2}, "delta"),
        ({"no-such-key": 1}, "no-such-key"),
        ({"sites": 3, "min-sites": 5}, "min-sites"),
    ],
)
def test_invalid_values_give_one_line_error_naming_the_option(values, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(values, source="test")
    msg = str(err.value)
    assert "\n" not in msg and key in msg


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        RunConfig.load(bad)


@given(
    st.dictionaries(
        st.sampled_from(list(RunConfig().to_flat())),
        st.one_of(
            st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none()
        ),
    )
)
def test_arbitrary_values_either_validate_or_raise_config_error(values):
    try:
        cfg = RunConfig.from_flat(values)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        json.dumps(cfg.to_flat())


def test_declaration_states_what_the_run_does_about_dp(tmp_path):
    from fedmeta.config import run_declaration

    assert run_declaration(RunConfig()).dp_enabled is True
    off = run_declaration(RunConfig(dp=False))
    assert off.dp_enabled is False and off.allow_non_private is True
    with pytest.raises(ConfigError, match="target-epsilon"):
        run_declaration(RunConfig(target_epsilon=50.0))
    bad = tmp_path / "run.toml"
    bad.write_text('purpose = "nonsense"\n')
    from policies import DeclarationError

    with pytest.raises(DeclarationError, match="run.toml"):
        run_declaration(RunConfig(declaration=str(bad)))
