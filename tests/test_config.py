"""Config loading and overrides: every experiment builds, and bad input fails clearly."""

import pytest

from solo.experiments import (
    ConfigError,
    apply_overrides,
    available,
    base,
    from_json,
    load_config,
    to_json,
)


@pytest.mark.parametrize("name", available())
def test_every_experiment_builds_with_a_documented_docstring(name):
    import importlib

    config = load_config(name)
    module = importlib.import_module(f"solo.experiments.{name}")
    doc = module.__doc__ or ""
    assert "Command:" in doc and "Runtime:" in doc and "Expect:" in doc, name
    assert f"solo train {name}" in doc
    # Every key of the experiment exists in base: experiments only override, never invent.
    base_keys = set(_flat(base.get_config()))
    extra = (
        set(_flat(config)) - base_keys - {k for k in _flat(config) if k.startswith("objectives.")}
    )
    assert not extra, extra


def _flat(c, prefix=""):
    from solo.experiments import flat_keys

    return flat_keys(c, prefix)


def test_overrides_cast_to_the_existing_type():
    c = base.get_config()
    apply_overrides(
        c,
        [
            "--config.model.d_model=96",
            "--config.optim.lr=1",
            "config.train.parallel=pmap",
            "--config.model.scan_layers=false",
        ],
    )
    assert c.model.d_model == 96 and isinstance(c.model.d_model, int)
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.parallel == "pmap"
    assert c.model.scan_layers is False


def test_unknown_key_names_the_nearest_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle'.*model\.d_model"):
        apply_overrides(base.get_config(), ["--config.model.d_modle=3"])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.num_layers.*int"):
        apply_overrides(base.get_config(), ["--config.model.num_layers=two"])
    with pytest.raises(ConfigError, match="bool"):
        apply_overrides(base.get_config(), ["--config.model.scan_layers=maybe"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found.*gpt_world"):
        load_config("gpt_wrold")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match=r"bad\.py:1: syntax error"):
        load_config(str(bad))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(str(empty))


def test_json_round_trip_preserves_values():
    c = load_config("bert_world")
    back = from_json(to_json(c))
    assert back.model.kind == "encoder" and back.objectives.nsp.weight == c.objectives.nsp.weight
    assert to_json(back) == to_json(c)
    assert back.to_dict().keys() == c.to_dict().keys()
