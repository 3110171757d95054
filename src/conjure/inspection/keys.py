"""Reading tensor names: which part of which adapted module a key is, and which model module a name adapts.

Part spellings (suffix -> role, spelling), as the trainers write them: kohya sd-scripts and LyCORIS
(`.lora_down.weight`, `.hada_w1_a`, `.lokr_w1`, ...), PEFT (`.lora_A.weight`, `.lora_magnitude_vector`),
diffusers' old attention processors (`.processor.to_q_lora.down.weight`) and its LoRA layers
(`.lora.down.weight`, `.lora_linear_layer.down.weight`) - the same list ComfyUI's LoRAAdapter.load accepts
(comfy/weight_adapter/lora.py).

Module names -> (component, diffusers paths) through conjure's kohya readers (`export/kohya_names.py`,
`export/kohya_flux.py`), so a name maps exactly as `load_kohya` maps it.
"""

from __future__ import annotations

import re

from conjure import families
from conjure.errors import ConjureError
from conjure.export.kohya_flux import flux_path_from_underscores, flux_targets
from conjure.export.kohya_names import UnetLayout, canonical_module_path, module_path_from_kohya
from conjure.export.peft import PEFT_PREFIXES
from conjure.inspection.model import Module, Shape

_LYCORIS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
            "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# longest suffixes first, so `.lora_magnitude_vector.weight` wins over `.weight`-less forms
PART_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_linear_layer.down.weight", "down", "lora-layer"),
    (".lora_linear_layer.up.weight", "up", "lora-layer"),
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".lora.down.weight", "down", "lora-layer"),
    (".lora.up.weight", "up", "lora-layer"),
    ("_lora.down.weight", "down", "attn-procs"),
    ("_lora.up.weight", "up", "attn-procs"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".dora_scale", "dora_scale", "kohya"),
    (".alpha", "alpha", "kohya"),
    (".diff_b", "diff_b", "kohya"),
    (".diff", "diff", "kohya"),
    *((f".{part}", part, "kohya") for part in _LYCORIS),
)
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_LDM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "label_emb_", "time_embed_", "out_")


def split_key(key: str) -> tuple[str, str, str] | None:
    """(module name, role, spelling) of a tensor key, None when it is no adapter part."""
    for suffix, role, spelling in PART_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, spelling
    return None


def group_modules(shapes: dict[str, Shape]) -> tuple[dict[str, Module], list[str]]:
    """Modules by name, and the keys that are no module part (embeddings, bundles, unknown tensors)."""
    modules: dict[str, Module] = {}
    rest = []
    for key, shape in shapes.items():
        hit = None if key.startswith("bundle_emb.") else split_key(key)
        if hit is None:
            rest.append(key)
            continue
        name, role, spelling = hit
        module = modules.setdefault(name, Module(name=name, parts={}, shapes={}, spelling=spelling))
        module.parts[role] = key
        module.shapes[role] = shape
        if role in ("down", "up"):
            module.spelling = spelling
    return modules, rest


def _kohya(name: str, family: str, layout: UnetLayout | None) -> tuple[str, str, tuple[str, ...]]:
    fam = families.get(family)
    if fam.unet_naming == "bfl" and name.startswith("lora_unet_"):
        return "kohya-bfl", fam.denoiser, flux_targets(name)
    component, path = module_path_from_kohya(name, family, layout)
    ldm = name.startswith("lora_unet_") and name[len("lora_unet_"):].startswith(_LDM_BLOCKS)
    return ("kohya-ldm" if ldm else "kohya"), component, (canonical_module_path(component, path),)


def _underscored(name: str, prefix: str, naming: str, family: str, layout) -> tuple[str, str, tuple[str, ...]]:
    """SimpleTuner `lycoris_` / OneTrainer `lora_transformer_`: the denoiser's diffusers path, `.` -> `_`."""
    fam = families.get(family)
    body = name[len(prefix):]
    if fam.unet_naming == "bfl":
        path = flux_path_from_underscores(body)
        if path is None:
            raise ConjureError(f"{name!r}: no FLUX.1 module")
        return naming, fam.denoiser, (path,)
    _, component, targets = _kohya("lora_unet_" + body, family, layout)
    return naming, component, targets


def _dotted(name: str, family: str, layout) -> tuple[str, str, tuple[str, ...]]:
    fam = families.get(family)
    if name.startswith("diffusion_model."):  # BFL / LDM state-dict paths (ComfyUI's generic format)
        _, component, targets = _kohya("lora_unet_" + name[len("diffusion_model."):].replace(".", "_"), family, layout)
        return "bfl-dotted", component, targets
    prefix = next((c for c in PEFT_PREFIXES if name.startswith(c + ".")), None)
    path = name[len(prefix) + 1:] if prefix else name
    naming = "peft" if prefix else "bare"
    if ".processor." in path:  # diffusers' attention processors: attn1.processor.to_q -> attn1.to_q
        naming, path = "attn-procs", path.replace(".processor.", ".")
        path = path + ".0" if path.endswith(".to_out") else path
    component = prefix or fam.denoiser
    return naming, component, (canonical_module_path(component, path),)


def resolve(name: str, family: str, layout: UnetLayout | None) -> tuple[str, str | None, tuple[str, ...]]:
    """(naming, component, targets) of module `name` in `family`; ("unknown", None, ()) when no reader knows it."""
    try:
        if name.startswith(KOHYA_PREFIXES):
            return _kohya(name, family, layout)
        for prefix, naming in (("lycoris_", "lycoris"), ("lora_transformer_", "onetrainer")):
            if name.startswith(prefix):
                return _underscored(name, prefix, naming, family, layout)
        if "." in name:
            return _dotted(name, family, layout)
    except ConjureError:
        pass
    return "unknown", None, ()


def _family_key(key: str) -> str:
    """`key` spelled as conjure's family detection (export/lora.py detect_family) reads names: OneTrainer's
    `lora_transformer_` and SimpleTuner's `lycoris_` FLUX.1 names as the PEFT `transformer.` paths they are, their
    UNet names as kohya's, BFL's `diffusion_model.` paths as kohya names, attention processors without `processor`."""
    for prefix in ("lora_transformer_", "lycoris_"):
        if key.startswith(prefix):
            body, _, part = key[len(prefix):].partition(".")
            path = flux_path_from_underscores(body)
            return f"transformer.{path}.{part}" if path else f"lora_unet_{body}.{part}"
    if key.startswith("diffusion_model."):
        return "lora_unet_" + key[len("diffusion_model."):].replace(".", "_")
    return re.sub(r"^(.*)\.processor\.", r"\1.", key)


def family_keys(keys: list[str]) -> list[str]:
    return [_family_key(k) for k in keys]
