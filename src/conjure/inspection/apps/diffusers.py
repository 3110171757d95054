"""diffusers' `load_lora_weights` / `load_textual_inversion`, restated as rules (read from the installed diffusers
0.42.1: loaders/lora_pipeline.py, loaders/lora_conversion_utils.py, loaders/textual_inversion.py).

- Every pipeline's `lora_state_dict` (StableDiffusion, StableDiffusionXL, Flux LoraLoaderMixin) filters out all
  `dora_scale` keys with a warning: a kohya DoRA loads as a plain LoRA.
- SD/SDXL: a file whose every key starts with `lora_unet_` / `lora_te_` / `lora_te1_` / `lora_te2_` goes through
  `_convert_non_diffusers_lora_to_diffusers`, which reads `lora_down` / `lora_up` / `alpha` only and raises on any
  other key ("have not been correctly renamed": LoHa, LoKr, lora_mid). Any other file must have "lora" in every key
  (`load_lora_weights`: "Invalid LoRA checkpoint"), so a kohya file with `bundle_emb.*` keys is refused.
  `_convert_unet_lora_key` strips the index of names containing "emb" (`add_embedding_linear_1` ->
  `add.embedding.linear`), so an SDXL add-embedding LoRA under diffusers' names is lost.
- FLUX.1: any `.lora_down.weight` key sends the file to `_convert_kohya_flux_lora_to_diffusers`, which raises on
  keys other than BFL block / embedder / `lora_te1_` names ("Incompatible keys detected").
- Kohya text-encoder modules (SD/SDXL and FLUX.1's `lora_te1_`) become old diffusers names (`to_q_lora`, ...,
  `to_out_lora`; mlp `lora_linear_layer`) in `_convert_text_encoder_lora_key`; `_load_lora_into_text_encoder`
  (loaders/lora_base.py) then guesses each encoder's format in `convert_state_dict_to_diffusers` /
  `convert_state_dict_to_peft` (utils/state_dict_utils.py) by `to_out_lora` alone. Without an `out_proj` module
  an encoder with only q/k/v modules raises "Could not automatically infer state dict type"; with mlp modules as
  well, its q/k/v are unexpected keys and left out. The PEFT layout carries no guess (`conjure convert --to peft`).
- SD/SDXL kohya alphas go to PEFT as one `lora_alpha` per component (its modules' most common alpha) and an
  `alpha_pattern` for the rest (utils/peft_utils.py `get_peft_kwargs`); the pattern's keys of attention projections
  (`...attn1.processor.to_q_lora...`, text encoders' `self_attn` and mlp) match no module, and peft ignores them
  with a warning: those layers apply the component's most common alpha (reproduced in
  tests/inspection/test_app_rules.py; FLUX.1's converter folds each alpha into the weights instead).
- PEFT files load per pipeline component (`unet.` / `transformer.` / `text_encoder.` / `text_encoder_2.`); keys of
  a component the pipeline lacks are never read. LoHa / LoKr have no SD/SDXL/FLUX.1 reader.
"""

from __future__ import annotations

import collections
import re

from conjure.inspection.apps.rules import (
    CLIP_LAYER,
    embedding_widths,
    family_of,
    grouped,
    modules_where,
    one_tensor_embedding,
    slot_kind,
)
from conjure.inspection.keys import KOHYA_PREFIXES
from conjure.inspection.model import DROPPED, REFUSED, WRONG, Finding, Inspection, Module

NAME = "diffusers"
VERSION = "diffusers 0.42.1"

_KOHYA_CONVERTED = {"down", "up", "alpha"}  # what _convert_non_diffusers_lora_to_diffusers reads


def _dora_scale(insp: Inspection) -> list[Finding]:
    keys = tuple(m.parts["dora_scale"] for m in insp.modules if "dora_scale" in m.parts)
    if not keys:
        return []
    return [Finding(DROPPED, "lora_state_dict filters out every dora_scale with a warning: the DoRA loads as a plain "
                    "LoRA (save the PEFT format for diffusers: lora.save_format: peft)", keys)]


def _kohya_file(insp: Inspection) -> bool:
    return all(k.startswith(KOHYA_PREFIXES) for k in insp.shapes if not k.endswith(".dora_scale"))


def _refusals(insp: Inspection) -> list[Finding]:
    """Whole-file refusals: a converter that meets keys it cannot rename, or keys without "lora"."""
    if insp.is_embedding:
        return []
    kohya_parts = any(m.spelling == "kohya" and "down" in m.parts for m in insp.modules)
    flux = family_of(insp).unet_naming == "bfl"
    if flux and kohya_parts:
        bad = [k for k in insp.shapes if not k.startswith(KOHYA_PREFIXES)]
        bad += [m.parts[r] for m in insp.modules for r in m.parts if r not in _KOHYA_CONVERTED | {"dora_scale"}]
        why = "_convert_kohya_flux_lora_to_diffusers raises \"Incompatible keys detected\""
    elif _kohya_file(insp):
        bad = [m.parts[r] for m in insp.modules for r in m.parts if r not in _KOHYA_CONVERTED | {"dora_scale"}]
        why = "_convert_non_diffusers_lora_to_diffusers reads lora_down/lora_up/alpha only and raises on the rest"
    else:
        bad = [k for k in insp.shapes if "lora" not in k]
        why = "load_lora_weights raises \"Invalid LoRA checkpoint\" for keys without 'lora'"
    return [Finding(REFUSED, why, tuple(bad))] if bad else []


def _components(insp: Inspection) -> list[Finding]:
    fam = family_of(insp)
    pipeline = set(fam.kohya_prefixes())

    def why(m: Module) -> str | None:
        if m.component is None:
            return "no pipeline component reads this name"
        if m.component not in pipeline:
            return f"{fam.pipeline_class} has no {m.component}"
        if m.naming in ("lycoris", "onetrainer", "bfl-dotted"):
            return f"{m.naming} names are not converted by {fam.pipeline_class}.lora_state_dict"
        return None
    return modules_where(insp, DROPPED, why)


def _lycoris(insp: Inspection) -> list[Finding]:
    if _kohya_file(insp):
        return []  # refused whole by the converter (_refusals)
    return modules_where(insp, DROPPED, lambda m: (
        f"{m.algorithm} modules: diffusers loads LoRA layers only" if m.algorithm in ("loha", "lokr") else None))


def _add_embedding(insp: Inspection) -> list[Finding]:
    return grouped(DROPPED, (
        ("_convert_unet_lora_key strips the layer index of names containing 'emb': add_embedding_linear_N "
         "becomes add.embedding.linear, which no module has (write LDM names: label_emb_0_N)", m.keys)
        for m in insp.modules
        if m.naming == "kohya" and any(t.startswith("add_embedding.") for t in m.targets)
    ))


_TE_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _text_encoder_format_guess(insp: Inspection) -> list[Finding]:
    """Per kohya CLIP encoder without an out_proj module: refused when it has only q/k/v modules, its q/k/v
    dropped when it has mlp modules too (the module docstring; reproduced with the installed loader in
    tests/inspection/test_app_rules.py)."""
    if not _kohya_file(insp):
        return []
    encoders: dict[str, list[Module]] = {}
    for m in insp.modules:
        if m.naming == "kohya" and slot_kind(insp, m.component) == "clip":
            encoders.setdefault(str(m.component), []).append(m)
    findings = []
    for component, modules in encoders.items():
        if any(t.endswith("self_attn.out_proj") for m in modules for t in m.targets):
            continue
        attention = [k for m in modules if m.targets and m.targets[0].endswith(_TE_ATTENTION) for k in m.keys]
        if not attention:
            continue
        fix = "; save the PEFT layout for diffusers: conjure convert --to peft"
        if len(attention) == sum(len(m.keys) for m in modules):
            findings.append(Finding(REFUSED, f"{component} has q/k/v but no out_proj LoRA: _load_lora_into_text_"
                                    "encoder raises \"Could not automatically infer state dict type\"" + fix,
                                    tuple(attention)))
        else:
            findings.append(Finding(DROPPED, f"{component} has no out_proj LoRA: the format guess takes its mlp "
                                    "names, and q/k/v are unexpected keys" + fix, tuple(attention)))
    return findings


_UNET_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def _alpha_pattern(insp: Inspection) -> list[Finding]:
    """Kohya attention projections (and CLIP mlp) whose alpha is not their component's most common one: diffusers
    applies the most common one (the module docstring)."""
    if not _kohya_file(insp) or family_of(insp).unet_naming == "bfl":
        return []
    by_component: dict[str, list[Module]] = {}
    for m in sorted(insp.modules, key=lambda m: m.name):  # the file's key order, which the Counter's ties follow
        if m.component is not None and m.alpha is not None:
            by_component.setdefault(m.component, []).append(m)
    findings = []
    for component, modules in by_component.items():
        common = collections.Counter(m.alpha for m in modules).most_common(1)[0][0]
        clip = slot_kind(insp, component) == "clip"
        layer = CLIP_LAYER if clip else _UNET_ATTENTION
        wrong = [k for m in modules if m.alpha != common and m.targets and layer.search(m.targets[0]) for k in m.keys]
        if wrong:
            findings.append(Finding(WRONG, f"diffusers gives {component}'s attention projections"
                                    f"{' and mlp' if clip else ''} one alpha, its most common ({common:g}): peft "
                                    "ignores their alpha_pattern keys; one alpha per file loads right (or save the "
                                    "PEFT layout: conjure convert --to peft)", tuple(wrong)))
    return findings


RULES = (
    _refusals,
    _text_encoder_format_guess,
    _alpha_pattern,
    _dora_scale,
    _components,
    _lycoris,
    _add_embedding,
    embedding_widths(NAME),
    one_tensor_embedding("load_textual_inversion raises \"Loaded state dictionary is incorrect\" for a file of "
                         "several tensors (one encoder)"),
)
