"""A config's YAML is read by one loader (conjure.config.loading.load_yaml) in the CLI and the web app: safe
tags only, no duplicate keys, and no alias bomb (issue 21, D7 and D15)."""

import time

import pytest
import yaml

from conjure.config.loading import MAX_YAML_EXPANSION, ConfigError, apply_overrides, load_yaml, read_yaml


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The review's 418-byte document: `levels` nested lists of `width` aliases to the level below (9 x 9
    expands to 387 million strings)."""
    lines = ["type: textual_inversion", "a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(yaml.YAMLError, match=r"too large once its aliases \(\*name\) are expanded"):
        load_yaml(alias_bomb())
    path = tmp_path / "c.yaml"
    path.write_text(alias_bomb(levels=30))
    with pytest.raises(ConfigError, match=r"invalid YAML in .*c.yaml line \d+, column \d+: too large once"):
        read_yaml(path)
    assert time.monotonic() - start < 5


def test_an_alias_inside_its_own_anchor_and_deep_nesting_are_refused():
    with pytest.raises(yaml.YAMLError, match="refers to the collection that holds it"):
        load_yaml("a: &a [1, *a]\n")
    with pytest.raises(yaml.YAMLError, match="refers to the collection that holds it"):
        load_yaml("a: &a {b: *a}\n")
    with pytest.raises(yaml.YAMLError, match="nested too deeply"):
        load_yaml("x: " + "[" * 50_000 + "]" * 50_000 + "\n")


def test_aliases_within_the_bound_and_merge_keys_still_work():
    text = "prompts: &p [a cat, a dog]\nagain: *p\nbase: &b {seed: 1, steps: 2}\nother:\n  <<: *b\n  seed: 3\n"
    assert load_yaml(text) == {"prompts": ["a cat", "a dog"], "again": ["a cat", "a dog"],
                               "base": {"seed": 1, "steps": 2}, "other": {"seed": 3, "steps": 2}}
    assert MAX_YAML_EXPANSION >= 100_000  # far above any real config


def test_duplicate_keys_are_an_error_naming_the_key_and_line(tmp_path):
    """They were silently last-wins: `seed` written twice trained with the second (issue 21, D15)."""
    path = tmp_path / "c.yaml"
    path.write_text("type: textual_inversion\nbasic:\n  seed: 1\n  max_train_steps: 2\n  seed: 7\n")
    with pytest.raises(ConfigError) as error:
        read_yaml(path)
    assert str(error.value) == f"invalid YAML in {path} line 5, column 3: duplicate key 'seed' (first on line 3)"
    with pytest.raises(yaml.YAMLError, match="duplicate key 'basic'"):
        load_yaml("basic: {}\nbasic: {seed: 1}\n")
    assert load_yaml("a: {seed: 1}\nb: {seed: 1}\n") == {"a": {"seed": 1}, "b": {"seed": 1}}  # other sections


def test_python_tags_stay_refused_and_overrides_use_the_same_loader():
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        load_yaml("a: !!python/object/apply:os.system [echo hi]\n")
    assert apply_overrides({}, ["validation.prompts=[a, b]"]) == {"validation": {"prompts": ["a", "b"]}}
    # a value that is no YAML stays the text given, as before
    assert apply_overrides({}, ["x.y={a: 1, a: 2}"]) == {"x": {"y": "{a: 1, a: 2}"}}
