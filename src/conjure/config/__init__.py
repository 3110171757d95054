"""Typed configs: one pydantic model per training method, chosen by the `type` key; the model family is
`basic.family` (auto: read from the model).

`load_config(path, overrides)` reads YAML, applies `--set a.b=c` overrides to the raw mapping, migrates an
older format (`migrate`: version 1's sd_lora, sdxl_lora, ... types) and validates once; errors become one
`ConfigError` whose `problems` name each bad field (and suggest the closest valid key for a typo). `dump_config` writes the resolved YAML that a run folder keeps, and
`starter_yaml` the commented file of `conjure config new`.
"""

from __future__ import annotations

from conjure.config.loading import (
    CONFIG_TYPES,
    RunConfig,
    apply_overrides,
    config_schema,
    dump_config,
    load_config,
    parse_config,
    starter_yaml,
)
from conjure.config.migrate import migrate
from conjure.config.problems import ConfigError, Problem

__all__ = [
    "CONFIG_TYPES",
    "ConfigError",
    "Problem",
    "RunConfig",
    "apply_overrides",
    "config_schema",
    "dump_config",
    "load_config",
    "migrate",
    "parse_config",
    "starter_yaml",
]
