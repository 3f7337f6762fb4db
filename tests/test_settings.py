"""GenerationSettings: checked once, defaults from the engine, round trips through the store record and the UI."""

import dataclasses

import pytest

from app.settings import FIELDS, NAMES, RANDOM_SEED, GenerationSettings, SettingsError
from engine.generation import SamplingParams


def test_from_dict_converts_and_defaults():
    settings = GenerationSettings.from_dict({"temperature": "0.7", "top_k": 40.0, "seed": "", "system_prompt": "  "})
    assert settings.sampling() == SamplingParams(temperature=0.7, top_k=40) and settings.system_prompt is None
    settings = GenerationSettings.from_dict({"seed": 3, "system_prompt": "Be brief."})
    assert settings.sampling().seed == 3 and settings.system_prompt == "Be brief."
    assert GenerationSettings.from_dict({"top_k": None}) == GenerationSettings.from_dict(None) == GenerationSettings()
    assert type(GenerationSettings.from_dict({"max_new_tokens": 512.0}).max_new_tokens) is int


@pytest.mark.parametrize("values, message", [
    ({"seed": -1}, "Setting seed must be a whole number ≥ 0 (or empty for a random seed)."),
    ({"seed": -5}, "Setting seed must be a whole number ≥ 0 (or empty for a random seed)."),
    ({"seed": 1.5}, "Setting seed must be a whole number, got 1.5."),
    ({"temperature": True}, "Setting temperature must be a number, got True."),
    ({"temperature": "hot"}, "Setting temperature must be a number, got 'hot'."),
    ({"top_p": float("nan")}, "Setting top_p must be a finite number, got nan."),
    ({"max_new_tokens": 2.5}, "Setting max_new_tokens must be a whole number, got 2.5."),
    ({"top_p": 0}, "Invalid setting: top_p must be in (0, 1]."),
    ({"max_new_tokens": 0}, "Invalid setting: max_new_tokens must be ≥ 1."),
    ({"temperature": -0.1}, "Invalid setting: temperature must be ≥ 0."),
    ({"system_prompt": 3}, "Setting system_prompt must be text."),
    ({"tempreature": 1, "seeds": 2}, "Unknown setting(s): seeds, tempreature. Known settings: temperature, top_p, "
                                     "top_k, max_new_tokens, repetition_penalty, seed, system_prompt."),
    ([("temperature", 1)], "Settings must be a dict of setting names to values, got list."),
])
def test_bad_settings_are_refused_by_name(values, message):
    with pytest.raises(SettingsError) as raised:
        GenerationSettings.from_dict(values)
    assert str(raised.value) == message
    assert isinstance(raised.value, ValueError)


def test_the_constructor_checks_too():
    with pytest.raises(SettingsError, match="top_p"):
        GenerationSettings(top_p=1.5)
    with pytest.raises(SettingsError, match="seed"):
        dataclasses.replace(GenerationSettings(), seed=-2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationSettings().temperature = 1.0


def test_defaults_are_the_engines():
    assert GenerationSettings().sampling() == SamplingParams()
    assert GenerationSettings().system_prompt is None


def test_to_dict_is_the_stored_record_and_reads_back():
    settings = GenerationSettings(temperature=0.5, top_k=7, seed=11, system_prompt="Terse.")
    record = settings.to_dict()
    assert record == {"temperature": 0.5, "top_p": 1.0, "top_k": 7, "max_new_tokens": 512,
                      "repetition_penalty": 1.0, "seed": 11, "system_prompt": "Terse."}
    assert GenerationSettings.from_dict(record) == settings
    assert GenerationSettings.from_dict(GenerationSettings().to_dict()) == GenerationSettings()
    assert GenerationSettings.from_sampling(settings.sampling(), "Terse.") == settings


def test_coerce():
    settings = GenerationSettings(temperature=0.3)
    assert GenerationSettings.coerce(settings) is settings
    assert GenerationSettings.coerce({"temperature": 0.3}) == settings
    assert GenerationSettings.coerce(None) == GenerationSettings()
    with pytest.raises(SettingsError, match="Unknown setting"):
        GenerationSettings.coerce({"temp": 0.3})


def test_ui_values_map_random_seed_and_empty_prompt():
    ui = GenerationSettings().to_ui()
    assert ui["seed"] == RANDOM_SEED == -1 and ui["system_prompt"] == ""
    assert GenerationSettings.from_ui(ui) == GenerationSettings()
    assert GenerationSettings.from_ui({**ui, "seed": -1.0}).seed is None  # a number box may hand over floats
    chosen = GenerationSettings(seed=42, system_prompt="Be brief.", max_new_tokens=64)
    assert GenerationSettings.from_ui(chosen.to_ui()) == chosen
    with pytest.raises(SettingsError, match="≥ 0"):
        GenerationSettings.from_ui({"seed": -5})
    with pytest.raises(SettingsError, match="≥ 0"):
        GenerationSettings.from_dict({"seed": RANDOM_SEED})  # only the UI's reading knows the convention


def test_fields_describe_every_setting_for_the_ui():
    assert tuple(f.name for f in FIELDS) == NAMES == tuple(f.name for f in dataclasses.fields(GenerationSettings))
    defaults = GenerationSettings().to_ui()
    assert len({f.elem_id for f in FIELDS}) == len(FIELDS)
    for f in FIELDS:
        assert f.label and f.elem_id and f.control in ("slider", "number", "textbox")
        assert f.default == defaults[f.name]
        if f.control == "slider":
            assert f.minimum <= f.default <= f.maximum and f.step > 0
            # Every value a slider can produce is accepted.
            GenerationSettings.from_ui({**defaults, f.name: f.minimum})
            GenerationSettings.from_ui({**defaults, f.name: f.maximum})
    seed = FIELDS[NAMES.index("seed")]
    assert seed.control == "number" and seed.minimum == RANDOM_SEED == seed.default and "random" in seed.info
