"""LoRA / DoRA files: the kohya layout every app loads, the diffusers/PEFT layout, conversion between them, and
conjure's own applier (the reference for what apps compute). Facts: shared FORMATS.md.

kohya (`save_kohya` / `load_kohya`): per module `NAME.lora_down.weight` [r, in] (conv [r, in, kh, kw]),
`NAME.lora_up.weight` [out, r] (conv [out, r, 1, 1]), `NAME.alpha` (float32 scalar: the configured alpha) and, for
input-column DoRA, `NAME.dora_scale` [1, in] (conv [1, in, 1, 1]). Names: `conjure.adapters.names`.

diffusers/PEFT (`save_peft` / `load_peft`): `unet.<path>.lora_A.weight` / `.lora_B.weight` (+ `text_encoder.`,
`text_encoder_2.`), PEFT DoRA `.lora_magnitude_vector` ([out]; conv [1, out, 1, 1], PEFT's own shapes; text
encoders `.lora_magnitude_vector.weight`, the only spelling transformers 5 loads), written by
the pipeline class's `save_lora_weights` with `LoraConfig` adapter metadata (r, lora_alpha, target_modules,
rank_pattern/alpha_pattern, use_dora) so `load_lora_weights` reproduces alpha != rank exactly. Text-encoder paths
are written under `text_model.`: diffusers strips it for a model without that attribute (transformers 5's
CLIPTextModel), so the file loads with transformers 4 and 5.

Both files carry the caller's string metadata (ss_*, modelspec.*, conjure.*) in the safetensors header; diffusers
keeps its adapter config in the `lora_adapter_metadata` header key, next to ours. Files are written atomically.

`convert_lora` changes a plain LoRA file between the two layouts without changing a value (kohya -> peft -> kohya
gives back every tensor bit for bit and the metadata). DoRA files cannot change layout: kohya DoRA normalises input
columns, PEFT DoRA output rows; the same numbers are a different function.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.adapters.names import (
    canonical_module_path,
    default_module_path,
    family_name_of,
    kohya_name,
    kohya_prefixes,
    layout_from_metadata,
    layout_metadata,
    module_path_from_kohya,
    resolve_module_path,
    unet_layout,
)
from conjure.errors import ConjureError
from conjure.files import save_atomically

__all__ = [
    "apply_lora",
    "convert_lora",
    "detect_lora_family",
    "detect_lora_format",
    "kohya_state_dict",
    "load_kohya",
    "load_peft",
    "save_kohya",
    "save_peft",
]

FORMATS = ("kohya", "peft")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key (diffusers.loaders.lora_base)
ALPHA_DTYPE_KEY = "conjure.kohya_alpha_dtype"  # set by convert_lora when a kohya file's alphas were not float32
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_PEFT_PREFIXES = ("text_encoder_2", "text_encoder", "unet")  # longest first
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ConjureError(f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)")


def _tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous().clone()  # clone: safetensors refuses tensors that share memory


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(metadata or {})
    bad = [k for k, v in out.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConjureError(f"safetensors metadata must be strings; not strings: {', '.join(map(repr, bad))}")
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A crash leaves the old file or the new one, never half a file."""
    path = Path(path)
    if path.is_dir():
        raise ConjureError(f"cannot write a LoRA file to {path}: it is a folder")
    if not path.parent.is_dir():
        raise ConjureError(f"cannot write {path}: folder {path.parent} does not exist")
    save_atomically(tensors, path, metadata)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
        return load_file(str(path)), header
    except FileNotFoundError:
        raise ConjureError(f"no such file: {path}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConjureError(f"cannot read {path} as a safetensors file: {exc}") from None


def _read_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except FileNotFoundError:
        raise ConjureError(f"no such file: {path}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConjureError(f"cannot read {path} as a safetensors file: {exc}") from None


def _is_conv(m: LoraModule) -> bool:
    return m.down.dim() == 4


def _dora_scale_tensor(where: str, m: LoraModule) -> torch.Tensor:
    """The input-column scale in the layout apps read: [1, in] (conv [1, in, 1, 1])."""
    scale, n_in = m.dora_scale, m.down.shape[1]
    if scale.numel() != n_in or (scale.dim() > 1 and scale.shape[0] != 1):
        raise ConjureError(
            f"{where}: dora_scale of shape {list(scale.shape)} is not an input-column scale for {n_in} inputs "
            f"(expected [1, {n_in}]{' or [1, %d, 1, 1]' % n_in if _is_conv(m) else ''})"
        )
    return scale.reshape((1, n_in, 1, 1) if _is_conv(m) else (1, n_in))


def _check_module(where: str, m: LoraModule) -> None:
    if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim() or m.up.shape[1] != m.down.shape[0]:
        raise ConjureError(
            f"{where}: lora_down {list(m.down.shape)} and lora_up {list(m.up.shape)} do not form a LoRA pair"
        )
    if m.dora_scale is not None and m.magnitude is not None:
        raise ConjureError(f"{where}: a module cannot carry both an input-column and an output-row DoRA scale")


def _most_common(values: Iterable[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


# ---------------------------------------------------------------------------------------------------------------
# family detection


def _family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    fam = metadata.get("conjure.family")
    if fam in families.FAMILIES:
        return fam
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


_SDXL_MARKS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "label_emb", "add_embedding")
_LDM_MARKS = ("input_blocks", "middle_block", "output_blocks")
# The real models' UNet cross-attention width: their text encoders' widths side by side (768, 1024, 768 + 1280).
_CROSS_WIDTHS = {sum(slot.width for slot in f.text_encoders): name for name, f in families.FAMILIES.items()}


def _detect_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[str, bool]:
    """(family, certain). From the metadata, then SDXL-only modules, then the real models' cross-attention widths
    (InvokeAI's rule), then LDM block names (kohya writes them for SDXL only); otherwise ('sd1', False): SD 1.x
    and 2.x have the same names, and SDXL cannot be ruled out."""
    fam = _family_from_metadata(metadata)
    if fam:
        return fam, True
    if any(mark in key for key in shapes for mark in _SDXL_MARKS):
        return "sdxl", True
    for key, shape in shapes.items():
        if re.search(r"attn2[._]to_[kv]", key) and key.endswith(("lora_down.weight", "lora_A.weight")):
            if shape[1] in _CROSS_WIDTHS:
                return _CROSS_WIDTHS[shape[1]], True
    if any(mark in key for key in shapes for mark in _LDM_MARKS):
        return "sdxl", True
    return "sd1", False


def detect_lora_family(path: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' for a LoRA file; 'sd1' when nothing tells (SD 1.x and 2.x names are the same)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except FileNotFoundError:
        raise ConjureError(f"no such file: {path}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConjureError(f"cannot read {path} as a safetensors file: {exc}") from None
    return _detect_family(shapes, metadata)[0]


# ---------------------------------------------------------------------------------------------------------------
# kohya


def kohya_state_dict(
    weights: LoraWeights,
    family: Any,
    unet_config: Any = None,
    *,
    dtype: Any = torch.float32,
    alpha_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The tensors of a kohya file (see the module docstring); dtype None keeps each tensor's own."""
    dtype = _dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    owners: dict[str, tuple[str, str]] = {}
    for (component, path), m in weights.items():
        where = f"{component} module {path!r}"
        _check_module(where, m)
        if m.magnitude is not None:
            raise ConjureError(
                f"{where} carries a PEFT DoRA magnitude (output-row decomposition): apps read kohya DoRA as "
                "input-column `dora_scale` [1, in], so this would load wrongly; save it with save_peft, or train "
                "the kohya (input-column) DoRA"
            )
        name = kohya_name(component, path, family, unet_config)
        if name in owners:
            raise ConjureError(f"{where} and {owners[name][0]} module {owners[name][1]!r} share the kohya name {name}")
        owners[name] = (component, path)
        out[f"{name}.lora_down.weight"] = _tensor(m.down, dtype)
        out[f"{name}.lora_up.weight"] = _tensor(m.up, dtype)
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=alpha_dtype)
        if m.dora_scale is not None:
            out[f"{name}.dora_scale"] = _tensor(_dora_scale_tensor(where, m), dtype)
    if not out:
        raise ConjureError("no LoRA modules to save")
    return out


def _write_kohya(path, weights, metadata, family, unet_config, dtype, alpha_dtype=torch.float32) -> None:
    tensors = kohya_state_dict(weights, family, unet_config, dtype=dtype, alpha_dtype=alpha_dtype)
    _atomic_save(tensors, Path(path), metadata)


def save_kohya(
    path: Path,
    weights: LoraWeights,
    metadata: Mapping[str, str],
    family: Any,
    unet_config: Any = None,
    *,
    dtype: Any = torch.float32,
    bundle: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `weights` as a kohya LoRA/DoRA file every app loads (atomically). Returns the path.

    bundle: extra `bundle_emb.*` tensors (conjure.export.embeddings.bundle_tensors) written as given: the
    embedding of a pivotal run, for apps that read it from the LoRA file.

    family: 'sd1' / 'sd2' / 'sdxl' or a Family; unet_config: the UNet's config (SDXL's LDM numbering depends on
    it; None: the real SDXL layout). dtype: of down/up/dora_scale (float32 default; float16 / bfloat16 / None to keep
    the tensors' own); alphas are always float32 scalars. Metadata: strings only; `ss_base_model_version` and
    `ss_v2` are filled in when missing, and for SDXL with a unet_config the layout keys (conjure.unet_layers_per_block,
    conjure.unet_up_block_attention) so the file reads back without the model. Refuses modules with a PEFT
    `magnitude` (wrong layout for apps).

    Per-module alphas are written faithfully, but diffusers 0.42's kohya reader applies one alpha (the most common)
    to every attention projection (UNet to_q/k/v/out, text-encoder q/k/v/out_proj; under transformers 5 also
    CLIPTextModel's mlp): one alpha per file, as conjure trains, loads exactly everywhere.
    """
    fam = family_name_of(family)
    meta = _check_metadata(metadata)
    meta.setdefault("ss_base_model_version", families.get(fam).ss_base_model_version)
    meta.setdefault("ss_v2", str(families.get(fam).ss_v2))
    if fam == "sdxl" and unet_config is not None:
        for key, value in layout_metadata(unet_config).items():
            meta.setdefault(key, value)
    tensors = kohya_state_dict(weights, fam, unet_config, dtype=_dtype(dtype))
    for key, value in (bundle or {}).items():
        if not key.startswith("bundle_emb."):
            raise ConjureError(f"bundled tensor {key!r} must start with 'bundle_emb.'")
        tensors[key] = value
    _atomic_save(tensors, Path(path), meta)
    return Path(path)


def _parse_kohya(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], family: Any, unet_config: Any, where: str
) -> tuple[LoraWeights, str]:
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            continue  # embeddings bundled for A1111/ComfyUI: not part of the LoRA
        name, _, part = key.partition(".")
        if part not in _KOHYA_PARTS:
            raise ConjureError(
                f"{where}: {key!r} is not a kohya LoRA/DoRA tensor (only {', '.join(_KOHYA_PARTS)} are read; "
                "LyCORIS LoHa/LoKr and other adapters are not supported)"
            )
        groups[name][part] = value
    if not groups:
        raise ConjureError(f"{where} holds no LoRA tensors")
    fam = family_name_of(family) if family is not None else _detect_family(
        {k: tuple(v.shape) for k, v in tensors.items()}, header
    )[0]
    layout = unet_layout(unet_config) if unet_config is not None else layout_from_metadata(header)
    weights: LoraWeights = {}
    names: dict[tuple[str, str], str] = {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ConjureError(f"{where}: module {name} lacks lora_down.weight or lora_up.weight")
        key = module_path_from_kohya(name, fam, layout)
        if key in names:
            raise ConjureError(f"{where}: {name} and {names[key]} are the same module ({key[0]} {key[1]})")
        names[key] = name
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        module = LoraModule(down=down, up=parts["lora_up.weight"], alpha=alpha, dora_scale=parts.get("dora_scale"))
        _check_module(f"{where}: {name}", module)
        weights[key] = module
    return weights, fam


def load_kohya(path: Path, family: Any = None, unet_config: Any = None) -> tuple[LoraWeights, dict[str, str]]:
    """Read a kohya LoRA/DoRA file: (weights, header metadata). Tensors keep the file's dtype; a module without
    `.alpha` gets alpha = rank (kohya's convention); `bundle_emb.*` tensors are skipped.

    family: read from the metadata/keys when not given; unet_config: for SDXL's LDM numbering, default the layout
    recorded in the metadata, else the real SDXL one. Text-encoder paths take the installed transformers' spelling.
    """
    tensors, header = _read(path)
    weights, _ = _parse_kohya(tensors, header, family, unet_config, str(path))
    return weights, header


# ---------------------------------------------------------------------------------------------------------------
# diffusers / PEFT


def _peft_target(component: str, canonical: str) -> str:
    """The module name for LoraConfig.target_modules / rank_pattern / alpha_pattern: without `text_model.`, so
    PEFT's suffix match finds it both in CLIPTextModel (transformers 5) and under `text_model.`."""
    if component != "unet" and canonical.startswith("text_model."):
        return canonical[len("text_model."):]
    return canonical


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


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


def _peft_layers(modules: dict[str, LoraModule], component: str, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for canonical, m in modules.items():
        out[f"{canonical}.lora_A.weight"] = _tensor(m.down, dtype)
        out[f"{canonical}.lora_B.weight"] = _tensor(m.up, dtype)
        if m.magnitude is not None:
            n_out = m.up.shape[0]
            if m.magnitude.numel() != n_out:
                raise ConjureError(
                    f"{component} module {canonical!r}: magnitude of shape {list(m.magnitude.shape)} does not "
                    f"match {n_out} outputs"
                )
            shape = (1, n_out, 1, 1) if _is_conv(m) else (n_out,)  # PEFT's own parameter shapes
            # PEFT writes `.lora_magnitude_vector` and appends `.weight` when it loads; transformers 5's
            # load_adapter (diffusers' text-encoder path) does not, and drops the bare key. `.weight` loads in both.
            suffix = "lora_magnitude_vector" if component == "unet" else "lora_magnitude_vector.weight"
            out[f"{canonical}.{suffix}"] = _tensor(m.magnitude.reshape(shape), dtype)
    return out


def _write_peft(path, weights, metadata, family, dtype, add_format=True) -> None:
    import diffusers

    fam = family_name_of(family)
    allowed = kohya_prefixes(fam)  # the components this family's pipeline loads
    per_component: dict[str, dict[str, LoraModule]] = collections.defaultdict(dict)
    for (component, module_path), m in weights.items():
        where = f"{component} module {module_path!r}"
        if component not in allowed:
            raise ConjureError(f"{where}: {fam} pipelines have no {component}")
        _check_module(where, m)
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
    if ADAPTER_METADATA_KEY in metadata:
        raise ConjureError(f"metadata key {ADAPTER_METADATA_KEY!r} is diffusers' own; choose another name")

    kwargs: dict[str, Any] = {}
    for component, modules in per_component.items():
        kwargs[f"{component}_lora_layers"] = _peft_layers(modules, component, dtype)
        kwargs[f"{component}_lora_adapter_metadata"] = _adapter_config(component, modules)
    pipeline = getattr(diffusers, families.get(fam).pipeline_class)
    path = Path(path)
    if not path.parent.is_dir():
        raise ConjureError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-peft-", dir=path.parent)
    try:
        pipeline.save_lora_weights(tmp_dir, weight_name="lora.safetensors", **kwargs)
        written = Path(tmp_dir) / "lora.safetensors"
        tensors, header = _read(written)
        meta = dict(metadata)
        meta[ADAPTER_METADATA_KEY] = header[ADAPTER_METADATA_KEY]
        if add_format and "format" in header:
            meta.setdefault("format", header["format"])
        _atomic_save(tensors, path, meta)
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
    fam = family_name_of(family)
    meta = _check_metadata(metadata)
    meta.setdefault("ss_base_model_version", families.get(fam).ss_base_model_version)
    meta.setdefault("ss_v2", str(families.get(fam).ss_v2))
    _write_peft(path, weights, meta, fam, _dtype(dtype))
    return Path(path)


def _pattern_value(pattern: Mapping[str, Any], names: Iterable[str]) -> Any:
    """PEFT's rule (peft.utils.other.get_pattern_key): a pattern key matches a module name ending in it."""
    for name in names:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return None


def load_peft(path: Path) -> tuple[LoraWeights, dict[str, str]]:
    """Read a diffusers/PEFT LoRA file: (weights, header metadata without diffusers' adapter config).

    Alphas come from the adapter config in the header (`lora_alpha`, `alpha_pattern`; `use_rslora` folded in);
    without one, alpha = rank (diffusers' convention). DoRA magnitudes come back as [out].
    """
    tensors, header = _read(path)
    where = str(path)
    raw_config = header.pop(ADAPTER_METADATA_KEY, None)
    try:
        config = json.loads(raw_config) if raw_config else {}
    except json.JSONDecodeError as exc:
        raise ConjureError(f"{where}: unreadable {ADAPTER_METADATA_KEY} in the header: {exc}") from None

    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        component = next((c for c in _PEFT_PREFIXES if key.startswith(c + ".")), None)
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", key)
        if component is None or m is None:
            raise ConjureError(
                f"{where}: {key!r} is not a diffusers/PEFT LoRA tensor "
                "(expected unet./text_encoder./text_encoder_2. + path + .lora_A.weight / .lora_B.weight / "
                ".lora_magnitude_vector)"
            )
        groups[(component, m.group(1)[len(component) + 1:])][m.group(2).split(".")[0]] = value
    if not groups:
        raise ConjureError(f"{where} holds no LoRA tensors")
    family = "sdxl" if any(c == "text_encoder_2" for c, _ in groups) else "sd1"

    weights: LoraWeights = {}
    for (component, file_path), parts in groups.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ConjureError(f"{where}: {component}.{file_path} lacks lora_A or lora_B")
        down, up = parts["lora_A"], parts["lora_B"]
        cfg = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
        canonical = canonical_module_path(component, file_path)
        rank = down.shape[0]
        if cfg:
            names = [file_path, _peft_target(component, canonical), canonical]
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, names)
            alpha = float(cfg.get("lora_alpha", rank) if alpha is None else alpha)
            if cfg.get("use_rslora"):
                alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); the neutral form by alpha / r
        else:
            alpha = float(rank)
        magnitude = parts.get("lora_magnitude_vector")
        module = LoraModule(down=down, up=up, alpha=alpha, magnitude=None if magnitude is None else magnitude.flatten())
        _check_module(f"{where}: {component}.{file_path}", module)
        key = (component, default_module_path(component, canonical, family))
        if key in weights:
            raise ConjureError(f"{where}: {component} module {canonical!r} appears twice")
        weights[key] = module
    return weights, header


# ---------------------------------------------------------------------------------------------------------------
# format detection and conversion


def _format_of_keys(keys: Iterable[str]) -> str | None:
    keys = [k for k in keys if not k.startswith("bundle_emb.")]
    if not keys:
        return None
    if all(re.match(r"lora_(unet|te\d?)_", k) and k.partition(".")[2] in _KOHYA_PARTS for k in keys):
        return "kohya"
    if all(
        k.startswith(tuple(p + "." for p in _PEFT_PREFIXES))
        and re.search(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)$", k)
        for k in keys
    ):
        return "peft"
    return None


def detect_lora_format(path: Path) -> str:
    """'kohya' or 'peft'; ConjureError for anything else (LyCORIS LoHa/LoKr, unprefixed PEFT, not a LoRA)."""
    keys, _ = _read_keys(Path(path))
    fmt = _format_of_keys(keys)
    if fmt is None:
        sample = ", ".join(sorted(keys)[:3])
        raise ConjureError(
            f"{path} is neither a kohya LoRA (lora_unet_*/lora_te*_ .lora_down/.lora_up/.alpha) nor a diffusers/PEFT "
            f"LoRA (unet./text_encoder. ... .lora_A/.lora_B) file; first keys: {sample or '(none)'}"
        )
    return fmt


_DORA_REFUSAL = (
    "{src} is a DoRA file; DoRA files cannot change format: kohya DoRA (dora_scale [1, in]) normalises each input "
    "column, PEFT DoRA (lora_magnitude_vector [out]) each output row, so the same numbers are a different model. "
    "Save the format you need from the training run instead (lora.save_format)."
)


def convert_lora(src: Path, dst: Path, to: str, *, family: Any = None) -> Path:
    """Convert a plain LoRA file between the kohya and diffusers/PEFT layouts without changing a value.

    The metadata is carried over unchanged (the PEFT file adds diffusers' adapter config, which the way back
    drops), so kohya -> peft -> kohya gives back every tensor bit for bit and the same header. family: read from
    the file when not given; a PEFT file that names neither SDXL's second encoder nor its add_embedding and has no
    metadata is ambiguous and needs it. SDXL's LDM numbering follows the layout recorded in the metadata, else the
    real SDXL layout. `dst` is replaced if it exists (the CLI asks for --force first).
    """
    src, dst = Path(src), Path(dst)
    if to not in FORMATS:
        raise ConjureError(f"unknown LoRA format {to!r}: choose {' or '.join(FORMATS)}")
    source_format = detect_lora_format(src)
    if source_format == to:
        raise ConjureError(f"{src} is already a {to} file")
    if src.resolve() == dst.resolve():
        raise ConjureError("the output must be another file than the input")
    tensors, header = _read(src)
    if any(k.endswith((".dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")) for k in tensors):
        raise ConjureError(_DORA_REFUSAL.format(src=src))
    if any(k.startswith("bundle_emb.") for k in tensors):
        raise ConjureError(f"{src} bundles embeddings (bundle_emb.*), which the diffusers/PEFT format cannot carry")
    if family is None:
        fam, certain = _detect_family({k: tuple(v.shape) for k, v in tensors.items()}, header)
    else:
        fam, certain = family_name_of(family), True

    if to == "peft":
        weights, _ = _parse_kohya(tensors, header, fam, None, str(src))
        meta = dict(header)
        alpha_dtypes = {v.dtype for k, v in tensors.items() if k.endswith(".alpha")}
        if alpha_dtypes and alpha_dtypes != {torch.float32}:
            if len(alpha_dtypes) > 1:
                raise ConjureError(f"{src}: alphas of several dtypes ({alpha_dtypes}); cannot keep them exactly")
            meta[ALPHA_DTYPE_KEY] = str(alpha_dtypes.pop()).removeprefix("torch.")
        _write_peft(dst, weights, meta, fam, None, add_format=False)
        return dst

    if not certain:
        raise ConjureError(
            f"cannot tell whether {src} is for SD 1.x/2.x or SDXL (no metadata, no SDXL-only modules); "
            "give the family (conjure convert ... --family sd1|sd2|sdxl)"
        )
    weights, meta = load_peft(src)
    alpha_dtype = _dtype(meta.pop(ALPHA_DTYPE_KEY, "float32"))
    _write_kohya(dst, weights, meta, fam, layout_from_metadata(meta), None, alpha_dtype=alpha_dtype)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# applying (conjure's reader: what ComfyUI / A1111 compute from a kohya file)


def _delta(m: LoraModule, weight: torch.Tensor, where: str) -> torch.Tensor:
    up = m.up.detach().to(weight.device, torch.float32).flatten(1)
    down = m.down.detach().to(weight.device, torch.float32).flatten(1)
    if up.shape[0] != weight.shape[0] or down.shape[1] != weight[0].numel():
        raise ConjureError(
            f"{where}: LoRA of shapes up {list(m.up.shape)} / down {list(m.down.shape)} does not fit the weight "
            f"{list(weight.shape)}"
        )
    return (up @ down).reshape(weight.shape)


def apply_lora(components: Mapping[str, Any], weights: LoraWeights, multiplier: float = 1.0) -> int:
    """Merge `weights` into the modules of `components` (pipeline attribute name -> model) in place, as
    ComfyUI / A1111 apply a kohya file; returns the number of modules changed. Computed in float32:

        W' = W + (alpha / rank) * up @ down
        input-column DoRA:  W'' = dora_scale * W' / (||W'||_col + eps)   (norm over the output and kernel dims of
                            each input column; eps = finfo(W.dtype).eps, as ComfyUI)
        output-row (PEFT) DoRA: W'' = magnitude * W' / ||W'||_row        (as PEFT, no eps)
        W_new = W + multiplier * (W'' - W)

    Text-encoder paths match with or without `text_model.`.
    """
    names: dict[str, set[str]] = {}
    changed = 0
    for (component, module_path), m in weights.items():
        where = f"{component} module {module_path!r}"
        model = components.get(component)
        if model is None:
            raise ConjureError(f"{where}: no {component} among the components")
        if component not in names:
            names[component] = {name for name, _ in model.named_modules()}
        module = model.get_submodule(resolve_module_path(module_path, names[component]))
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ConjureError(f"{where} is a {type(module).__name__}, not a Linear or Conv2d")
        _check_module(where, m)
        weight = module.weight
        w = weight.detach().to(torch.float32)
        new = w + m.scale * _delta(m, w, where)
        if m.dora_scale is not None:
            n_in = w.shape[1]
            scale = _dora_scale_tensor(where, m).to(w.device, torch.float32).reshape((1, n_in) + (1,) * (w.dim() - 2))
            norm = new.transpose(0, 1).reshape(n_in, -1).norm(dim=1).reshape((1, n_in) + (1,) * (w.dim() - 2))
            new = new * (scale / (norm + torch.finfo(weight.dtype).eps))
        elif m.magnitude is not None:
            n_out = w.shape[0]
            if m.magnitude.numel() != n_out:
                raise ConjureError(f"{where}: magnitude of {m.magnitude.numel()} values for {n_out} outputs")
            shape = (n_out,) + (1,) * (w.dim() - 1)
            magnitude = m.magnitude.detach().to(w.device, torch.float32).reshape(shape)
            new = new * (magnitude / new.reshape(n_out, -1).norm(dim=1).reshape(shape))
        if multiplier != 1.0:
            new = w + multiplier * (new - w)
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
        changed += 1
    return changed
