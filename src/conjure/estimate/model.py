"""The base model read from its configs and built on the meta device; its weights and trained parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from conjure import families
from conjure.errors import ConjureError
from conjure.models.loading import HUB_ID, LoadedModel, Wanted, fail

if TYPE_CHECKING:
    from conjure.config import RunConfig
    from conjure.families import Family
    from conjure.methods import MethodSpec, Recipe

GIB = 1024**3
# Resident set of a `conjure train` process before the model loads (python, torch, diffusers, transformers,
# accelerate, peft imported; measured with ru_maxrss on this project's CPU runs, see docs/benchmarks.md).
PROCESS_BASELINE = 450 * 2**20
# CUDA's own context and kernels (not in max_memory_allocated, but in what the card must have free)
CUDA_CONTEXT = 0.5 * GIB
# Adafactor (no first moment) keeps a row and a column per matrix: about nothing for a Linear weight, 2.7 bytes
# per weight of a 3x3 convolution (rows and columns over its last two dims); a UNet is about half convolutions.
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 2.0, "prodigy": 16.0}
QUANTIZED_BYTES = {"float8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}


@dataclass(frozen=True)
class Term:
    """One line of the breakdown: what it is, its bytes, and whether it is counted, modelled or measured."""

    name: str
    bytes: float
    basis: str


@dataclass
class Estimate:
    family: str
    method: str
    device: str  # "cuda" or "cpu": where the run trains
    precision: str
    resolution: int
    batch_size: int
    parameters: dict[str, int]  # component -> parameters
    trainable: int
    accelerator: list[Term] = field(default_factory=list)  # at the training peak (empty on the CPU)
    encoding: list[Term] = field(default_factory=list)  # text encoded ahead: the encoders alone on the accelerator
    ram: list[Term] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def peak_accelerator(self) -> float:
        return max(sum(t.bytes for t in self.accelerator), sum(t.bytes for t in self.encoding))

    @property
    def peak_ram(self) -> float:
        return sum(t.bytes for t in self.ram)

    def as_json(self) -> dict[str, Any]:
        def terms(ts: list[Term]) -> list[dict[str, Any]]:
            return [{"name": t.name, "bytes": int(t.bytes), "basis": t.basis} for t in ts]

        return {
            "family": self.family, "method": self.method, "device": self.device, "precision": self.precision,
            "resolution": self.resolution, "batch_size": self.batch_size, "parameters": self.parameters,
            "trainable_parameters": self.trainable, "peak_accelerator_bytes": int(self.peak_accelerator),
            "peak_ram_bytes": int(self.peak_ram), "accelerator": terms(self.accelerator),
            "encoding": terms(self.encoding), "ram": terms(self.ram), "assumptions": self.assumptions,
        }


# --- the model, from its configs ---------------------------------------------------------------------------
def meta_model(config: RunConfig, spec: MethodSpec) -> LoadedModel:
    """The base model's parts built on the meta device from its configs (tokenizers are read for real: they hold
    no weights); the family is checked as loading checks it (`Wanted.pick`)."""
    basic = config.basic
    wanted = Wanted(basic.family, spec.families, config.type, config.advanced)
    path = Path(basic.base_model).expanduser()
    if path.is_file():
        if basic.base_model_config:
            return _from_configs(basic.base_model_config, None, wanted)
        return _reference_for_file(path, wanted)
    if path.is_dir() or (HUB_ID.match(basic.base_model) and not basic.base_model.startswith((".", "/", "~"))):
        return _from_configs(basic.base_model, basic.revision, wanted)
    raise ConjureError(f"base model not found: {basic.base_model!r} is not a folder, a checkpoint file or a hub id")


def _family_of(source: str, revision: str | None, index: dict[str, Any], wanted: Wanted) -> tuple[Family, Any]:
    from diffusers import UNet2DConditionModel

    from conjure.models.transformer_loading import load_transformer_config

    if "transformer" in index:
        fam, config = load_transformer_config(source, revision)
        fam = wanted.pick(fam)
        wanted.check_variant(families.detect_variant(fam, config))
        return fam, config
    try:
        config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
    except Exception as exc:  # diffusers raises OSError, ValueError or hub errors here
        raise fail(source, exc) from None
    return wanted.pick(families.detect(config, has_text_encoder_2=bool(index.get("text_encoder_2", [None])[0]))), config


def _from_configs(source: str, revision: str | None, wanted: Wanted) -> LoadedModel:
    import diffusers
    import transformers

    try:
        index = diffusers.DiffusionPipeline.load_config(source, revision=revision)
    except Exception as exc:
        raise fail(source, exc) from None
    fam, denoiser_config = _family_of(source, revision, index, wanted)
    parts: dict[str, Any] = {}
    try:
        vae_config = diffusers.AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
        encoder_configs = {s.encoder: transformers.AutoConfig.from_pretrained(source, subfolder=s.encoder,
                                                                              revision=revision)
                           for s in fam.text_encoders}
        for slot in fam.text_encoders:
            tokenizer_class = getattr(transformers, index[slot.tokenizer][1])
            parts[slot.tokenizer] = tokenizer_class.from_pretrained(source, subfolder=slot.tokenizer, revision=revision)
    except Exception as exc:
        raise fail(source, exc) from None
    with torch.device("meta"):
        parts[fam.denoiser] = getattr(diffusers, index[fam.denoiser][1]).from_config(denoiser_config)
        parts["vae"] = diffusers.AutoencoderKL.from_config(vae_config)
        for slot in fam.text_encoders:
            parts[slot.encoder] = getattr(transformers, index[slot.encoder][1])(encoder_configs[slot.encoder])
    return LoadedModel(family=fam, source=source, components=parts)


def _reference_for_file(path: Path, wanted: Wanted) -> LoadedModel:
    """A single file without basic.base_model_config: its family's published configs (what it loads with
    offline: `models/single_file.py`, `models/flux_single_file.py`), the family and a FLUX.1 file's variant told
    from its key names as loading tells them."""
    from conjure.models.flux_single_file import is_all_in_one
    from conjure.models.reference import build_reference_components
    from conjure.models.single_file import file_family, file_keys
    from conjure.models.transformer_loading import file_has_guidance, is_flux_file, transformer_only

    try:
        keys = file_keys(path, None)[0]
    except Exception as exc:
        raise ConjureError(f"cannot read checkpoint {str(path)!r}: {str(exc).splitlines()[0]}") from None
    variant = None
    if is_flux_file(keys):
        fam = wanted.pick(families.FLUX)  # the family whose files is_flux_file recognises
        if not is_all_in_one(fam, keys):
            raise transformer_only(path)
        variant = families.variant_with_guidance(fam, file_has_guidance(keys)).name
    else:
        fam = wanted.pick(file_family(keys))
    return LoadedModel(family=fam, source=str(path),
                       components=build_reference_components(fam.name, device="meta", variant=variant))


# --- what is where -------------------------------------------------------------------------------------------
def _frozen_bytes(module: torch.nn.Module, dtype: torch.dtype, quantized: str) -> float:
    """A frozen part's weights in `dtype`, its Linear weights in `quantized` form ("auto": not)."""
    size = torch.empty((), dtype=dtype).element_size()
    if quantized not in QUANTIZED_BYTES:
        return float(sum(p.numel() for p in module.parameters()) * size)
    from conjure.models.quantize import linear_layers

    linears = [module.get_submodule(n) for n in linear_layers(module)]
    converted = {id(m.weight) for m in linears}
    rest = sum(p.numel() for p in module.parameters() if id(p) not in converted)
    packed = sum(m.weight.numel() * QUANTIZED_BYTES[quantized] for m in linears)
    scales = sum(m.out_features * 4 for m in linears) if quantized == "float8" else 0
    return float(rest * size + packed + scales)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_terms(model: LoadedModel, precision: str, base_weights: str) -> dict[str, Term]:
    """Each frozen part's weights as the run keeps them (`setup.place_model`)."""
    from conjure.train.setup import WEIGHT_DTYPES

    terms = {}
    for name, part in model.components.items():
        if not isinstance(part, torch.nn.Module):
            continue
        dtype = torch.float32 if name == "vae" and precision == "fp16" else WEIGHT_DTYPES[precision]
        form = base_weights if part is model.denoiser and base_weights != "auto" else _dtype_name(dtype)
        terms[name] = Term(f"{name} weights ({form})", _frozen_bytes(part, dtype, base_weights if
                                                                      part is model.denoiser else "auto"), "counted")
    return terms


def trained_parameters(recipe: Recipe) -> int:
    seen: dict[int, int] = {}
    for group in recipe.parameter_groups(1.0):
        seen.update((id(p), p.numel()) for p in group["params"])
    return sum(seen.values())


def training_terms(trainable: int, optimizer: str, beta1: float, fused_largest: int | None = None,
                   weight_dtype: torch.dtype = torch.float32) -> list[Term]:
    """`fused_largest`: with optimizer.fused_backward_pass, the largest trained tensor's size: each gradient is
    freed once its weight stepped, so about one (the largest) exists at a time instead of all of them.
    `weight_dtype`: how the trained weights are stored (a full fine-tune's bf16 weights), their gradients too;
    the optimizer's state is float32 either way."""
    state = OPTIMIZER_BYTES[optimizer] - (4.0 if optimizer == "prodigy" and beta1 == 0 else 0.0)
    size, kind = weight_dtype.itemsize, str(weight_dtype).removeprefix("torch.")
    gradients = (Term(f"gradients ({kind}, fused backward pass: the largest weight's)", fused_largest * size,
                      "modelled") if fused_largest is not None
                 else Term(f"gradients ({kind})", trainable * size, "counted"))
    return [Term(f"trained parameters ({kind})", trainable * size, "counted"), gradients,
            Term(f"optimizer state ({optimizer})", trainable * state, "counted")]

def ema_terms(recipe: Recipe, cuda: bool) -> tuple[list[Term], list[Term]]:
    """A full fine-tune's EMA (finetune.ema, train/ema.py: a float32 copy of every trained weight, with the weights
    or in RAM where `on_cpu`) as ([accelerator terms], [RAM terms]); none without one. Kept in RAM beside weights
    on the GPU, each update first copies the weights there too (float32), after the step has freed its gradients
    and activations: that copy is the RAM's training peak, not the accelerator's."""
    ema = getattr(recipe, "ema", None)  # only the finetune recipe keeps one
    if ema is None:
        return [], []
    size = float(sum(a.numel() for a in ema.average) * 4)
    in_ram = ema.device is not None and ema.device.type == "cpu"
    term = Term(f"EMA of the trained weights (float32{', on_cpu' if in_ram and cuda else ''})", size, "counted")
    if not cuda:
        return [], [term]
    if not in_ram:
        return [term], []
    return [], [term, Term("EMA update: the trained weights copied to RAM (float32)", size, "modelled")]


def loaded_bytes(model: LoadedModel, frozen: torch.dtype, base_weights: str = "auto") -> list[tuple[str, str, float]]:
    """(part, dtype, bytes) as loading reads each part (`models/loading.py`, `single_file.py`,
    `transformer_loading.py`): in the run's frozen dtype (`Wanted.frozen_dtype`), every VAE in float32; a
    transformer family's denoiser under `base_weights` float8 quantised as it streams in
    (models/transformer_stream.py): in float8, and its largest block in the frozen dtype while it is converted."""
    from conjure.models.transformer_stream import units

    rows = []
    for name, part in model.components.items():
        if not isinstance(part, torch.nn.Module):
            continue
        dtype = torch.float32 if name == "vae" else frozen
        if part is model.denoiser and model.family.denoiser == "transformer" and base_weights == "float8":
            block = max(_frozen_bytes(unit, dtype, "auto") for _, unit in units(part))
            rows.append((name, f"float8, a block in {_dtype_name(dtype)}", _frozen_bytes(part, dtype, "float8") + block))
        else:
            rows.append((name, _dtype_name(dtype), _frozen_bytes(part, dtype, "auto")))
    return rows
