"""`basic.memory_preset`: the memory options set together (`fast`, `balanced`, `low_memory`), each option still
the user's to set.

A preset sets an option only where the config leaves it unset (not in its section's `model_fields_set`: a field
written in the YAML wins, even at its default value) and only where it can apply, in two steps:

- when the config is validated (`apply_to_config`), the options that depend on the config alone: gradient
  checkpointing and the caches (the latent cache not with a random crop, the text-encoder cache not when a text
  encoder trains or captions are shuffled: the config refuses both). The YAML a config check shows and the run's
  config.yaml hold the values; the web form shows them beside its fields and leaves them out of its own config
  and YAML (`preset_filled`), so that another preset chosen there applies its own (one edited there is the
  user's, as in a YAML);
- when the run starts (`apply_to_machine`), the ones that depend on the machine and the model: 8-bit AdamW (an
  NVIDIA GPU with bitsandbytes) and the frozen transformer's float8/nf4 storage (a family whose objective takes
  `base_weights_dtype`, a CUDA GPU, torchao/bitsandbytes: float8 also runs on the CPU, upcast for every matmul,
  which the preset leaves to the user to choose). What cannot apply here keeps its default, said in one
  start-line warning; the run's config.yaml records what ran, so a resume compares the effective values.

Configs are often written whole (the starter of `conjure config new`, the web app's YAML, a dump), which would
make every option the user's: the starter writes the preset's options commented out (`OPTIONS`), and a dump
leaves out the machine options still unset (`unset_machine_options`).

Each step records what it chose and why (`RunConfigBase.preset_choices`); the run's start event lists them
under `chosen`. mixed_precision is left to its own `auto` (bf16 where the GPU has it, else fp16; the CPU: fp32).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from conjure.config.base import RunConfigBase

MemoryPreset = Literal["fast", "balanced", "low_memory"]


@dataclass(frozen=True)
class Preset:
    """What a preset sets; `adamw8bit` and `base_weights` where the machine runs them."""

    gradient_checkpointing: bool
    cache_latents: Literal["off", "memory", "disk"]
    cache_text_encoder_outputs: bool
    adamw8bit: bool
    base_weights: tuple[Literal["float8", "nf4"], ...]  # the first this machine runs


# fast: nothing that costs speed, and the caches, which save time as well as memory. balanced: also gradient
# checkpointing, the largest saving (activations) at ~30% of the step time; nothing that changes what trains
# (recomputation and the caches are exact). low_memory: also what trades some exactness for memory: 8-bit
# optimizer state and the frozen transformer in nf4 (else float8).
PRESETS: dict[str, Preset] = {
    "fast": Preset(False, "memory", True, False, ()),
    "balanced": Preset(True, "memory", True, False, ()),
    "low_memory": Preset(True, "memory", True, True, ("nf4", "float8")),
}
BASE_WEIGHT_LIBRARIES = {"float8": "torchao", "nf4": "bitsandbytes"}  # conjure.models.quantize.LIBRARIES
OPTIONS = ("advanced.gradient_checkpointing", "data.cache_latents", "data.cache_text_encoder_outputs",
           "optimizer.optimizer", "advanced.base_weights_dtype")
"""What a preset sets. `conjure config new` writes them commented out, so that a preset in a starter config applies."""
MACHINE_OPTIONS = ("optimizer.optimizer", "advanced.base_weights_dtype")
"""Set at run start: left unset, a config's dump leaves them out (`unset_machine_options`), so the YAML that the web
app launches or `conjure config check --show` writes still lets the run's machine choose them."""


def preset_filled(config: Any) -> dict[str, Any]:
    """The options basic.memory_preset filled when the config was validated, because it left them unset (dotted
    name -> value; `apply_to_config` records each, also one it left at its default). The web form keeps them out
    of its config and YAML and shows them apart, so that choosing another preset there applies that one's."""
    return {option: getattr(getattr(config, option.split(".")[0]), option.split(".")[1]) for option in OPTIONS
            if option not in MACHINE_OPTIONS and option.split(".")[1] in config.preset_choices}


def unset_machine_options(config: Any) -> dict[str, set[str]]:
    """The machine options (by section) a config with a preset leaves for the run start to set: a dump leaves them
    out, since written at their default they would be the user's (and the preset could not set them)."""
    if config.basic.memory_preset is None:
        return {}
    out: dict[str, set[str]] = {}
    for option in MACHINE_OPTIONS:
        section, name = option.split(".")
        if name not in getattr(config, section).model_fields_set:
            out.setdefault(section, set()).add(name)
    return out


def apply_to_config(config: RunConfigBase) -> None:
    """Set the preset's config-only options on `config` where it leaves them unset, recording each choice."""
    name = config.basic.memory_preset
    if name is None:
        return
    preset, source = PRESETS[name], f"basic.memory_preset {name}"
    data, advanced = config.data, config.advanced
    if "gradient_checkpointing" not in advanced.model_fields_set:
        advanced.gradient_checkpointing = preset.gradient_checkpointing
        config.preset_choices["gradient_checkpointing"] = (preset.gradient_checkpointing, source)
    if "cache_latents" not in data.model_fields_set:
        if data.center_crop:
            data.cache_latents = preset.cache_latents
            config.preset_choices["cache_latents"] = (preset.cache_latents, source)
        else:
            config.preset_choices["cache_latents"] = ("off", f"{source}: a random crop (data.center_crop: false) "
                                                             "differs every epoch")
    if "cache_text_encoder_outputs" not in data.model_fields_set and preset.cache_text_encoder_outputs:
        why = ("this run trains a text encoder" if config.trains_text_encoder()
               else "captions are shuffled" if data.shuffle_caption_delimiter is not None else None)
        if why is None:
            data.cache_text_encoder_outputs = True
        config.preset_choices["cache_text_encoder_outputs"] = (why is None, f"{source}: {why}" if why else source)


def apply_to_machine(config: RunConfigBase, *, objective_settings: dict[str, object], device: torch.device
                     ) -> tuple[RunConfigBase, str | None]:
    """`config` with the preset's machine options set where it leaves them unset and this machine (`device`) and
    model (its objective's settings, `conjure.config.sections.OBJECTIVE_SETTINGS`) run them; and the start-line
    warning naming what this machine cannot run, or None. `config` itself is not changed."""
    name = config.basic.memory_preset
    if name is None:
        return config, None
    preset, source = PRESETS[name], f"basic.memory_preset {name}"
    out = config.model_copy(deep=True)
    cuda = device.type == "cuda"
    missing: list[str] = []
    if preset.adamw8bit and "optimizer" not in out.optimizer.model_fields_set:
        if cuda and importlib.util.find_spec("bitsandbytes") is not None:
            out.optimizer.optimizer = "adamw8bit"
            out.preset_choices["optimizer"] = ("adamw8bit", source)
        else:  # written as kept (set, so a dump records it): a resume elsewhere keeps what ran
            out.optimizer.optimizer = out.optimizer.optimizer
            missing.append(f"8-bit AdamW (needs an NVIDIA GPU and bitsandbytes; kept {out.optimizer.optimizer})")
            out.preset_choices["optimizer"] = (out.optimizer.optimizer, f"{source}: no NVIDIA GPU with bitsandbytes")
    wants_base = preset.base_weights and "base_weights_dtype" in objective_settings
    if wants_base and "base_weights_dtype" not in out.advanced.model_fields_set:
        runnable = [kind for kind in preset.base_weights
                    if cuda and importlib.util.find_spec(BASE_WEIGHT_LIBRARIES[kind]) is not None]
        if runnable:
            out.advanced.base_weights_dtype = runnable[0]
            out.preset_choices["base_weights_dtype"] = (runnable[0], source)
        else:
            out.advanced.base_weights_dtype = "auto"
            kinds = "/".join(preset.base_weights)
            missing.append(f"{kinds} base weights (need a CUDA GPU and bitsandbytes or torchao; kept auto)")
            out.preset_choices["base_weights_dtype"] = ("auto", f"{source}: no CUDA GPU with bitsandbytes or torchao")
    warning = f"{source}: this machine cannot run " + " or ".join(missing) if missing else None
    return out, warning


def summary(choices: dict[str, Any]) -> str:
    """The preset's choices for the start line, e.g. 'gradient_checkpointing true, cache_latents memory'."""
    return ", ".join(f"{name} {str(value).lower() if isinstance(value, bool) else value}"
                     for name, (value, _) in choices.items())
