"""diffusers/PEFT LoRA files (`save_peft` / `load_peft`): the layout diffusers' `load_lora_weights` reads.
Facts: shared FORMATS.md.

`unet.<path>.lora_A.weight` / `.lora_B.weight` (+ `text_encoder.`, `text_encoder_2.`), PEFT DoRA
`.lora_magnitude_vector` ([out]; conv [1, out, 1, 1], PEFT's own shapes; text encoders
`.lora_magnitude_vector.weight`, the only spelling transformers 5 loads), written by the pipeline class's
`save_lora_weights` with `LoraConfig` adapter metadata (r, lora_alpha, target_modules, rank_pattern/alpha_pattern,
use_dora) so `load_lora_weights` reproduces alpha != rank exactly. Text-encoder paths are written under
`text_model.`: diffusers strips it for a model without that attribute (transformers 5's CLIPTextModel), so the
file loads with transformers 4 and 5.
"""

from __future__ import annotations

import collections
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.errors import ConjureError
from conjure.export.kohya_names import canonical_module_path, default_module_path
from conjure.export.lora import (
    check_module,
    family_metadata,
    file_dtype,
    file_tensor,
    is_conv,
    read_lora_file,
    save_lora_file,
)

__all__ = [
    "ADAPTER_METADATA_KEY", "PEFT_PREFIXES", "adapter_alpha", "adapter_config", "load_peft", "parse_peft", "save_peft",
    "write_peft",
]

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key (diffusers.loaders.lora_base)
# the pipeline attributes a file names (the denoisers "unet" / "transformer" and the text encoders), longest first
PEFT_PREFIXES = tuple(sorted({c for f in families.FAMILIES.values() for c in f.kohya_prefixes()}, key=len, reverse=True))


def _peft_target(component: str, canonical: str) -> str:
    """The module name for LoraConfig.target_modules / rank_pattern / alpha_pattern: without `text_model.`, so
    PEFT's suffix match finds it both in CLIPTextModel (transformers 5) and under `text_model.`."""
    if canonical.startswith("text_model."):
        return canonical[len("text_model."):]
    return canonical


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Iterable[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _adapter_config(component: str, modules: dict[str, LoraModule]) -> dict[str, Any]:
    dora = {path: m.magnitude is not None for path, m in modules.items()}
    if len(set(dora.values())) > 1:
        raise ConjureError(
            f"{component}: some modules have a DoRA magnitude and some not; a PEFT file has one use_dora per model"
        )
    ranks = {_peft_target(component, p): m.rank for p, m in modules.items()}
    alphas = {_peft_target(component, p): float(m.alpha) for p, m in modules.items()}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(ranks),
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: _number(v) for k, v in alphas.items() if v != alpha},
        "use_dora": any(dora.values()),
        "lora_dropout": 0.0,
        "bias": "none",
    }


def _peft_layers(modules: dict[str, LoraModule], component: str, denoiser: str, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for canonical, m in modules.items():
        out[f"{canonical}.lora_A.weight"] = file_tensor(m.down, dtype)
        out[f"{canonical}.lora_B.weight"] = file_tensor(m.up, dtype)
        if m.magnitude is not None:
            n_out = m.up.shape[0]
            if m.magnitude.numel() != n_out:
                raise ConjureError(
                    f"{component} module {canonical!r}: magnitude of shape {list(m.magnitude.shape)} does not "
                    f"match {n_out} outputs"
                )
            shape = (1, n_out, 1, 1) if is_conv(m) else (n_out,)  # PEFT's own parameter shapes
            # PEFT writes `.lora_magnitude_vector` and appends `.weight` when it loads; transformers 5's
            # load_adapter (diffusers' text-encoder path) does not, and drops the bare key. `.weight` loads in both.
            suffix = "lora_magnitude_vector" if component == denoiser else "lora_magnitude_vector.weight"
            out[f"{canonical}.{suffix}"] = file_tensor(m.magnitude.reshape(shape), dtype)
    return out


def _per_component(weights: LoraWeights, fam: str) -> dict[str, dict[str, LoraModule]]:
    """component -> canonical module path -> module, checked for what a PEFT file can hold."""
    allowed = families.get(fam).kohya_prefixes()  # the components this family's pipeline loads
    per_component: dict[str, dict[str, LoraModule]] = collections.defaultdict(dict)
    for (component, module_path), m in weights.items():
        where = f"{component} module {module_path!r}"
        if component not in allowed:
            raise ConjureError(f"{where}: {fam} pipelines have no {component}")
        check_module(where, m)
        if m.dora_scale is not None:
            raise ConjureError(
                f"{where} carries a kohya DoRA dora_scale (input-column decomposition), which PEFT/diffusers "
                "cannot represent (PEFT DoRA normalises output rows); save it with save_kohya"
            )
        canonical = canonical_module_path(component, module_path)
        if canonical in per_component[component]:
            raise ConjureError(f"{where} appears twice (as {module_path!r} and another spelling)")
        per_component[component][canonical] = m
    if not per_component:
        raise ConjureError("no LoRA modules to save")
    return per_component


def write_peft(path, weights, metadata, family, dtype, add_format=True) -> None:
    """Write through the family's pipeline class's `save_lora_weights`, then add `metadata` to the header."""
    import diffusers

    fam = families.get(family).name
    per_component = _per_component(weights, fam)
    if ADAPTER_METADATA_KEY in metadata:
        raise ConjureError(f"metadata key {ADAPTER_METADATA_KEY!r} is diffusers' own; choose another name")

    kwargs: dict[str, Any] = {}
    for component, modules in per_component.items():
        kwargs[f"{component}_lora_layers"] = _peft_layers(modules, component, families.get(fam).denoiser, dtype)
        kwargs[f"{component}_lora_adapter_metadata"] = _adapter_config(component, modules)
    pipeline = getattr(diffusers, families.get(fam).pipeline_class)
    path = Path(path)
    if not path.parent.is_dir():
        raise ConjureError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-peft-", dir=path.parent)
    try:
        pipeline.save_lora_weights(tmp_dir, weight_name="lora.safetensors", **kwargs)
        written = Path(tmp_dir) / "lora.safetensors"
        tensors, header = read_lora_file(written)
        meta = dict(metadata)
        meta[ADAPTER_METADATA_KEY] = header[ADAPTER_METADATA_KEY]
        if add_format and "format" in header:
            meta.setdefault("format", header["format"])
        save_lora_file(tensors, path, meta)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_peft(
    path: Path, weights: LoraWeights, metadata: Mapping[str, str], family: Any, *, dtype: Any = torch.float32
) -> Path:
    """Write `weights` in the diffusers/PEFT layout with the adapter config diffusers' `load_lora_weights` needs
    (alpha != rank and per-module ranks/alphas load exactly). Written by the family's pipeline class's
    `save_lora_weights`, then our metadata is added to the header (atomically). Returns the path.

    Modules with a PEFT `magnitude` make a PEFT DoRA file (all modules of a component must have one, or none);
    modules with a kohya `dora_scale` are refused (no PEFT form). dtype: float32 default, float16 / bfloat16, or
    None to keep the tensors' own.
    """
    fam = families.get(family)
    write_peft(path, weights, family_metadata(metadata, fam), fam.name, file_dtype(dtype))
    return Path(path)


def _pattern_value(pattern: Mapping[str, Any], names: Iterable[str]) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): a pattern key matches a module name ending in it."""
    for name in names:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return None


def _group(tensors: Mapping[str, torch.Tensor], where: str) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, module path as written) -> {"lora_A", "lora_B", "lora_magnitude_vector"} tensors."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        component = next((c for c in PEFT_PREFIXES if key.startswith(c + ".")), None)
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", key)
        if component is None or m is None:
            raise ConjureError(
                f"{where}: {key!r} is not a diffusers/PEFT LoRA tensor "
                f"(expected {'./'.join(PEFT_PREFIXES)}. + path + .lora_A.weight / .lora_B.weight / "
                ".lora_magnitude_vector)"
            )
        groups[(component, m.group(1)[len(component) + 1:])][m.group(2).split(".")[0]] = value
    if not groups:
        raise ConjureError(f"{where} holds no LoRA tensors")
    return groups


def _alpha(cfg: Mapping[str, Any], names: list[str], rank: int) -> float:
    """A module's alpha from its component's adapter config; without one, alpha = rank (diffusers' convention)."""
    if not cfg:
        return float(rank)
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, names)
    alpha = float(cfg.get("lora_alpha", rank) if alpha is None else alpha)
    if cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); the neutral form by alpha / r
    return alpha


def adapter_config(header: Mapping[str, str], where: str) -> dict[str, Any]:
    """diffusers' adapter config from a file's header (`lora_adapter_metadata`, JSON), {} when there is none."""
    raw = header.get(ADAPTER_METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ConjureError(f"{where}: unreadable {ADAPTER_METADATA_KEY} in the header: {exc}") from None


def adapter_alpha(config: Mapping[str, Any], component: str, file_path: str, rank: int) -> float:
    """The alpha of module `file_path` (as the file spells it) of `component` under diffusers' adapter config
    `config` (keys `<component>.<LoraConfig field>`); alpha = rank without one."""
    cfg = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
    canonical = canonical_module_path(component, file_path)
    return _alpha(cfg, [file_path, _peft_target(component, canonical), canonical], rank)


def load_peft(path: Path) -> tuple[LoraWeights, dict[str, str]]:
    """Read a diffusers/PEFT LoRA file: (weights, header metadata without diffusers' adapter config).

    Alphas come from the adapter config in the header (`lora_alpha`, `alpha_pattern`; `use_rslora` folded in);
    without one, alpha = rank (diffusers' convention). DoRA magnitudes come back as [out].
    """
    tensors, header = read_lora_file(path)
    return parse_peft(tensors, header, str(path))


def parse_peft(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], where: str
) -> tuple[LoraWeights, dict[str, str]]:
    """`load_peft` of tensors and a header already read (`where` names them in errors)."""
    header = dict(header)
    config = adapter_config(header, where)
    header.pop(ADAPTER_METADATA_KEY, None)
    groups = _group(tensors, where)
    # the first family whose encoders cover the file's: the one whose encoder classes spell the paths
    encoders = {c for c, _ in groups} - {f.denoiser for f in families.FAMILIES.values()}
    family = next(f for f in families.FAMILIES.values() if encoders <= {s.encoder for s in f.text_encoders})

    weights: LoraWeights = {}
    for (component, file_path), parts in groups.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ConjureError(f"{where}: {component}.{file_path} lacks lora_A or lora_B")
        down, up = parts["lora_A"], parts["lora_B"]
        canonical = canonical_module_path(component, file_path)
        alpha = adapter_alpha(config, component, file_path, down.shape[0])
        magnitude = parts.get("lora_magnitude_vector")
        module = LoraModule(down=down, up=up, alpha=alpha, magnitude=None if magnitude is None else magnitude.flatten())
        check_module(f"{where}: {component}.{file_path}", module)
        key = (component, default_module_path(component, canonical, family))
        if key in weights:
            raise ConjureError(f"{where}: {component} module {canonical!r} appears twice")
        weights[key] = module
    return weights, header
