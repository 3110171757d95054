"""basic.memory_preset (conjure.config.presets): what each preset sets, what it leaves to the user and to the
config's rules, its machine-dependent part, and a run's record of what it chose."""

import pytest
import torch
import yaml

from conjure.config import dump_config, parse_config
from conjure.config.presets import PRESETS, apply_to_machine
from conjure.config.sections import OBJECTIVE_SETTINGS
from conjure.runs.events import read_events
from conjure.runs.folder import resume_changes
from conjure.train.loop import train


def lora(**sections):
    raw = {"type": "lora", "basic": {"base_model": "m"}, "data": {"source": "d"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_sets_the_options_a_config_leaves_unset(name):
    config = lora(basic={"memory_preset": name})
    preset = PRESETS[name]
    assert config.advanced.gradient_checkpointing is preset.gradient_checkpointing
    assert config.data.cache_latents == preset.cache_latents
    assert config.data.cache_text_encoder_outputs is True
    assert config.preset_choices["gradient_checkpointing"] == (preset.gradient_checkpointing,
                                                               f"basic.memory_preset {name}")


def test_no_preset_changes_nothing():
    assert lora() == lora(basic={"memory_preset": None}) and lora().preset_choices == {}
    assert lora().data.cache_latents == "off" and not lora().advanced.gradient_checkpointing


def test_an_option_set_in_the_config_wins_even_at_its_default():
    config = lora(basic={"memory_preset": "low_memory"}, advanced={"gradient_checkpointing": False},
                  data={"cache_latents": "off", "cache_text_encoder_outputs": False})
    assert not config.advanced.gradient_checkpointing and config.data.cache_latents == "off"
    assert not config.data.cache_text_encoder_outputs and config.preset_choices == {}


@pytest.mark.parametrize("sections, why", [
    ({"lora": {"train_text_encoder": True}}, "this run trains a text encoder"),
    ({"data": {"shuffle_caption_delimiter": ","}}, "captions are shuffled"),
])
def test_the_text_encoder_cache_is_left_off_where_the_config_refuses_it(sections, why):
    config = lora(basic={"memory_preset": "fast"}, **sections)  # valid: the preset set nothing refused
    assert not config.data.cache_text_encoder_outputs
    assert config.preset_choices["cache_text_encoder_outputs"] == (False, f"basic.memory_preset fast: {why}")


def test_textual_inversion_and_pivotal_train_the_text_encoder(ti_config, pivotal_config):
    for raw in (ti_config(basic={"memory_preset": "fast"}), pivotal_config(basic={"memory_preset": "fast"})):
        assert not parse_config(raw).data.cache_text_encoder_outputs


def test_the_latent_cache_is_left_off_with_a_random_crop():
    config = lora(basic={"memory_preset": "balanced"}, data={"center_crop": False})
    assert config.data.cache_latents == "off" and config.advanced.gradient_checkpointing


def test_a_resolved_preset_parses_back_to_the_same_options():
    config = lora(basic={"memory_preset": "balanced"})
    again = parse_config(yaml.safe_load(dump_config(config)))
    assert again == config and again.preset_choices == {}  # every option is written: nothing left to set


def test_on_the_cpu_low_memory_keeps_adamw_and_the_base_weights_and_says_so():
    config = lora(basic={"memory_preset": "low_memory"})
    flux, warning = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS["flow"], device=torch.device("cpu"))
    assert flux.optimizer.optimizer == "adamw" and flux.advanced.base_weights_dtype == "auto"
    assert warning == ("basic.memory_preset low_memory: this machine cannot run 8-bit AdamW (needs an NVIDIA GPU and "
                       "bitsandbytes; kept adamw) or nf4/float8 base weights (need a CUDA GPU and bitsandbytes or "
                       "torchao; kept auto)")
    assert flux.preset_choices["optimizer"] == ("adamw", "basic.memory_preset low_memory: no NVIDIA GPU with "
                                                         "bitsandbytes")
    _, warning = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS["ddpm"], device=torch.device("cpu"))
    assert "8-bit AdamW" in warning and "base weights" not in warning  # a UNet's weights stay in its precision
    for fast in ("fast", "balanced"):
        assert apply_to_machine(lora(basic={"memory_preset": fast}), objective_settings=OBJECTIVE_SETTINGS["flow"],
                                device=torch.device("cpu"))[1] is None


def test_on_a_cuda_gpu_low_memory_takes_8bit_adamw_and_the_first_base_weights_it_can(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    present = {"bitsandbytes": False, "torchao": True}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if present.get(name) else real(name, *a) if name not in present
                        else None)
    config = lora(basic={"memory_preset": "low_memory"})
    gpu = torch.device("cuda")
    out, warning = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS["flow"], device=gpu)
    assert out.advanced.base_weights_dtype == "float8"  # nf4 needs bitsandbytes
    assert out.optimizer.optimizer == "adamw" and "8-bit AdamW" in warning
    present["bitsandbytes"] = True
    out, warning = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS["flow"], device=gpu)
    assert (out.optimizer.optimizer, out.advanced.base_weights_dtype, warning) == ("adamw8bit", "nf4", None)
    assert config.optimizer.optimizer == "adamw"  # the config passed in is not changed
    mine = lora(basic={"memory_preset": "low_memory"}, optimizer={"optimizer": "prodigy"})
    assert apply_to_machine(mine, objective_settings=OBJECTIVE_SETTINGS["ddpm"], device=gpu)[0].optimizer.optimizer \
        == "prodigy"


def test_a_run_records_what_its_preset_chose(ti_config, capsys):
    raw = ti_config(basic={"memory_preset": "low_memory", "max_train_steps": 2, "validate_every_n_steps": None},
                    validation={"at_start": False})
    result = train(parse_config(raw))
    err = capsys.readouterr().err
    assert err.count("warning: basic.memory_preset low_memory: this machine cannot run 8-bit AdamW") == 1
    assert "gradient_checkpointing true, cache_latents memory" in err  # the start line
    start = read_events(result.run_dir / "events.jsonl").events[0]
    assert start["chosen"]["gradient_checkpointing"] == {"value": True, "from": "basic.memory_preset low_memory"}
    assert start["chosen"]["cache_text_encoder_outputs"] == {
        "value": False, "from": "basic.memory_preset low_memory: this run trains a text encoder"}
    assert start["chosen"]["optimizer"]["value"] == "adamw"
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["advanced"]["gradient_checkpointing"] is True and saved["data"]["cache_latents"] == "memory"
    # a resume with another preset: its options are compared one by one (these two may change)
    other = parse_config({**raw, "basic": {**raw["basic"], "memory_preset": "fast"}})
    changed = resume_changes(result.run_dir / "config.yaml", other)
    assert set(changed) >= {"basic.memory_preset", "advanced.gradient_checkpointing"}


def _fake_gpu_with_bitsandbytes(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("bitsandbytes", "torchao") else real(name, *a))
    return torch.device("cuda")


@pytest.mark.parametrize("type_name", ["lora", "textual_inversion", "pivotal"])
def test_a_preset_named_in_a_starter_config_applies(type_name, monkeypatch):
    """`conjure config new` writes every field, which would make each the user's: it leaves the preset's options
    commented out, and a config's dump (the web app's YAML, `config check --show`) leaves out the machine
    options a preset sets at run start."""
    from conjure.config import starter_yaml

    raw = yaml.safe_load(starter_yaml(type_name))
    raw["basic"]["memory_preset"] = "low_memory"
    if "textual_inversion" in raw:
        raw["textual_inversion"].update(placeholder_token="<t>", initializer="dog")
    config = parse_config(raw)
    assert config.advanced.gradient_checkpointing and config.data.cache_latents == "memory"
    dumped = yaml.safe_load(dump_config(config))
    assert "optimizer" not in dumped["optimizer"] and "base_weights_dtype" not in dumped["advanced"]
    again = parse_config(dumped)
    out, _ = apply_to_machine(again, objective_settings=OBJECTIVE_SETTINGS["ddpm"],
                              device=_fake_gpu_with_bitsandbytes(monkeypatch))
    assert out.optimizer.optimizer == "adamw8bit"
    assert yaml.safe_load(dump_config(out))["optimizer"]["optimizer"] == "adamw8bit"  # the run's config.yaml


def test_what_a_machine_could_not_run_is_pinned_for_a_resume_elsewhere(monkeypatch):
    config = lora(basic={"memory_preset": "low_memory"})
    on_cpu, _ = apply_to_machine(config, objective_settings=OBJECTIVE_SETTINGS["flow"], device=torch.device("cpu"))
    saved = yaml.safe_load(dump_config(on_cpu))  # as the run's config.yaml
    assert saved["optimizer"]["optimizer"] == "adamw" and saved["advanced"]["base_weights_dtype"] == "auto"
    later, _ = apply_to_machine(parse_config(saved), objective_settings=OBJECTIVE_SETTINGS["flow"],
                                device=_fake_gpu_with_bitsandbytes(monkeypatch))
    assert (later.optimizer.optimizer, later.advanced.base_weights_dtype) == ("adamw", "auto")
