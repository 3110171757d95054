"""Config types by method, family by detection: version 1 type names migrate (and say so), every starter config
parses, `basic.family` checks what depends on the family, and errors carry structured problems."""

import pytest
import yaml

from conjure.config import CONFIG_TYPES, ConfigError, Problem, dump_config, migrate, parse_config, starter_yaml
from conjure.config.migrate import LEGACY_TYPES
from conjure.config.textual_inversion import TextualInversionConfig

SECTIONS = {
    "textual_inversion": {"textual_inversion": {"placeholder_token": "<t>", "initializer": "cat"}},
    "lora": {"lora": {"trigger_word": "zwx"}},
    "pivotal": {"textual_inversion": {"placeholder_token": "<t>", "initializer": "cat"}},
}


def raw(type_name, **basic):
    method = LEGACY_TYPES.get(type_name, (type_name,))[0]
    return {"type": type_name, "basic": {"base_model": "m", **basic}, "data": {"source": "d"}, **SECTIONS[method]}


def problems_of(data) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


# Every version 1 name: (version 2 type, basic.family when the old config left it at auto, what the note says).
OLD_NAMES = {
    "sd_textual_inversion": ("textual_inversion", "auto", "an SDXL model, which sd_textual_inversion refused, would now train"),
    "sdxl_textual_inversion": ("textual_inversion", "sdxl", "with basic.family: sdxl"),
    "sd_lora": ("lora", "auto", "an SDXL model, which sd_lora refused, would now train"),
    "sdxl_lora": ("lora", "sdxl", "with basic.family: sdxl"),
    "sd_lora_and_textual_inversion": ("pivotal", "auto", "set basic.family: sd1 or sd2 to refuse it"),
    "sdxl_lora_and_textual_inversion": ("pivotal", "sdxl", "it trains sdxl models only"),
}


def test_the_table_covers_every_old_name():
    assert set(OLD_NAMES) == set(LEGACY_TYPES)


@pytest.mark.parametrize("old", list(OLD_NAMES))
def test_every_old_name_migrates_and_says_what_it_changed(old):
    new_type, family, said = OLD_NAMES[old]
    config = parse_config(raw(old))
    assert (config.type, config.version, config.basic.family) == (new_type, 2, family)
    assert type(config) is CONFIG_TYPES[new_type]
    [note] = config.migration_notes
    assert note.startswith(f"type: {old} is now type: {new_type}") and said in note
    # The written form is version 2 and loads as it is, with nothing left to migrate.
    again = parse_config(yaml.safe_load(dump_config(config)))
    assert again == config and again.migration_notes == [] and "version: 2" in dump_config(config)


@pytest.mark.parametrize("old", ["sd_lora", "sd_textual_inversion", "sd_lora_and_textual_inversion"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_an_explicit_family_is_kept(old, family):
    config = parse_config(raw(old, family=family))
    assert config.basic.family == family and config.migration_notes == [f"type: {old} is now type: {OLD_NAMES[old][0]}"]


@pytest.mark.parametrize(("old", "family"), [("sd_lora", "sdxl"), ("sdxl_lora", "sd1"),
                                             ("sdxl_lora_and_textual_inversion", "sd2")])
def test_an_old_type_that_contradicts_its_family_is_refused(old, family):
    [problem] = problems_of(raw(old, family=family))
    assert problem.field == "basic.family" and f"{old} trains" in problem.message
    assert f"not {family}" in problem.message


def test_a_current_config_is_left_alone():
    data = raw("lora")
    assert migrate(data) == (data, [])


@pytest.mark.parametrize("type_name", list(CONFIG_TYPES) + list(LEGACY_TYPES))
def test_every_starter_config_parses(type_name):
    config = parse_config(yaml.safe_load(starter_yaml(type_name)))
    new_type, families = LEGACY_TYPES.get(type_name, (type_name, ("auto",)))
    assert config.type == new_type and config.version == 2 and config.migration_notes == []
    assert config.basic.family == (families[0] if len(families) == 1 else "auto")


def test_clip_skip_is_checked_against_a_named_family():
    [problem] = problems_of({**raw("lora", family="sdxl"), "advanced": {"clip_skip": 2}})
    assert problem.field == "advanced.clip_skip" and "Stable Diffusion XL reads fixed text-encoder layers" in problem.message
    for family in ("auto", "sd1", "sd2"):  # auto: checked once the model's family is known (test_conditioning)
        assert parse_config({**raw("lora", family=family), "advanced": {"clip_skip": 2}}).advanced.clip_skip == 2
    # The old SDXL type refuses it as it did, now through the family its migration sets.
    [problem] = problems_of({**raw("sdxl_lora"), "advanced": {"clip_skip": 2}})
    assert problem.field == "advanced.clip_skip"


def test_a_method_refuses_a_family_it_does_not_train():
    class Sd1Only(TextualInversionConfig):
        FAMILIES = ("sd1",)

    data = {**raw("textual_inversion"), "basic": {"base_model": "m", "family": "sdxl"}}
    with pytest.raises(ValueError, match="basic.family: textual_inversion trains sd1 models, not sdxl"):
        Sd1Only.model_validate(data)
    assert Sd1Only.model_validate({**data, "basic": {"base_model": "m"}}).basic.family == "auto"


def test_version_must_be_2():
    [problem] = problems_of({**raw("lora"), "version": 3})
    assert problem.field == "version"


def test_problems_are_structured_and_the_text_renders_them():
    data = raw("lora")
    data["data"] = {"batch_size": 0, "resolutoin": 512}
    data["basic"]["max_train_epochs"] = 2
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="my.yaml")
    problems = info.value.problems
    assert ("data.batch_size", "data.resolutoin") == tuple(p.field for p in problems if p.field.startswith("data."))
    assert Problem("data.resolutoin", "unknown key (did you mean 'resolution'?)") in problems
    # A rule spanning fields names the field it is about, not the section holding the validator.
    assert Problem("basic", "set exactly one of basic.max_train_steps and basic.max_train_epochs (the other to "
                   "null)") in problems
    assert str(info.value) == "my.yaml is not valid:\n  " + "\n  ".join(p.line() for p in problems)


@pytest.mark.parametrize(("data", "field"), [
    ({"basic": {}}, "type"), ({"type": "loar"}, "type"),
    ({**raw("lora"), "data": {}}, "data.source"),
    ({**raw("lora"), "data": {"source": "d", "cache_latents": "memory", "center_crop": False}}, "data.cache_latents"),
    ({**raw("pivotal"), "lora": {"save_format": "peft"},
      "textual_inversion": {"placeholder_token": "<t>", "initializer": "c", "bundle": True}}, "textual_inversion.bundle"),
])
def test_cross_field_rules_name_their_field(data, field):
    assert [p.field for p in problems_of(data)] == [field]


def test_the_method_sections_come_after_data_as_before():
    """YAML, the schema and the web form list the method's sections where the version 1 types had them."""
    common = ["type", "version", "basic", "data"], ["validation", "optimizer", "advanced", "export"]
    for type_name, sections in [("textual_inversion", ["textual_inversion"]), ("lora", ["lora"]),
                                ("pivotal", ["textual_inversion", "lora"])]:
        cls = CONFIG_TYPES[type_name]
        assert list(cls.model_fields) == common[0] + sections + common[1]
        assert list(cls.model_json_schema()["properties"]) == list(cls.model_fields)
