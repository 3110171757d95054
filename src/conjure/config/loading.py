"""YAML <-> typed config, CLI overrides, readable validation errors, starter files and JSON schema."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from conjure.config.finetune import FinetuneConfig
from conjure.config.lora import LoraConfig
from conjure.config.migrate import LEGACY_TYPES, migrate
from conjure.config.pivotal import PivotalConfig
from conjure.config.presets import OPTIONS as PRESET_OPTIONS
from conjure.config.presets import unset_machine_options
from conjure.config.problems import ConfigError, FieldProblem, Problem
from conjure.config.textual_inversion import TextualInversionConfig

CONFIG_TYPES: dict[str, type[RunConfig]] = {
    "textual_inversion": TextualInversionConfig,
    "lora": LoraConfig,
    "pivotal": PivotalConfig,
    "finetune": FinetuneConfig,
}
RunConfig = TextualInversionConfig | LoraConfig | PivotalConfig | FinetuneConfig
"""Any validated config that trains: what `parse_config` returns and `conjure.train.loop.train` takes."""


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def config_class(type_name: Any) -> type[RunConfig]:
    """The config class of `type_name` (a version 1 name gives its method's class)."""
    if isinstance(type_name, str) and type_name in LEGACY_TYPES:
        type_name = LEGACY_TYPES[type_name][0]
    if not isinstance(type_name, str) or type_name not in CONFIG_TYPES:
        known = ", ".join(CONFIG_TYPES)
        if type_name is None:
            raise ConfigError([Problem("type", f"missing; set it to one of: {known}")])
        hint = _suggest(str(type_name), list(CONFIG_TYPES) + list(LEGACY_TYPES))
        raise ConfigError([Problem("type", f"unknown config type {type_name!r}{hint}; known: {known}")])
    return CONFIG_TYPES[type_name]


def yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """Where a YAML syntax error is (" line L, column C", or "" when PyYAML does not say) and what it is."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return where, getattr(exc, "problem", None) or str(exc).splitlines()[0]


MAX_YAML_EXPANSION = 1_000_000
"""Most nodes plus scalar characters a config's YAML may hold once its aliases are expanded. A real config is a
few thousand; nine nested levels of nine aliases in a 418-byte text are 387 million (a 1.85 GB web answer)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags) that also refuses duplicate keys (PyYAML keeps the last one,
    silently: `seed` written twice trained with the second) and documents whose aliases expand past
    MAX_YAML_EXPANSION or into themselves. Aliases within that bound still work: an anchored list of prompts
    reused elsewhere is legitimate YAML; what is refused is only what no config needs."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` keys are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if earlier is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {earlier.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes plus scalar characters under `node` with every alias expanded (each shared node is sized once,
    so an exponential document costs linear time); raises when that passes MAX_YAML_EXPANSION or an alias
    sits inside its own anchor."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise yaml.composer.ComposerError(None, None, "an alias refers to the collection that holds it",
                                          node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value)
    else:
        open_nodes.add(id(node))
        children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else node.value
        size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
        open_nodes.discard(id(node))
    if size > MAX_YAML_EXPANSION:
        raise yaml.composer.ComposerError(
            None, None, f"too large once its aliases (*name) are expanded (over {MAX_YAML_EXPANSION:,} nodes and "
            "characters); write the values out instead", node.start_mark)
    sizes[id(node)] = size
    return size


def load_yaml(text: str) -> Any:
    """`text` parsed as a config's YAML (`_ConfigLoader`'s rules); yaml.YAMLError when it breaks them or is
    not YAML (a document nested too deeply for the parser is one too)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        where, problem = yaml_problem(exc)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"config file is empty: {path}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to the raw mapping, before validation."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set data.resolution=512")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _field_names_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section that `loc` points into (for 'did you mean')."""
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _problem(cls: type[BaseModel], err: ErrorDetails) -> Problem:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, FieldProblem):  # a rule spanning fields names the one to change itself
        return Problem(cause.field, cause.message)
    if err["type"] == "extra_forbidden":
        valid = _field_names_at(cls, loc[:-1])
        return Problem(dotted, f"unknown key{_suggest(str(loc[-1]), valid)}")
    if err["type"] == "missing":
        return Problem(dotted, "required, but missing")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"].endswith("_type") or err["type"].endswith("_parsing") or err["type"] == "literal_error":
        msg += f" (got {err.get('input')!r})"
    return Problem(dotted, msg)


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw mapping (of any version: `migrate`) into its typed config; every problem is reported, one
    line each. The config's `migration_notes` say what a migration changed."""
    data, notes = migrate(data)
    cls = config_class(data.get("type"))
    try:
        config = cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_problem(cls, e) for e in exc.errors()], heading=f"{source} is not valid") from None
    config._migration_notes = notes
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(read_yaml(Path(path)), overrides or [])
    return parse_config(data, source=str(path))


def dump_config(config: BaseModel) -> str:
    """YAML of the full config (every field, defaults included) that parses back to an equal config."""
    return yaml.safe_dump(config_data(config), sort_keys=False, allow_unicode=True)


def config_data(config: BaseModel) -> dict[str, Any]:
    """The config as plain data, every field but the machine options a memory preset sets at run start
    (conjure.config.presets.unset_machine_options): written at their defaults they would be the user's."""
    return config.model_dump(mode="json", exclude=unset_machine_options(config))


def config_schema(type_name: str) -> str:
    return json.dumps(config_class(type_name).model_json_schema(), indent=2)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


def _starter_lines(model: type[BaseModel], indent: str, values: dict[str, Any], prefix: str = "") -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if field.description:
            lines.append(f"{indent}# {field.description}")
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__doc__:
                lines.append(f"{indent}# {annotation.__doc__.strip().splitlines()[0]}")
            lines.append(f"{indent}{name}:")
            lines.extend(_starter_lines(annotation, indent + "  ", values, f"{prefix}{name}."))
            lines.append("")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if f"{prefix}{name}" in values:
            lines.append(f"{indent}{name}: {_yaml_scalar(values[f'{prefix}{name}'])}")
        elif field.is_required():
            value = extra.get("example", "")
            lines.append(f"{indent}{name}: {_yaml_scalar(value)}  # required")
        elif "starter" in extra:  # optional in the schema, but one of a pair the user must fill in
            lines.append(f"{indent}{name}: {_yaml_scalar(extra['starter'])}  # {extra.get('note', 'example')}")
        elif f"{prefix}{name}" in PRESET_OPTIONS:  # written, it would be the user's: basic.memory_preset could not set it
            default = _yaml_scalar(field.get_default(call_default_factory=True))
            lines.append(f"{indent}# {name}: {default}  (unset: basic.memory_preset's choice, else {default})")
        else:
            lines.append(f"{indent}{name}: {_yaml_scalar(field.get_default(call_default_factory=True))}")
    return lines


def starter_yaml(type_name: str) -> str:
    """A commented config with every field at its default and examples for the required ones. A version 1 type
    name gives its method's config, with `basic.family: sdxl` for an `sdxl_*` one (migrate's rule)."""
    cls = config_class(type_name)
    families = LEGACY_TYPES.get(type_name, ("", ()))[1]
    values = {"basic.family": families[0]} if len(families) == 1 else {}
    head = [f"# conjure config: {(cls.__doc__ or '').strip().splitlines()[0]}", "# Edit the values marked 'required'.", ""]
    return "\n".join(head + _starter_lines(cls, "", values)) + "\n"
