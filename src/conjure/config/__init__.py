"""Typed configs: one pydantic model per training method, chosen by the `type` key.

`load_config(path, overrides)` reads YAML, applies `--set a.b=c` overrides to the raw mapping, and
validates once; errors become one `ConfigError` whose message names each bad field (and suggests the
closest valid key for a typo). `dump_config` writes the resolved YAML that a run folder keeps, and
`starter_yaml` the commented file of `conjure config new`.
"""

from __future__ import annotations

from conjure.config.loading import (
    CONFIG_TYPES,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_schema,
    dump_config,
    load_config,
    parse_config,
    starter_yaml,
)

__all__ = [
    "CONFIG_TYPES",
    "ConfigError",
    "RunConfig",
    "apply_overrides",
    "config_schema",
    "dump_config",
    "load_config",
    "parse_config",
    "starter_yaml",
]
