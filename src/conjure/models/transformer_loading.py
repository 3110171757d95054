"""Load a flow-matching transformer family's model (FLUX.1): a diffusers folder or hub id, a single-file
transformer checkpoint with the rest of the model from `basic.base_model_config`, or without it ComfyUI's
all-in-one checkpoint (models/flux_single_file.py: offline, from the configs conjure ships).

The family comes from the pipeline class in model_index.json (`_class_name`: FluxPipeline) and the variant
from the transformer's own config: FLUX.1-dev was guidance-distilled and takes the guidance value as an input
(`guidance_embeds: true`), schnell does not. A single file (BFL's flux1-dev.safetensors, with the original
`double_blocks.N...` names, with or without ComfyUI's `model.diffusion_model.` prefix, or a diffusers-named
transformer) holds the transformer alone; its variant is read from its keys as diffusers reads it
(`loaders/single_file_utils.py` infer_diffusers_model_type: a `guidance_in` embedder is dev) and must agree with
the base_model_config's, and diffusers' own converter (`FluxTransformer2DModel.from_single_file`) renames it.
For training (`Wanted.defer_denoiser`) the transformer is built on the meta device from its config, every check
done, and its weights are read by `LoadedModel.load_pending` after the captions were encoded ahead and the text
encoders freed (train/text_ahead.py); under `advanced.base_weights_dtype: float8` that read streams the weights in
a block at a time, each block quantised at once (models/transformer_stream.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from conjure import families
from conjure.errors import ConjureError
from conjure.families import Family
from conjure.models import transformer_stream as stream
from conjure.models.loading import Fact, LoadedModel, Wanted, fail, hub_part, weight_files

# Marker keys of a FLUX.1 transformer file: BFL's names (diffusers' CHECKPOINT_KEY_NAMES["flux"]) and diffusers'
# own (the single-stream blocks' MLP input: SD3's diffusers transformer has double-stream blocks only); each
# layout's guidance embedder. ComfyUI saves BFL's names under `model.diffusion_model.`.
COMFY_PREFIX = "model.diffusion_model."
FLUX_MARKERS = ("double_blocks.0.img_attn.norm.key_norm.scale", "single_transformer_blocks.0.proj_mlp.weight")
GUIDANCE_KEYS = ("guidance_in.in_layer.bias", "time_text_embed.guidance_embedder.linear_1.bias")
# ComfyUI's scaled float8 files: a `scaled_fp8` marker after a part's prefix and a per-layer `scale_weight` that its
# float8 weights are multiplied by as they are used (comfy/model_detection.py model_config_from_unet,
# comfy/text_encoders/sd3_clip.py t5_xxl_detect, comfy/ops.py scaled_fp8_ops): read as plain weights they would be
# wrong by that factor
SCALED_FP8 = ("scaled_fp8", ".scale_weight")
FLOW_CLASSES = {"clip": ("CLIPTextModel", "CLIPTokenizer"), "t5": ("T5EncoderModel", "T5TokenizerFast")}


def flow_family(pipeline_class: str) -> Family | None:
    """The transformer family whose pipeline class is `pipeline_class` (model_index.json's `_class_name`)."""
    return next((f for f in families.FAMILIES.values() if f.denoiser == "transformer"
                 and f.pipeline_class == pipeline_class), None)


def is_flux_file(keys: set[str]) -> bool:
    return any(k in keys or COMFY_PREFIX + k in keys for k in FLUX_MARKERS)


def file_has_guidance(keys: set[str]) -> bool:
    return any(k in keys or COMFY_PREFIX + k in keys for k in GUIDANCE_KEYS)


def load_transformer_config(source: str, revision: str | None) -> tuple[Family, dict[str, Any]]:
    """The family and the transformer config of a diffusers model whose model_index.json names a transformer."""
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
        config = FluxTransformer2DModel.load_config(source, subfolder="transformer", revision=revision)
    except Exception as exc:  # diffusers raises OSError, ValueError or hub errors here
        raise fail(source, exc) from None
    fam = flow_family(index.get("_class_name", ""))
    if fam is None:
        raise ConjureError(
            f"base model {source!r} is a {index.get('_class_name')} model; conjure trains "
            + ", ".join(f"{f.title} ({f.pipeline_class})" for f in families.FAMILIES.values())
        )
    return fam, dict(config)


def read_transformer(source: str, fam: Family, *, revision: str | None, variant: str | None, dtype: Any) -> Any:
    """A diffusers model's transformer in `dtype` (the run's frozen dtype: loading.Wanted.frozen_dtype)."""
    import diffusers

    try:
        return diffusers.FluxTransformer2DModel.from_pretrained(source, subfolder=fam.denoiser, variant=variant,
                                                                torch_dtype=dtype, revision=revision)
    except Exception as exc:
        raise fail(source, exc) from None


def load_parts(source: str, fam: Family, *, revision: str | None, variant: str | None, dtype: Any,
               transformer: Any) -> dict[str, Any]:
    """The pipeline's parts with `transformer`: the text encoders in `dtype` (the run's frozen dtype), the VAE
    in float32 (place_model keeps it so under fp16)."""
    import diffusers
    import torch
    import transformers

    common = {"revision": revision}
    try:
        components: dict[str, Any] = {
            fam.denoiser: transformer,
            "vae": diffusers.AutoencoderKL.from_pretrained(
                source, subfolder="vae", variant=variant, torch_dtype=torch.float32, **common),
            # FLUX.1's sampler: its config (base_shift, max_shift, use_dynamic_shifting) is what the flow
            # objective's "shift" sampling and validation read
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler",
                                                                                   **common),
        }
        for slot in fam.text_encoders:
            model_class, tokenizer_class = (getattr(transformers, name) for name in FLOW_CLASSES[slot.kind])
            components[slot.tokenizer] = tokenizer_class.from_pretrained(source, subfolder=slot.tokenizer, **common)
            components[slot.encoder] = model_class.from_pretrained(
                source, subfolder=slot.encoder, variant=variant, dtype=dtype, **common)
    except Exception as exc:
        raise fail(source, exc) from None
    return components


def transformer_only(path: Path) -> ConjureError:
    """The refusal of a FLUX.1 transformer file given without `basic.base_model_config`."""
    return ConjureError(
        f"{path.name} is a FLUX.1 transformer file, which holds the transformer alone; set basic.base_model_config "
        "to the diffusers folder or hub id of the model it belongs to (e.g. black-forest-labs/FLUX.1-dev), for "
        "its VAE and text encoders (CLIP-L, T5-XXL), or train from an all-in-one checkpoint that holds them "
        "(ComfyUI's, e.g. flux1-dev-fp8.safetensors)"
    )


def check_single_transformer(path: Path, keys: set[str], base_model_config: str,
                             pick: Callable[[Family], Family]) -> tuple[Family, str]:
    """A FLUX.1 transformer file's family and the variant's source, before its weights load: the other parts come
    from `base_model_config`, whose transformer config must be of the file's variant. `pick` checks the family
    (loading.Wanted.pick)."""
    fam, config = load_transformer_config(base_model_config, None)
    pick(fam)
    guidance = file_has_guidance(keys)
    if guidance != bool(config.get("guidance_embeds")):
        file_kind = families.variant_with_guidance(fam, guidance)
        raise ConjureError(
            f"{path.name} is a {file_kind.title} transformer ({'a' if guidance else 'no'} guidance input), but "
            f"basic.base_model_config {base_model_config!r} is a {families.detect_variant(fam, config).title} model; "
            f"point it at a {file_kind.title} model"
        )
    return fam, _variant_source(keys)


def _variant_source(keys: set[str]) -> str:
    found = next((k for k in keys if k.removeprefix(COMFY_PREFIX) in GUIDANCE_KEYS), None)
    return f"file key {found!r}" if found else "no guidance embedder in the file"


def read_single_transformer(path: Path, config: str, fam: Family, dtype: Any,
                            streamed: tuple[Any, str] | None = None) -> Any:
    """The transformer of a FLUX.1 file in `dtype`, its config from `config` (a model with a transformer/ config:
    basic.base_model_config, or conjure's shipped one of the file's variant); `streamed` (the model built
    on the meta device, the base_weights_dtype): streamed into it a block at a time, each block converted
    (transformer_stream's module docstring), BFL's names through diffusers' converter, or diffusers' own."""
    from diffusers import FluxTransformer2DModel

    from conjure.models.single_file import CheckpointTensors

    try:
        # Read tensor by tensor in `dtype` (single_file.CheckpointTensors), the transformer's only where a ComfyUI
        # file holds more, rather than diffusers reading the whole file as stored first (an fp8 FLUX.1-dev file:
        # 12 GB as stored beside the 24 GB of bf16 weights it becomes)
        tensors = CheckpointTensors(path)
        names = sorted(k for k in tensors.keys if k.startswith(COMFY_PREFIX)) or sorted(tensors.keys)
        if streamed:
            prefix = COMFY_PREFIX if names[0].startswith(COMFY_PREFIX) else ""

            def diffusers_named(group: list[str]) -> dict[str, Any]:
                return {k.removeprefix(prefix): v for k, v in tensors.read(group, dtype).items()}

            bfl = prefix + FLUX_MARKERS[0] in tensors.keys
            read = stream.bfl_reader(tensors, names, dtype) if bfl else diffusers_named
            return stream.stream_into(streamed[0], names, read, streamed[1], str(path), prefix)
        # diffusers' names under ComfyUI's prefix are diffusers' own once it is dropped (BFL's converter drops it too)
        state = {k.removeprefix(COMFY_PREFIX): v for k, v in tensors.read(names, dtype).items()}
        return FluxTransformer2DModel.from_single_file(state, config=config, subfolder=fam.denoiser, torch_dtype=dtype)
    except ConjureError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConjureError(f"cannot load checkpoint {str(path)!r}: {reason}") from None


def load_flow_diffusers(source: str, wanted: Wanted, *, revision: str | None, variant: str | None) -> LoadedModel:
    """A diffusers folder or hub id whose model_index.json names a transformer."""
    fam, config = load_transformer_config(source, revision)
    wanted.pick(fam)
    dtype = _dtype(wanted)

    def read() -> Any:
        choice = _streamed(wanted)
        try:
            folder = _transformer_folder(source, fam, revision, variant) if choice else None
            found = stream.folder_reader(folder, variant, dtype) if folder else None
            if found is not None:
                return stream.stream_into(_on_meta(config, dtype), *found, choice, source)
        except ConjureError:
            raise
        except Exception as exc:
            raise fail(source, exc) from None
        # not .safetensors, or nothing to quantise: whole, and place_model converts it
        return read_transformer(source, fam, revision=revision, variant=variant, dtype=dtype)

    def parts(transformer: Any) -> dict[str, Any]:
        return load_parts(source, fam, revision=revision, variant=variant, dtype=dtype, transformer=transformer)

    return _assemble(fam, source, wanted, config, read, parts, "the transformer config (guidance_embeds)")


def _transformer_folder(source: str, fam: Family, revision: str | None, variant: str | None) -> Path | None:
    """The transformer's folder: in the model folder, or a hub id's snapshot in the Hugging Face cache with its one
    weights file or its index and every shard (loading.hub_part: offline, the cache only); None where it cannot be
    had so (from_pretrained then loads it, or fails, with its own messages)."""
    if Path(source).is_dir():
        return Path(source, fam.denoiser)
    common = {"revision": revision}
    name, index = weight_files(variant)
    folder = hub_part(source, fam.denoiser, name, common)
    if folder is not None:
        return folder
    folder = hub_part(source, fam.denoiser, index, common)
    shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values())) if folder else []
    return folder if all(hub_part(source, fam.denoiser, shard, common) for shard in shards) else None


def load_flux_file(path: Path, keys: set[str], base_model_config: str | None, wanted: Wanted) -> LoadedModel:
    """A FLUX.1 transformer file and the other parts from `base_model_config`, or without it ComfyUI's all-in-one
    checkpoint with the configs conjure ships (models/flux_single_file.py)."""
    from conjure.models import flux_single_file as whole

    scaled = next((k for k in sorted(keys) if k.endswith(SCALED_FP8)), None)
    if scaled:
        raise ConjureError(
            f"{path.name} is a ComfyUI scaled-float8 checkpoint ({scaled!r}: its float8 weights carry scale factors), "
            "which conjure does not read; use an unscaled file (e.g. Comfy-Org's flux1-dev-fp8.safetensors) or a "
            "bf16/fp16 one"
        )
    dtype = _dtype(wanted)
    if base_model_config:
        fam, variant_source = check_single_transformer(path, keys, base_model_config, wanted.pick)
        config_from = base_model_config
        config = load_transformer_config(base_model_config, None)[1]

        def parts(transformer: Any) -> dict[str, Any]:
            return load_parts(base_model_config, fam, revision=None, variant=None, dtype=dtype, transformer=transformer)
    else:
        fam = wanted.pick(families.FLUX)  # the family whose files is_flux_file recognises
        if not whole.is_all_in_one(fam, keys):
            raise transformer_only(path)
        folder, variant_source = whole.variant_configs(fam, file_has_guidance(keys)), _variant_source(keys)
        config_from = str(folder)
        config = _config_of(config_from)

        def parts(transformer: Any) -> dict[str, Any]:
            return whole.load_parts(path, fam, folder, dtype, transformer)

    def read() -> Any:
        choice = _streamed(wanted)
        streamed = (_on_meta(config, dtype), choice) if choice else None
        return read_single_transformer(path, config_from, fam, dtype, streamed)

    return _assemble(fam, str(path), wanted, config, read, parts, variant_source)


def _config_of(folder: str) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    return dict(FluxTransformer2DModel.load_config(folder, subfolder="transformer"))


def _streamed(wanted: Wanted) -> str | None:
    """The base_weights_dtype a training run's transformer is quantised to as it streams in: float8 (nf4 quantises
    as it moves to the GPU, in place_model)."""
    choice = wanted.advanced.base_weights_dtype if wanted.advanced and wanted.defer_denoiser else "auto"
    return choice if choice == "float8" else None


def _assemble(fam: Family, source: str, wanted: Wanted, config: dict[str, Any], read: Callable[[], Any],
              parts: Callable[[Any], dict[str, Any]], variant_source: str) -> LoadedModel:
    """The model: the transformer read now, or (Wanted.defer_denoiser) built from `config` on the meta device and
    read by LoadedModel.load_pending; the other parts by `parts` (given the transformer)."""
    transformer = _on_meta(config, _dtype(wanted)) if wanted.defer_denoiser else read()
    components = parts(transformer)
    model = LoadedModel(family=fam, source=source, components=components)
    if wanted.defer_denoiser:
        model.pending[fam.denoiser] = read
    _settle(model, wanted, variant_source)
    return model


def _on_meta(config: dict[str, Any], dtype: Any) -> Any:
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel.from_config(config).to(dtype)


def _dtype(wanted: Wanted) -> Any:
    import torch

    return wanted.frozen_dtype or torch.float32


def _settle(model: LoadedModel, wanted: Wanted, variant_source: str) -> None:
    """A flow family's facts: its variant, the objective in place of the DDPM prediction type, the native size
    (the VAE config's sample_size: FLUX.1's says 1024, a tiny model's its own)."""
    fam = model.family
    variant = families.detect_variant(fam, model.denoiser.config)
    wanted.check_variant(variant)
    sample_size = model.vae.config.get("sample_size")
    model.facts.update(
        variant=Fact(variant.name, variant_source),
        prediction_type=Fact("flow_matching", f"the family ({fam.title})"),
        resolution=Fact(sample_size, "the model's VAE config (sample_size)") if isinstance(sample_size, int)
        else Fact(fam.reference.resolution, f"{variant.title}'s native size"),
    )
