"""Config: starter files, validation messages that name the field, overrides, YAML round trips."""

import json

import pytest
import yaml

from conjure.config import (
    CONFIG_TYPES,
    ConfigError,
    apply_overrides,
    config_schema,
    dump_config,
    load_config,
    parse_config,
    starter_yaml,
)


def minimal(**sections):
    data = {
        "type": "textual_inversion",
        "basic": {"base_model": "m"},
        "data": {"source": "d"},
        "textual_inversion": {"placeholder_token": "<t>", "initializer": "cat"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


@pytest.mark.parametrize("type_name", list(CONFIG_TYPES))
def test_starter_yaml_parses_and_round_trips(type_name):
    config = parse_config(yaml.safe_load(starter_yaml(type_name)))
    again = parse_config(yaml.safe_load(dump_config(config)))
    assert again == config


@pytest.mark.parametrize("type_name", list(CONFIG_TYPES))
def test_schema_is_json_with_descriptions(type_name):
    schema = json.loads(config_schema(type_name))
    basic = schema["$defs"]["BasicConfig"]["properties"]
    assert "Hub id" in basic["base_model"]["description"]


def test_unknown_key_is_named_with_suggestion():
    msg = error_of(minimal(data={"resolutoin": 512}))
    assert "data.resolutoin: unknown key (did you mean 'resolution'?)" in msg


def test_unknown_section_is_named_with_suggestion():
    data = minimal()
    data["optimiser"] = {}
    assert "optimiser: unknown key (did you mean 'optimizer'?)" in error_of(data)


def test_wrong_type_names_field_and_value():
    msg = error_of(minimal(data={"batch_size": "four"}))
    assert "data.batch_size" in msg and "'four'" in msg


def test_every_problem_is_reported():
    msg = error_of(minimal(data={"batch_size": 0, "resolution": 100}))
    assert "data.batch_size" in msg and "data.resolution" in msg


def test_missing_required_field():
    data = minimal()
    del data["textual_inversion"]["initializer"]
    assert "textual_inversion.initializer: required" in error_of(data)


def test_type_missing_and_unknown():
    assert "type: missing" in error_of({"basic": {}})
    assert "did you mean 'textual_inversion'" in error_of({"type": "textual_inversoin"})
    assert "did you mean 'sd_textual_inversion'" in error_of({"type": "sd_textual_inversoin"})  # version 1 names too


def test_steps_and_epochs_are_exclusive():
    assert "exactly one of basic.max_train_steps" in error_of(minimal(basic={"max_train_epochs": 3}))
    config = parse_config(minimal(basic={"max_train_epochs": 3, "max_train_steps": None}))
    assert config.basic.max_train_epochs == 3


def test_placeholder_must_be_one_word():
    assert "textual_inversion.placeholder_token: must be one word" in error_of(
        minimal(textual_inversion={"placeholder_token": "my style"})
    )


def test_validation_prompts_default_to_the_placeholder():
    config = parse_config(minimal(textual_inversion={"caption_preset": "style"}))
    assert config.validation.prompts and all("<t>" in p for p in config.validation.prompts)
    assert "style" in config.validation.prompts[0]


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides(minimal(), ["data.resolution=512", "validation.prompts=[a <t>, b]", "optimizer.learning_rate=1e-3"])
    config = parse_config(data)
    assert config.data.resolution == 512
    assert config.validation.prompts == ["a <t>", "b"]
    assert config.optimizer.learning_rate == 1e-3


def test_override_errors_are_clear():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides(minimal(), ["data.resolution"])
    with pytest.raises(ConfigError, match="basic.base_model is a value, not a section"):
        apply_overrides(minimal(), ["basic.base_model.x=1"])


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("basic:\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad.yaml line \d+"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_load_config_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert load_config(path, ["basic.seed=7"]).basic.seed == 7


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_seed_is_bounded(seed):
    # 2**70 used to pass and end in "unexpected ValueError: Overflow when unpacking long long" at the first step
    assert "basic.seed" in error_of(minimal(basic={"seed": seed}))


def test_seed_bounds_are_usable():
    assert parse_config(minimal(basic={"seed": 2**32 - 1})).basic.seed == 2**32 - 1


@pytest.mark.parametrize(
    "section, key",
    [("optimizer", "learning_rate"), ("optimizer", "weight_decay"), ("optimizer", "adam_epsilon"),
     ("advanced", "max_grad_norm"), ("advanced", "min_snr_gamma"), ("validation", "guidance_scale")],
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_must_be_finite(section, key, value):
    assert f"{section}.{key}: Input should be a finite number" in error_of(minimal(**{section: {key: value}}))


def test_learning_rates_of_every_method_must_be_finite():
    lora = {"type": "lora", "basic": {"base_model": "m"}, "data": {"source": "d"}}
    for key in ("unet_learning_rate", "text_encoder_learning_rate", "alpha"):
        assert f"lora.{key}: Input should be a finite number" in error_of({**lora, "lora": {key: float("inf")}})
    pivotal = {**lora, "type": "pivotal",
               "textual_inversion": {"placeholder_token": "<t>", "initializer": "cat", "learning_rate": float("inf")}}
    assert "textual_inversion.learning_rate: Input should be a finite number" in error_of(pivotal)


@pytest.mark.parametrize("name", ["../../escape", "/abs/run", "a/b", "a\\b", "..", ".", ".hidden", "", " "])
def test_run_name_is_a_plain_folder_name(name):
    assert "basic.run_name: a plain folder name" in error_of(minimal(basic={"run_name": name}))


def test_run_name_may_hold_spaces_dots_and_unicode():
    assert parse_config(minimal(basic={"run_name": "rün 1.5 ⭐"})).basic.run_name == "rün 1.5 ⭐"


def lora_minimal(family="auto", **advanced):
    return {"type": "lora", "basic": {"base_model": "m", "family": family}, "data": {"source": "d"},
            "advanced": advanced}


@pytest.mark.parametrize("setting, value", [("prediction_type", "v_prediction"), ("min_snr_gamma", 5.0),
                                            ("noise_offset", 0.05)])
def test_ddpm_settings_are_refused_on_a_named_flow_family(setting, value):
    msg = error_of(lora_minimal("flux", **{setting: value}))
    assert f"advanced.{setting}: is for SD 1.x, 2.x and SDXL (the DDPM objective), and FLUX.1 trains with flow " \
        "matching; set it to" in msg
    parse_config(lora_minimal("sd1", **{setting: value}))  # where it applies


@pytest.mark.parametrize("setting, value", [("timestep_sampling", "uniform"), ("logit_mean", 0.5),
                                            ("logit_std", 2.0), ("loss_weighting", "cosmap"), ("guidance", 3.5),
                                            ("base_weights_dtype", "float8")])
def test_flow_settings_are_refused_on_a_named_ddpm_family(setting, value):
    for family in ("sd1", "sd2", "sdxl"):
        assert f"advanced.{setting}: is for FLUX.1 (flow matching), and" in error_of(lora_minimal(family, **{setting: value}))
    parse_config(lora_minimal("flux", **{setting: value}))
    parse_config(lora_minimal("auto", **{setting: value}))  # checked at load, once the family is known


def test_clip_skip_is_refused_on_flux():
    assert "advanced.clip_skip: FLUX.1 reads fixed text-encoder layers" in error_of(lora_minimal("flux", clip_skip=2))


def test_flux_is_a_lora_family_only():
    assert parse_config(lora_minimal("flux")).basic.family == "flux"
    assert "basic.family: textual_inversion trains sd1 and sd2 and sdxl models, not flux" in error_of(
        minimal(basic={"family": "flux"}))


def test_flow_settings_defaults_and_help():
    advanced = parse_config(lora_minimal()).advanced
    assert (advanced.timestep_sampling, advanced.logit_mean, advanced.logit_std, advanced.loss_weighting,
            advanced.guidance, advanced.base_weights_dtype) == ("logit_normal", 0.0, 1.0, "none", 1.0, "auto")
    fields = json.loads(config_schema("lora"))["$defs"]["AdvancedConfig"]["properties"]
    assert "de-distilled" in fields["guidance"]["description"]
    assert "conjure[float8]" in fields["base_weights_dtype"]["description"]
    assert "conjure[bnb]" in fields["base_weights_dtype"]["description"]
    for name, value in (("logit_std", 0), ("guidance", -1), ("timestep_sampling", "normal"),
                        ("base_weights_dtype", "int8")):
        assert f"advanced.{name}" in error_of(lora_minimal(**{name: value}))
