"""`migrate()`: a config of an older format as the current one, and what was changed to make it so.

Version 1 (no `version` key) named the family in the type: `sd_*` trained SD 1.x and 2.x, `sdxl_*` SDXL. Version 2
names the method only and leaves the family to `basic.family`. An `sdxl_*` type becomes its method with
`basic.family: sdxl`, which refuses any other model exactly as the old type did. An `sd_*` type keeps the
`basic.family` it had: an explicit sd1/sd2 keeps refusing other models; 'auto' stays 'auto' (version 2 cannot
say "SD 1.x or 2.x"), so every model the old type trained trains as before, and the note says that an SDXL model,
which the old type refused, would now train. The notes reach the user (a warning line, the run's start event).
"""

from __future__ import annotations

import copy
from typing import Any

from conjure.config.problems import ConfigError, Problem

LEGACY_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd_textual_inversion": ("textual_inversion", ("sd1", "sd2")),
    "sdxl_textual_inversion": ("textual_inversion", ("sdxl",)),
    "sd_lora": ("lora", ("sd1", "sd2")),
    "sdxl_lora": ("lora", ("sdxl",)),
    "sd_lora_and_textual_inversion": ("pivotal", ("sd1", "sd2")),
    "sdxl_lora_and_textual_inversion": ("pivotal", ("sdxl",)),
}
"""Version 1's config types: the version 2 type and the families the old type trained."""


def migrate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(`data` in the current format, one note per change). A current config comes back as it is, with no note.
    Raises ConfigError when an old config contradicts itself (an `sd_*` type with `basic.family: sdxl`)."""
    old_type = data.get("type")
    if not isinstance(old_type, str) or old_type not in LEGACY_TYPES:
        return data, []
    new_type, families = LEGACY_TYPES[old_type]
    out = copy.deepcopy(data)
    basic = out.get("basic")
    family = basic.get("family", "auto") if isinstance(basic, dict) else "auto"
    if family != "auto" and family not in families:
        raise ConfigError([Problem(
            "basic.family", f"{old_type} trains {' and '.join(families)} models, not {family}; "
            f"use type: {new_type} (the family is basic.family's alone now)")])
    out = {"type": new_type, "version": 2, **{k: v for k, v in out.items() if k not in ("type", "version")}}
    note = f"type: {old_type} is now type: {new_type}"
    if family == "auto" and len(families) == 1:
        if isinstance(basic, dict):
            basic["family"] = families[0]
        note += f" with basic.family: {families[0]} (it trains {families[0]} models only, as {old_type} did)"
    elif family == "auto":
        note += (f" with basic.family: auto: the family comes from the model, as before, but an SDXL model, which "
                 f"{old_type} refused, would now train; set basic.family: sd1 or sd2 to refuse it")
    return out, [note]
