"""The YAML examples of README.md and docs/ are configs conjure loads, so they cannot rot: a block with a
`type:` loads as it stands; a block of sections alone (e.g. `data:`) loads inside the starter config of every
type that has those sections (what `conjure config new TYPE` writes), as the reader would use it: in place of
the starter's sections, or added to them."""

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from conjure.config import CONFIG_TYPES, ConfigError, load_config, starter_yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```ya?ml[ \t]*\n(.*?)^\1```", re.M | re.S)


def yaml_blocks() -> list:
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(pytest.param(textwrap.dedent(match.group(2)), id=f"{doc.name}:{line}"))
    return blocks


BLOCKS = yaml_blocks()


def test_the_docs_have_yaml_examples():
    assert BLOCKS, "no ```yaml block found in README.md or docs/: did the fence spelling change?"


@pytest.mark.parametrize("text", BLOCKS)
def test_yaml_example_loads(text, tmp_path):
    example = yaml.safe_load(text)
    assert isinstance(example, dict), f"not a mapping of config keys:\n{text}"
    path = tmp_path / "example.yaml"
    if "type" in example:
        path.write_text(text, encoding="utf-8")
        load_config(path)
        return
    types = [name for name, cls in CONFIG_TYPES.items() if set(example) <= set(cls.model_fields)]
    assert types, f"sections {sorted(example)} are not all sections of any config type:\n{text}"
    for name in types:
        starter = yaml.safe_load(starter_yaml(name))
        replaced = {**starter, **example}  # the example's sections as they stand (e.g. `sources` for `source`)
        merged = {**starter, **{k: {**(starter.get(k) or {}), **v} if isinstance(v, dict) else v
                                for k, v in example.items()}}  # or its keys added to the starter's
        errors = []
        for config in (replaced, merged):
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            try:
                load_config(path)
                break
            except ConfigError as exc:
                errors.append(str(exc))
        else:
            pytest.fail(f"the example does not load into a {name} starter config:\n{text}\n" + "\n".join(errors))
