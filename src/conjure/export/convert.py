"""Which layout a LoRA file has, `conjure convert` (layout, dtype, rank, embedding bundles), and conjure's own
applier (the reference for what apps compute from a file). Facts: shared FORMATS.md.

`convert` changes a plain LoRA file between the two layouts without changing a value (kohya -> peft -> kohya gives
back every tensor bit for bit and the metadata). DoRA files cannot change layout: kohya DoRA normalises input
columns, PEFT DoRA output rows; the same numbers are a different function. FLUX.1's kohya layout fuses q/k/v
(export/kohya_flux.py): to peft splits the fused layers, back fuses them, both exactly for the files conjure writes;
a layer another tool trained fused (dense `lora_up`) splits into parts that share its `lora_down`, the same update,
which fuses back at k times the rank (the same function, a bigger file). LyCORIS LoCon files are kohya files (conv
layers included); LoHa and LoKr have no LoRA form of their rank and are refused, unless a resize approximates them
(export/lycoris.py). Other trainers' layouts are read
through `conjure inspect`'s reader (export/foreign.py) and written as kohya unless --to says otherwise; one with several
alphas gets one (the rest folded into `lora_up`, the same updates: diffusers needs it, export/kohya.py `one_alpha`).

Without a layout change or a resize, the file's tensors are rewritten key for key (`--dtype`, bundles); otherwise
they go through `LoraWeights` (export/resize.py for `--resize-rank`, the only change that is not exact). `--dtype`
casts everything but the alphas and refuses values a float16 cannot hold; `--merge-embedding` / `--split-bundle`
move an embedding into and out of the `bundle_emb` keys (export/embeddings.py), tensor-equal.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.adapters.dora import group_column_norm
from conjure.errors import ConjureError
from conjure.export.embeddings import BUNDLE_PREFIX, bundle_from_file, save_embedding, split_targets
from conjure.export.kohya import (KOHYA_PARTS, kohya_fused_parts, layout_from_metadata, one_alpha, parse_kohya,
                                  write_kohya)
from conjure.export.sharing import HASH_KEYS, finish_shared_file, shareable
from conjure.export.kohya_names import resolve_module_path
from conjure.export.lora import (
    FORMATS,
    cast_checked,
    check_module,
    cross_attention_width,
    detect_family,
    dora_scale_tensor,
    file_dtype,
    read_lora_file,
    read_shapes,
    save_lora_file,
)
from conjure.export.foreign import foreign_weights, not_lora_refusal
from conjure.export.peft import ADAPTER_METADATA_KEY, PEFT_PREFIXES, parse_peft, write_peft
from conjure.export.resize import Resized, resize_weights
from conjure.inspection.model import Inspection
from conjure.inspection.reader import inspect_file

__all__ = [
    "ALPHA_DTYPE_KEY", "ConvertOptions", "Converted", "apply_lora", "cast_weights", "convert", "convert_lora",
    "detect_lora_format", "fused_groups",
]

ALPHA_DTYPE_KEY = "conjure.kohya_alpha_dtype"  # set by convert_lora when a kohya file's alphas were not float32


def _format_of_keys(keys: Iterable[str]) -> str | None:
    keys = [k for k in keys if not k.startswith("bundle_emb.")]
    if not keys:
        return None
    if all(re.match(r"lora_(unet|te\d?)_", k) and k.partition(".")[2] in KOHYA_PARTS for k in keys):
        return "kohya"
    if all(
        k.startswith(tuple(p + "." for p in PEFT_PREFIXES))
        and re.search(r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)$", k)
        for k in keys
    ):
        return "peft"
    return None


def _neither(path: Path, keys: Iterable[str]) -> str:
    sample = ", ".join(sorted(keys)[:3])
    return (
        f"{path} is neither a kohya LoRA (lora_unet_*/lora_te*_ .lora_down/.lora_up/.alpha) nor a diffusers/PEFT "
        f"LoRA (unet./text_encoder. ... .lora_A/.lora_B) file; first keys: {sample or '(none)'}"
    )


def detect_lora_format(path: Path) -> str:
    """'kohya' or 'peft'; ConjureError for anything else (LyCORIS LoHa/LoKr, unprefixed PEFT, not a LoRA)."""
    shapes, _ = read_shapes(Path(path))
    fmt = _format_of_keys(shapes)
    if fmt is None:
        raise ConjureError(_neither(path, shapes))
    return fmt


def _layout(path: Path, approximate: bool) -> tuple[str, Inspection | None]:
    """The input's layout: "kohya", "peft", or "foreign" with what `conjure inspect`'s reader makes of it
    (`approximate`: a resize follows, so LyCORIS LoHa / LoKr files may come in)."""
    shapes, _ = read_shapes(path)
    fmt = _format_of_keys(shapes)
    if fmt is not None:
        return fmt, None
    inspection = inspect_file(path)
    if not inspection.modules:
        raise ConjureError(_neither(path, shapes))
    refusal = not_lora_refusal(path, inspection.modules, approximate)
    if refusal:
        raise ConjureError(refusal)
    return "foreign", inspection


_DORA_REFUSAL = (
    "{src} is a DoRA file; DoRA files cannot change format: kohya DoRA (dora_scale [1, in]) normalises each input "
    "column, PEFT DoRA (lora_magnitude_vector [out]) each output row, so the same numbers are a different model. "
    "Save the format you need from the training run instead (lora.save_format)."
)


@dataclass(frozen=True)
class ConvertOptions:
    """What `conjure convert` changes; the defaults change nothing (see the CLI's help for each)."""

    to: str | None = None  # "kohya" / "peft"; None: the input's own layout
    family: str | None = None  # None: from the file
    dtype: str | None = None  # "fp16" / "bf16" / "fp32" (or torch names); None: each tensor's own
    resize_rank: int | None = None
    energy: float | None = None
    merge_embedding: Path | None = None
    split_bundle: bool = False
    force: bool = False  # overwrite the embedding files split_bundle writes (the caller checks `dst`)


@dataclass
class Converted:
    path: Path
    format: str
    resized: list[Resized] = field(default_factory=list)
    embeddings: dict[str, Path] = field(default_factory=dict)  # name users type -> file written


@dataclass
class _Source:
    """The input file, read: its layout (`_layout`), LoRA tensors (bundles apart) and header."""

    path: Path
    layout: str
    lora: dict[str, torch.Tensor]
    header: dict[str, str]
    inspection: Inspection | None

    def family(self, given: Any) -> tuple[str, bool]:
        """(family, certain): the one given, else the file's (a foreign file's as its reader tells it)."""
        if given is not None:
            return families.get(given).name, True
        if self.inspection is not None:
            return self.inspection.family or families.SD1.name, self.inspection.family_certain
        return detect_family({k: tuple(v.shape) for k, v in self.lora.items()}, self.header)

    def weights(self, fam: str, approximate: bool) -> tuple[LoraWeights, dict[str, str]]:
        """The modules and the metadata to carry (without diffusers' adapter config, which the writer makes)."""
        if self.layout == "kohya":
            return parse_kohya(self.lora, self.header, fam, None, str(self.path))[0], dict(self.header)
        if self.layout == "peft":
            return parse_peft(self.lora, self.header, str(self.path))
        assert self.inspection is not None
        meta = {k: v for k, v in self.header.items() if k != ADAPTER_METADATA_KEY}
        if any(m.algorithm in ("loha", "lokr") for m in self.inspection.modules):
            # a LoRA now: kohya's network module, not the LyCORIS algorithm the header names
            meta["ss_network_module"] = "networks.lora"
            meta.pop("ss_network_args", None)
        return foreign_weights(self.path, self.lora, self.header, fam, self.inspection, approximate), meta

    def alpha_dtype(self, meta: Mapping[str, str]) -> torch.dtype:
        """The dtype of the file's alphas (kohya sd-scripts writes them in its save_precision), kept both ways."""
        dtypes = {v.dtype for k, v in self.lora.items() if k.endswith(".alpha")}
        if len(dtypes) > 1:
            raise ConjureError(f"{self.path}: alphas of several dtypes ({dtypes}); cannot keep them exactly")
        return dtypes.pop() if dtypes else file_dtype(meta.get(ALPHA_DTYPE_KEY, "float32"))


def cast_weights(weights: LoraWeights, dtype: torch.dtype) -> LoraWeights:
    out: LoraWeights = {}
    for (component, path), m in weights.items():
        parts = {}
        for part in ("down", "up", "dora_scale", "magnitude"):
            value = getattr(m, part)
            parts[part] = None if value is None else cast_checked(value, dtype, f"{component} module {path!r} {part}")
        out[(component, path)] = dataclasses.replace(m, **parts)
    return out


def fused_groups(weights: LoraWeights, fam: str) -> list[list[tuple[str, str]]]:
    """The modules the kohya layout of `fam` fuses into one layer (they must keep one rank)."""
    groups = []
    for component in {c for c, _ in weights}:
        paths = [p for c, p in weights if c == component]
        groups += [[(component, p) for p in parts] for parts in kohya_fused_parts(fam, component, paths).values()]
    return groups


def _resized_metadata(meta: dict[str, str], report: list[Resized], energy: float | None) -> None:
    """kohya resize_lora.py's metadata: the new dim ("Dynamic" when picked by energy; alphas do not change here)
    and what was done, in front of the training comment."""
    meta["ss_network_dim"] = "Dynamic" if energy is not None else str(max(r.new_rank for r in report))
    how = f"to keep {energy:g} of the energy" if energy is not None else f"to {meta['ss_network_dim']}"
    old = max(r.old_rank for r in report)
    meta["ss_training_comment"] = f"dimension is resized from {old} {how}; {meta.get('ss_training_comment', '')}"


def _relayout(source: _Source, dst: Path, to: str, bundle: dict[str, torch.Tensor], opts: ConvertOptions
              ) -> list[Resized]:
    """Read the modules, resize / cast them, write them in layout `to`."""
    dora = (".dora_scale", "lora_magnitude_vector", "lora_magnitude_vector.weight")
    if source.layout in FORMATS and source.layout != to and any(k.endswith(dora) for k in source.lora):
        raise ConjureError(_DORA_REFUSAL.format(src=source.path))
    fam, certain = source.family(opts.family)
    resizing = opts.resize_rank is not None or opts.energy is not None
    weights, meta = source.weights(fam, resizing)
    alpha_dtype = source.alpha_dtype(meta)
    report: list[Resized] = []
    if resizing:
        fused = fused_groups(weights, fam) if to == "kohya" else []
        weights, report = resize_weights(weights, opts.resize_rank, opts.energy, fused)
        _resized_metadata(meta, report, opts.energy)
    if opts.dtype is not None:
        weights = cast_weights(weights, file_dtype(opts.dtype))
    if to == "peft":
        if alpha_dtype != torch.float32:
            meta[ALPHA_DTYPE_KEY] = str(alpha_dtype).removeprefix("torch.")
        write_peft(dst, weights, meta, fam, None, add_format=False)
        return report
    if source.layout != "kohya" and not certain:
        raise ConjureError(
            f"cannot tell which model family {source.path} is for (no metadata, no modules only one family has); "
            f"give the family (conjure convert ... --family {'|'.join(families.FAMILIES)})"
        )
    if source.layout not in FORMATS and len({m.alpha for m in weights.values()}) > 1:
        # another trainer's per-module alphas (or PEFT's alpha = rank) folded into lora_up under one alpha, the same
        # updates: diffusers' kohya reader applies the most common alpha to every attention projection (one_alpha)
        weights = one_alpha(weights)[0]
    meta.pop(ALPHA_DTYPE_KEY, None)
    write_kohya(dst, weights, meta, fam, layout_from_metadata(meta), None, alpha_dtype=alpha_dtype, bundle=bundle)
    return report


def _recast(tensors: Mapping[str, torch.Tensor], dtype: Any) -> dict[str, torch.Tensor]:
    """The tensors in `dtype` (None: as they are); alphas keep theirs: every app reads an alpha with .item() (ComfyUI
    comfy/lora.py, A1111 extensions-builtin/Lora/network.py, kohya networks/lora.py), and float16 would move one such
    as 0.3, and with it the scale."""
    if dtype is None:
        return dict(tensors)
    return {k: v if k.endswith(".alpha") else cast_checked(v, file_dtype(dtype), k) for k, v in tensors.items()}


def _target_format(src: Path, dst: Path, source: str, opts: ConvertOptions) -> str:
    """The layout to write (default: the input's; kohya, the one every app loads, for another trainer's file),
    once the options are checked against each other and the files."""
    to = opts.to or (source if source in FORMATS else "kohya")
    if to not in FORMATS:
        raise ConjureError(f"unknown LoRA format {to!r}: choose {' or '.join(FORMATS)}")
    resizing = opts.resize_rank is not None or opts.energy is not None
    if source == to and not (resizing or opts.dtype or opts.merge_embedding or opts.split_bundle):
        raise ConjureError(f"{src} is already a {to} file (and no --dtype, --resize-rank or embedding option)")
    if src.resolve() == dst.resolve():
        raise ConjureError("the output must be another file than the input")
    if opts.split_bundle and opts.merge_embedding is not None:
        raise ConjureError("--merge-embedding and --split-bundle go in separate runs")
    if opts.merge_embedding is not None and to == "peft":
        raise ConjureError("--merge-embedding writes bundle_emb.* keys, which the diffusers/PEFT format cannot carry")
    return to


def _merged(source: _Source, bundle: dict[str, torch.Tensor], opts: ConvertOptions) -> dict[str, torch.Tensor]:
    """`bundle` with the embedding of --merge-embedding added (checked against the LoRA's family and width)."""
    if opts.merge_embedding is None:
        return bundle
    fam = families.get(source.family(opts.family)[0])
    width = cross_attention_width({k: tuple(v.shape) for k, v in source.lora.items()})
    return {**bundle, **bundle_from_file(Path(opts.merge_embedding), fam, width, bundle)}


def convert(src: Path, dst: Path, opts: ConvertOptions) -> Converted:
    """Write `src` to `dst` changed as `opts` say (`conjure convert`). Exact unless resizing: a layout change or
    --dtype fp32 keeps every value; the embedding bundle moves tensor-equal both ways. See the module docstring."""
    src, dst = Path(src), Path(dst)
    layout, inspection = _layout(src, opts.resize_rank is not None or opts.energy is not None)
    to = _target_format(src, dst, layout, opts)
    tensors, header = read_lora_file(src)
    header = shareable(header)  # a file of an older conjure names its base model by its path
    bundle = {k: v for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX)}
    source = _Source(src, layout, {k: v for k, v in tensors.items() if k not in bundle}, header, inspection)
    split = split_targets(bundle, dst, opts.force) if opts.split_bundle else {}
    bundle = _merged(source, {} if split else bundle, opts)
    if bundle and to == "peft":
        raise ConjureError(f"{src} bundles embeddings (bundle_emb.*), which the diffusers/PEFT format cannot carry; "
                           "--split-bundle writes them as embedding files")
    report: list[Resized] = []
    if layout == to and opts.resize_rank is None and opts.energy is None:
        save_lora_file({**_recast(source.lora, opts.dtype), **bundle}, dst, header)
    else:
        report = _relayout(source, dst, to, bundle, opts)
    if any(key in header for key in HASH_KEYS):
        finish_shared_file(dst)  # the source's hashes were of other bytes
    for path, embedding in split.values():
        save_embedding(path, embedding, {})
    return Converted(dst, to, report, {name: path for name, (path, _) in split.items()})


def convert_lora(src: Path, dst: Path, to: str, *, family: Any = None) -> Path:
    """Convert a plain LoRA file between the kohya and diffusers/PEFT layouts without changing a value.

    The metadata is carried over unchanged (the PEFT file adds diffusers' adapter config, which the way back
    drops), so kohya -> peft -> kohya gives back every tensor bit for bit and the same header. family: read from
    the file when not given; a PEFT file that names neither SDXL's second encoder nor its add_embedding and has no
    metadata is ambiguous and needs it. SDXL's LDM numbering follows the layout recorded in the metadata, else the
    real SDXL layout. `dst` is replaced if it exists (the CLI asks for --force first).
    """
    return convert(src, dst, ConvertOptions(to=to, family=family)).path


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


def _decomposed(m: LoraModule, new: torch.Tensor, norm: torch.Tensor, eps: float, where: str) -> torch.Tensor:
    """`new` (W') with the module's DoRA applied: input-column (`dora_scale`, `norm` = ||W'||_col of its
    decomposition) or output-row (`magnitude`)."""
    if m.dora_scale is not None:
        scale = dora_scale_tensor(where, m).to(new.device, torch.float32).reshape(norm.shape)
        return new * (scale / (norm + eps))
    if m.magnitude is not None:
        n_out = new.shape[0]
        if m.magnitude.numel() != n_out:
            raise ConjureError(f"{where}: magnitude of {m.magnitude.numel()} values for {n_out} outputs")
        shape = (n_out,) + (1,) * (new.dim() - 1)
        magnitude = m.magnitude.detach().to(new.device, torch.float32).reshape(shape)
        return new * (magnitude / new.reshape(n_out, -1).norm(dim=1).reshape(shape))
    return new


def _target(components: Mapping[str, Any], names: dict[str, set[str]], component: str, path: str) -> Any:
    where = f"{component} module {path!r}"
    model = components.get(component)
    if model is None:
        raise ConjureError(f"{where}: no {component} among the components")
    if component not in names:
        names[component] = {name for name, _ in model.named_modules()}
    module = model.get_submodule(resolve_module_path(path, names[component]))
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        raise ConjureError(f"{where} is a {type(module).__name__}, not a Linear or Conv2d")
    return module


def apply_lora(components: Mapping[str, Any], weights: LoraWeights, multiplier: float = 1.0) -> int:
    """Merge `weights` into the modules of `components` (pipeline attribute name -> model) in place, as
    ComfyUI / A1111 apply a kohya file; returns the number of modules changed. Computed in float32:

        W' = W + (alpha / rank) * up @ down
        input-column DoRA:  W'' = dora_scale * W' / (||W'||_col + eps)   (norm over the output and kernel dims of
                            each input column; eps = finfo(W.dtype).eps, as ComfyUI)
        output-row (PEFT) DoRA: W'' = magnitude * W' / ||W'||_row        (as PEFT, no eps)
        W_new = W + multiplier * (W'' - W)

    The parts of a fused layer's DoRA (`dora_group`, FLUX.1's q|k|v) share its ||W'||_col, over all their rows, as
    apps decompose the fused weight. Text-encoder paths match with or without `text_model.`.
    """
    names: dict[str, set[str]] = {}

    def updated(component: str, module_path: str, m: LoraModule) -> tuple[str, torch.Tensor, torch.Tensor]:
        where = f"{component} module {module_path!r}"
        weight = _target(components, names, component, module_path).weight
        check_module(where, m)
        w = weight.detach().to(torch.float32)
        return where, weight, w + m.scale * _delta(m, w, where)

    # W' of every part of a fused DoRA layer first: each part's norm spans them all
    groups: dict[tuple[str, str], list[torch.Tensor]] = collections.defaultdict(list)
    for (component, module_path), m in weights.items():
        if m.dora_group is not None:
            groups[(component, m.dora_group)].append(updated(component, module_path, m)[2])
    for (component, module_path), m in weights.items():
        where, weight, new = updated(component, module_path, m)
        norm = group_column_norm(groups[(component, m.dora_group)] if m.dora_group is not None else [new])
        new = _decomposed(m, new, norm, torch.finfo(weight.dtype).eps, where)
        if multiplier != 1.0:
            new = weight.detach().to(torch.float32) + multiplier * (new - weight.detach().to(torch.float32))
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
    return len(weights)

