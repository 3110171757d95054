"""A whole SD model from one checkpoint file (.safetensors or .ckpt in the original LDM / SGM layout): lean, and
offline.

Lean: each part is built on the meta device and filled from its own tensors only, read in the dtype it will live
in (`Wanted.frozen_dtype`: the run's frozen dtype; the VAE in float32 as `place_model` keeps it under fp16), one
part at a time. A .safetensors file is opened once per part and closed after it, so its memory-mapped pages
(counted as resident while mapped) are released before the next part loads. diffusers' own
`from_single_file(pipeline)` reads the whole file into memory, then copies each part to float32: 3x the model's
size in RAM for an fp16 file (issue 23: SD 1.5 6.4 GiB, SDXL 20.1 GiB to the start of a run). The conversion of
each part's names is diffusers' (`loaders/single_file_utils.py`: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint through `from_single_file` given a state dict, create_diffusers_clip_model_from_ldm;
diffusers 0.42.1).

Offline: the configs the parts are built from are conjure's own copies of the families' published ones
(`assets/configs/<family>`: model_index.json, unet, vae, text encoder and scheduler configs, written by
`models/reference.py` save_configs), the tokenizers conjure's (`models/tokenizer.py`, the real BPE vocabulary),
so a single file needs no hub access; `basic.base_model_config` (a diffusers folder or hub id) overrides them.
The family comes from the file's text-encoder key names; the prediction type and schedule from its markers
(`single_file_facts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from conjure import families
from conjure.errors import ConjureError
from conjure.families import Family

if TYPE_CHECKING:
    from conjure.families.record import TextEncoderSlot
    from conjure.models.loading import Fact, LoadedModel, Wanted

CONFIGS = Path(__file__).parent / "assets" / "configs"  # <family>/: the configs a single file of it loads with
LDM_UNET = "model.diffusion_model."
# Stability's generative-models (sgm) layout keeps a family's only text encoder under this prefix (SD 2.x files
# saved from it): diffusers reads it as create_diffusers_clip_model_from_ldm's is_open_clip_sdxl_refiner_model.
SGM_LONE_ENCODER = "conditioner.embedders.0."
# Playground v2.5 (edm_mean/edm_std) and EDM v-prediction files (edm_vpred.*) sample a continuous EDM
# schedule (ComfyUI: ModelType.EDM / V_PREDICTION_EDM); the DDPM loss here would train them wrongly.
EDM_MARKERS = ("edm_mean", "edm_std", "edm_vpred.sigma_max")


# The safetensors format's dtype names (safetensors' `Dtype`, the header's "dtype")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class CheckpointTensors:
    """A checkpoint's key names, and its tensors read a part at a time in a given dtype. A .safetensors file is
    read tensor by tensor with plain reads (its header says where each one is: the format's spec, an 8-byte
    little-endian header length, the JSON header, the data): not memory-mapped, whose touched pages count as
    resident while the mapping lives (safetensors' `safe_open` maps the whole file), so the read copy is the only
    one. A .ckpt is unpickled once, memory-mapped where its format allows."""

    def __init__(self, path: Path):
        import torch

        from conjure.files import read_safetensors_header

        self.path = path
        self.state: dict[str, Any] | None = None
        if path.suffix.lower() == ".safetensors":
            length, header = read_safetensors_header(path)
            header.pop("__metadata__", None)
            self.start, self.header = 8 + length, header
            self.keys = set(header)
            return
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # a pre-1.6 (not zip) file cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        self.state = state
        self.keys = set(state)

    def read(self, names: list[str], dtype: Any = None) -> dict[str, Any]:
        """The tensors `names`, floating ones in `dtype` (None: as stored)."""

        def cast(tensor: Any) -> Any:
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

        if self.state is not None:
            return {name: cast(self.state[name]) for name in names}
        import torch

        out = {}
        with self.path.open("rb") as f:
            for name in names:
                entry = self.header[name]
                begin, end = entry["data_offsets"]
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(self.start + begin)
                if f.readinto(memoryview(raw.numpy())) != end - begin:
                    raise ValueError(f"the file ends inside tensor {name!r} (truncated?)")
                kind = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
                out[name] = cast(raw.view(kind).reshape(entry["shape"]))
        return out


def file_keys(path: Path, probe_key: str | None) -> tuple[set[str], Any]:
    """A checkpoint's key names and the one tensor `probe_key` (or None), without reading the other weights."""
    tensors = CheckpointTensors(path)
    return tensors.keys, tensors.read([probe_key])[probe_key] if probe_key in tensors.keys else None


def file_family(keys: set[str]) -> Family:
    """The SD family of a whole-model file, from its text encoders' key names: SDXL's two, SD 2.x's OpenCLIP
    (`cond_stage_model.model.`, or sgm's lone encoder), else SD 1.x's OpenAI CLIP."""
    for fam in sorted(families.unet_families().values(), key=lambda f: -len(f.text_encoders)):
        if all(any(k.startswith(slot.checkpoint_prefix) for k in keys) for slot in fam.text_encoders):
            return fam
    return families.SD2 if any(k.startswith(SGM_LONE_ENCODER) for k in keys) else families.SD1


def _encoder_keys(fam: Family, slot: TextEncoderSlot, keys: set[str]) -> list[str]:
    prefixes = (slot.checkpoint_prefix,) if len(fam.text_encoders) > 1 else (slot.checkpoint_prefix, SGM_LONE_ENCODER)
    return sorted(k for k in keys if k.startswith(prefixes))


def _refuse_edm(path: Path, keys: set[str]) -> None:
    edm = [k for k in EDM_MARKERS if k in keys]
    if edm:
        raise ConjureError(
            f"{path.name} is an EDM checkpoint (it has {edm[0]!r}, e.g. Playground v2.5 or an EDM v-prediction "
            "model); conjure trains DDPM-schedule models (SD 1.x, 2.x, SDXL) only"
        )


def single_file_facts(
    path: Path, fam: Family, keys: set[str], probe: Any, *, requested: str, config_given: bool,
    scheduler_config: Any, native: int,
) -> tuple[Fact, Fact, Fact]:
    """Prediction type, zero-terminal SNR and native resolution of a single file, each with its source."""
    from conjure.models.loading import Fact

    config = "basic.base_model_config"
    if "ztsnr" in keys:
        zero_snr = Fact(True, "file marker 'ztsnr'")
    else:
        zero_snr = Fact(bool(scheduler_config.get("rescale_betas_zero_snr", False)),
                        config if config_given else "no 'ztsnr' marker in the file")
    if requested != "auto":
        prediction = Fact(requested, "advanced.prediction_type")
    elif "v_pred" in keys:
        prediction = Fact("v_prediction", "file marker 'v_pred'")
    elif config_given:
        prediction = Fact(scheduler_config.prediction_type, config)
    elif fam.prediction_probe:
        if probe is None:
            raise ConjureError(
                f"cannot tell whether {path.name} is a {fam.title} v-prediction (768 px) or epsilon (2.x-base, 512 px) "
                f"model: it has no 'v_pred' marker and no {fam.prediction_probe!r}; set advanced.prediction_type, "
                "or basic.base_model_config to the diffusers folder or hub id of the model it was made from"
            )
        spread = float(probe.float().std(unbiased=False))
        kind = "v_prediction" if spread > fam.prediction_probe_threshold else "epsilon"
        prediction = Fact(kind, f"heuristic: spread {spread:.3f} of {fam.prediction_probe} "
                                f"{'>' if kind == 'v_prediction' else '<='} {fam.prediction_probe_threshold} "
                                "(ComfyUI's rule)")
    else:
        prediction = Fact("epsilon", "no 'v_pred' marker in the file")
    if config_given:
        resolution = Fact(native, config)
    elif fam.resolution_by_prediction:
        resolution = Fact(dict(fam.resolution_by_prediction)[prediction.value],
                          f"{fam.title} with {prediction.value} ({prediction.source})")
    else:
        resolution = Fact(native, f"{fam.title}'s published config")
    return prediction, zero_snr, resolution


def filled(part: Any, name: str, path: Path) -> Any:
    """`part`, refused where the file left any of its weights unfilled (still on the meta device)."""
    missing = next((n for n, p in part.named_parameters() if p.is_meta), None)
    if missing is not None:
        raise ConjureError(f"cannot load checkpoint {str(path)!r}: it has no weights for the {name}'s {missing!r}")
    return part


def _tokenizer(config: str, slot: TextEncoderSlot) -> Any:
    """The config folder's tokenizer, conjure's CLIP tokenizer where it ships none (conjure's own configs), or
    the hub id's."""
    from transformers import CLIPTokenizer

    from conjure.models.tokenizer import clip_tokenizer
    from conjure.models.tokenizer_cache import clip_tokenizer_from

    folder = Path(config, slot.tokenizer)
    if folder.is_dir():
        return clip_tokenizer_from(folder)
    if Path(config).is_dir():
        return clip_tokenizer(slot.pad_token)
    return CLIPTokenizer.from_pretrained(config, subfolder=slot.tokenizer)


def _parts(tensors: CheckpointTensors, fam: Family, config: str, dtype: Any) -> dict[str, Any]:
    """The model's parts, each filled from its own tensors in its dtype, one after the other."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    keys, path = tensors.keys, tensors.path
    unet_keys = sorted(k for k in keys if k.startswith(fam.checkpoint_unet_prefix))
    parts: dict[str, Any] = {"unet": filled(UNet2DConditionModel.from_single_file(
        tensors.read(unet_keys, dtype), config=config, subfolder="unet", torch_dtype=dtype), "UNet", path)}
    vae_keys = sorted(k for k in keys if k.startswith(fam.checkpoint_vae_prefix))
    parts["vae"] = filled(AutoencoderKL.from_single_file(
        tensors.read(vae_keys, torch.float32), config=config, subfolder="vae", torch_dtype=torch.float32), "VAE", path)
    for slot in fam.text_encoders:
        cls = CLIPTextModelWithProjection if slot.pooled else CLIPTextModel
        state = tensors.read(_encoder_keys(fam, slot, keys), dtype)
        parts[slot.encoder] = filled(create_diffusers_clip_model_from_ldm(
            cls, state, subfolder=slot.encoder, config=config, torch_dtype=dtype), slot.encoder, path)
        parts[slot.tokenizer] = _tokenizer(config, slot)
    # Training uses the DDPM forward process of the config's schedule, whatever sampler it names
    parts["scheduler"] = DDPMScheduler.from_pretrained(config, subfolder="scheduler")
    return parts


def load_single_file(path: Path, wanted: Wanted, base_model_config: str | None, prediction_type: str = "auto"
                     ) -> LoadedModel:
    """A whole SD model from `path`, with its configs from `base_model_config` or conjure's copies of its
    family's published ones."""
    import torch
    from diffusers import UNet2DConditionModel

    from conjure.models.loading import LoadedModel, _native_resolution, _settle

    try:
        keys, probe = file_keys(path, LDM_UNET + families.SD2.prediction_probe)
        tensors = CheckpointTensors(path)
    except Exception as exc:
        raise ConjureError(f"cannot read checkpoint {str(path)!r}: {str(exc).splitlines()[0]}") from None
    _refuse_edm(path, keys)
    by_keys = file_family(keys)
    config = base_model_config or str(CONFIGS / by_keys.name)
    try:
        unet_config = UNet2DConditionModel.load_config(config, subfolder="unet")
        detected = families.detect(unet_config, has_text_encoder_2=len(by_keys.text_encoders) > 1)
    except Exception as exc:
        from conjure.models.loading import fail

        raise fail(config, exc, "basic.base_model_config" if base_model_config else "the config of") from None
    fam = wanted.pick(detected)
    try:
        parts = _parts(tensors, fam, config, wanted.frozen_dtype or torch.float32)
    except ConjureError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConjureError(f"cannot load checkpoint {str(path)!r}: {reason}") from None
    model = LoadedModel(family=fam, source=str(path), components=parts)
    _settle(model, *single_file_facts(
        path, fam, keys, probe, requested=prediction_type, config_given=bool(base_model_config),
        scheduler_config=parts["scheduler"].config, native=_native_resolution(parts["unet"], parts["vae"]),
    ))
    return model
