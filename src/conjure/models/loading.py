"""Load a base model's parts for training: from a hub id, a diffusers folder, or a single-file checkpoint.

Components are loaded one by one (not as a pipeline) so that nothing training does not need (safety
checker, feature extractor) is loaded. The family is read from the model's own configs.

Besides the parts, loading settles the facts training depends on and says where each came from
(`LoadedModel.facts`): the prediction type and noise schedule (written into the DDPM scheduler every other
part reads) and the native resolution. A diffusers model states them in its configs. A single file does not
(`models/single_file.py`, which loads one lean and offline): its family comes from its key names and the UNet
config it loads with, its target from marker keys as ComfyUI reads them (`comfy/supported_models.py`: `v_pred`,
`ztsnr`, `edm_*`), an SD 2.x file's 768-v vs 2.x-base from `basic.base_model_config` or ComfyUI's
weight-statistic rule (`SD20.model_type`), and conjure refuses to guess where none of these decides.

Every part loads in the dtype the run keeps it in (`Wanted.frozen_dtype`; every VAE in float32), so a bf16 run
never holds a float32 copy of its model.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from conjure import families
from conjure.errors import ConjureError
from conjure.families import Family, Variant

if TYPE_CHECKING:
    from conjure.config.sections import AdvancedConfig

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Fact:
    """A fact training depends on and where it came from (a setting, a file marker, a config, a heuristic)."""

    value: Any
    source: str


@dataclass
class LoadedModel:
    """A base model's parts under their diffusers pipeline names (unet, vae, scheduler, text_encoder, ...).

    `facts`: prediction_type, zero_terminal_snr, resolution (native) and vae, each with its source."""

    family: Family
    source: str
    components: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Fact] = field(default_factory=dict)
    # Parts built on the meta device (their configs only) whose weights `load_pending` reads (Wanted.defer_denoiser)
    pending: dict[str, Callable[[], Any]] = field(default_factory=dict)

    @property
    def unet(self) -> Any:
        return self.components["unet"]

    @property
    def denoiser(self) -> Any:
        """The model that denoises: the UNet, or a transformer family's transformer (`Family.denoiser`)."""
        return self.components[self.family.denoiser]

    @property
    def vae(self) -> Any:
        return self.components["vae"]

    @property
    def noise_scheduler(self) -> Any:
        return self.components["scheduler"]

    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in the family's order."""
        return [(self.components[s.tokenizer], self.components[s.encoder]) for s in self.family.text_encoders]

    def load_pending(self) -> None:
        """Read the weights of the parts built on the meta device (`pending`), memory freed meanwhile given back
        (`_freed_memory_returned`); a run with none keeps glibc's settings."""
        if not self.pending:
            return
        with _freed_memory_returned():
            for name, load in self.pending.items():
                self.components[name] = load()
        self.pending.clear()


# glibc's mallopt(3) parameter and its ceiling on 64-bit systems (malloc/malloc.c: M_MMAP_THRESHOLD,
# DEFAULT_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * sizeof(long))
M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -3, 32 * 2**20


@contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """Inside, each new allocation of 128 KiB or more is a mapping of its own, unmapped when freed. glibc keeps
    freed allocations below its mmap threshold in its heap and raises that threshold (up to 32 MiB) whenever a
    larger mapping is freed (mallopt(3), "dynamic mmap threshold"), so a transformer streamed in a block at a time
    and converted (float8: each block's bf16 tensors freed between the float8 ones that stay) kept the freed
    memory resident: FLUX.1-dev was at 16.4 GiB after its read, for 11.1 GiB of float8 tensors
    (docs/benchmarks.md). Afterwards the threshold stays at glibc's ceiling, where the dynamic one ends up in a
    run. Not glibc (macOS, musl): nothing changes."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 128 * 2**10)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)


def fail(source: str, exc: BaseException, what: str = "base model") -> ConjureError:
    from huggingface_hub.errors import LocalEntryNotFoundError

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, LocalEntryNotFoundError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:  # diffusers words an unreachable Hub as "does not appear to have a file named ..."
        reason = "not in the local cache, and the Hub could not be reached (offline, or no network?)"
    return ConjureError(f"cannot load {what} {source!r}: {reason}")


@dataclass(frozen=True)
class Wanted:
    """What the run asks of the model, checked once the configs say its family, before any weights load:
    `family` (basic.family), the families the method trains, and the advanced settings (those of the other
    objective are refused, naming the field)."""

    family: str = "auto"
    allowed: tuple[str, ...] | None = None
    method: str = ""
    advanced: AdvancedConfig | None = None
    # The dtype the run keeps frozen weights in (place_model casts them to it). Every part but the VAE loads in it
    # directly: FLUX.1-dev's transformer and T5 take 68 GB of RAM in float32, 34 GB in bf16, and end up the same.
    frozen_dtype: Any = None
    # Training: a transformer family's denoiser is built on the meta device and its weights read by
    # LoadedModel.load_pending, after the text encoders encoded the captions ahead and were freed
    # (train/text_ahead.py), so FLUX.1-dev's RAM never holds T5-XXL (9.5 GB) beside the transformer (23.8 GB in bf16)
    defer_denoiser: bool = False

    def pick(self, detected: Family) -> Family:
        if self.family != "auto" and self.family != detected.name:
            raise ConjureError(
                f"basic.family is {self.family!r} but the model looks like {detected.name} ({detected.title}); "
                "set basic.family: auto or check basic.base_model"
            )
        if self.allowed is not None and detected.name not in self.allowed:
            raise ConjureError(
                f"{self.method or 'this method'} trains {' and '.join(self.allowed)} models, but the base model is "
                f"{detected.name} ({detected.title})"
            )
        misplaced = self.advanced.misplaced(detected.objective, detected.title) if self.advanced else None
        if misplaced:
            raise ConjureError(": ".join(misplaced))
        if self.advanced and not detected.clip_skip and self.advanced.clip_skip != 1:
            raise ConjureError(f"advanced.clip_skip: {detected.title} reads fixed text-encoder layers; set it to 1")
        return detected

    def check_variant(self, variant: Variant) -> None:
        if self.advanced and not variant.guidance and self.advanced.guidance != 1.0:
            raise ConjureError(f"advanced.guidance: {variant.title} has no guidance input; set it to 1.0")


def load_base_model(
    base_model: str,
    *,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    base_model_config: str | None = None,
    allowed_families: tuple[str, ...] | None = None,
    method: str = "",
    prediction_type: str = "auto",
    vae: str | None = None,
    advanced: AdvancedConfig | None = None,
    frozen_dtype: Any = None,
    defer_denoiser: bool = False,
) -> LoadedModel:
    """`allowed_families`: refuse (from the configs, before weights load) a model of another family.
    `prediction_type`: "auto" (from the model) or the user's setting, which wins. `vae`: a VAE to use instead.
    `advanced`: the run's advanced settings, refused (before weights load) where the family cannot use them.
    `frozen_dtype`: the torch dtype the run will cast frozen weights to (None: float32), which every part but
    the VAE (float32) loads in. `defer_denoiser`: Wanted.defer_denoiser."""
    wanted = Wanted(family, allowed_families, method, advanced, frozen_dtype, defer_denoiser)
    path = Path(base_model).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ConjureError(f"base model {base_model!r} is a file but not a .safetensors/.ckpt checkpoint")
        model = _load_file(path, wanted, base_model_config, prediction_type)
    elif path.is_dir():
        if not (path / "model_index.json").is_file() or not any((path / d).is_dir() for d in ("unet", "transformer")):
            raise ConjureError(
                f"base model folder {base_model!r} is not a diffusers model (no model_index.json with unet/ or "
                "transformer/); give a diffusers folder, a .safetensors checkpoint or a hub id"
            )
        model = _load_diffusers(str(path), wanted, revision=None, variant=variant)
    elif HUB_ID.match(base_model) and not base_model.startswith((".", "/", "~")):
        model = _load_diffusers(base_model, wanted, revision=revision, variant=variant)
    else:
        raise ConjureError(f"base model not found: {base_model!r} is not a folder, a checkpoint file or a hub id")
    if not model.facts:  # a diffusers model: its configs state everything
        config = model.noise_scheduler.config
        model_config = "the model's scheduler config"
        _settle(
            model,
            Fact(prediction_type, "advanced.prediction_type") if prediction_type != "auto"
            else Fact(config.prediction_type, model_config),
            Fact(bool(config.get("rescale_betas_zero_snr", False)), model_config),
            Fact(_native_resolution(model.unet, model.vae), "the model's UNet config (sample_size)"),
        )
    model.facts["vae"] = Fact(model.source, "the base model")
    if vae:
        model.components["vae"] = load_vae(vae, model.vae)
        model.facts["vae"] = Fact(vae, "basic.vae")
    return model


def _load_file(path: Path, wanted: Wanted, base_model_config: str | None, prediction_type: str) -> LoadedModel:
    """A single file: a FLUX.1 transformer (its keys say so) or a whole SD model."""
    from conjure.models import transformer_loading as flow

    from conjure.models.single_file import file_keys, load_single_file

    try:
        keys = file_keys(path, None)[0] if path.suffix.lower() == ".safetensors" else set()
    except Exception as exc:
        raise ConjureError(f"cannot read checkpoint {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if flow.is_flux_file(keys):
        return flow.load_flux_file(path, keys, base_model_config, wanted)
    return load_single_file(path, wanted, base_model_config, prediction_type)


def _native_resolution(unet: Any, vae: Any) -> int:
    """The resolution the model was trained at: UNet sample size times the VAE's downscale."""
    return unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def _settle(model: LoadedModel, prediction: Fact, zero_snr: Fact, resolution: Fact) -> None:
    """Record the facts and write the schedule into the DDPM scheduler that the loss and validation read."""
    from diffusers import DDPMScheduler

    model.facts.update(prediction_type=prediction, zero_terminal_snr=zero_snr, resolution=resolution)
    model.components["scheduler"] = DDPMScheduler.from_config(
        model.noise_scheduler.config, prediction_type=prediction.value, rescale_betas_zero_snr=zero_snr.value
    )


def _load_diffusers(source: str, wanted: Wanted, *, revision: str | None, variant: str | None) -> LoadedModel:
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import torch

    from conjure.models import transformer_loading as flow
    from conjure.models.tokenizer_cache import clip_tokenizer_from

    common = {"revision": revision}
    try:
        index = DiffusionPipeline.load_config(source, **common)
    except Exception as exc:  # diffusers raises OSError, ValueError or hub errors here
        raise fail(source, exc) from None
    if "transformer" in index:  # a flow-matching transformer model (FLUX.1)
        return flow.load_flow_diffusers(source, wanted, revision=revision, variant=variant)
    # Load in the run's frozen dtype whatever the files hold (fp16 files are common), as place_model would cast
    # them (the VAE in float32, which place_model keeps under fp16): no float32 copy of a bf16 run's model.
    # transformers 5 keeps a file's dtype unless told.
    dtype = wanted.frozen_dtype or torch.float32
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
    except Exception as exc:
        raise fail(source, exc) from None
    detected = families.detect(unet_config, has_text_encoder_2=bool(index.get("text_encoder_2", [None])[0]))
    fam = wanted.pick(detected)
    encoder_classes = {"CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    try:
        from diffusers import AutoencoderKL, DDPMScheduler

        components: dict[str, Any] = {
            "unet": _diffusers_part(UNet2DConditionModel, source, "unet", variant, dtype, common),
            "vae": _diffusers_part(AutoencoderKL, source, "vae", variant, torch.float32, common),
            # Training always uses the DDPM forward process of the model's own scheduler config
            # (betas, prediction type), whatever sampler the model ships for inference.
            "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        }
        for slot in fam.text_encoders:
            class_name = index.get(slot.encoder, [None, "CLIPTextModel"])[1]
            cls = encoder_classes.get(class_name, CLIPTextModel)
            folder = Path(source, slot.tokenizer)
            components[slot.tokenizer] = (clip_tokenizer_from(folder) if folder.is_dir() else
                                          CLIPTokenizer.from_pretrained(source, subfolder=slot.tokenizer, **common))
            components[slot.encoder] = cls.from_pretrained(
                source, subfolder=slot.encoder, variant=variant, dtype=dtype, **common
            )
    except Exception as exc:
        raise fail(source, exc) from None
    return LoadedModel(family=fam, source=source, components=components)


def _diffusers_part(cls: Any, source: str, subfolder: str, variant: str | None, dtype: Any,
                    common: dict[str, Any]) -> Any:
    """A diffusers model of the folder `source`, read tensor by tensor in `dtype` into a model built on the meta
    device where its weights are one .safetensors file of exactly its state dict's keys: diffusers' own loader
    memory-maps the file, whose touched pages count as resident beside the loaded copy (SD 1.5's fp16 folder:
    3.6 GiB peak to a bf16 run's start against 2.8 from a single file). A hub id reads its snapshot folder in the
    Hugging Face cache the same way (`hub_part`). Anything else (shards, .bin, older key names diffusers renames
    as it loads) goes through `from_pretrained`."""
    from accelerate import init_empty_weights

    from conjure.models.single_file import CheckpointTensors

    name = weight_files(variant)[0]
    folder = Path(source, subfolder) if Path(source).is_dir() else hub_part(source, subfolder, name, common)
    file = folder / name if folder else None
    if file is not None and file.is_file():
        with init_empty_weights():  # parameters on meta, buffers real
            model = cls.from_config(cls.load_config(str(file.parent)))
        tensors = CheckpointTensors(file)
        if tensors.keys == set(model.state_dict()):
            model.load_state_dict(tensors.read(sorted(tensors.keys), dtype), assign=True)
            return model.eval()
    return cls.from_pretrained(source, subfolder=subfolder, variant=variant, torch_dtype=dtype, **common)


def weight_files(variant: str | None) -> tuple[str, str]:
    """A diffusers model part's weights: one file, or the index of its shards (diffusers' SAFETENSORS_WEIGHTS_NAME
    and SAFE_WEIGHTS_INDEX_NAME, `_add_variant` putting the variant before the last suffix)."""
    stem = "diffusion_pytorch_model"
    if variant:
        return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def hub_part(repo: str, subfolder: str, name: str, common: dict[str, Any]) -> Path | None:
    """The folder of a hub model's part in the Hugging Face cache (snapshots/<commit>/<subfolder>), holding its
    config and the weights file `name`: taken from the cache as `from_pretrained` would (offline: the cache only;
    online: the revision's files, downloaded if missing), or None where it has no such file or cannot get it, for
    `from_pretrained` to load (or fail) with its own messages, as before."""
    from huggingface_hub import hf_hub_download

    try:
        for filename in ("config.json", name):
            local = hf_hub_download(repo, filename, subfolder=subfolder, revision=common["revision"])
    except Exception:  # not cached offline, not on the Hub (shards, .bin), unreachable: from_pretrained says
        return None
    return Path(local).parent


def load_vae(source: str, like: Any) -> Any:
    """`basic.vae`: a hub id, a diffusers VAE folder (or a model folder with vae/), or one .safetensors/.ckpt
    file with original or diffusers key names; a file takes its architecture and scaling factor from `like`
    (the base model's VAE), as the apps load a VAE file for a checkpoint."""
    import torch
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    try:
        if path.is_file():
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, load_single_file_checkpoint

            state = load_single_file_checkpoint(str(path))
            if not any(k.startswith("decoder.up_blocks.") for k in state):
                state = convert_ldm_vae_checkpoint(state, dict(like.config))
            vae = AutoencoderKL.from_config(like.config)
            vae.load_state_dict(state)
        elif path.is_dir():
            sub = {} if (path / "config.json").is_file() else {"subfolder": "vae"}
            vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=torch.float32, **sub)
        elif HUB_ID.match(source):
            vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32)
        else:
            raise ConjureError(f"basic.vae: {source!r} is not a file, a folder or a hub id")
    except ConjureError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConjureError(f"basic.vae: cannot load {source!r}: {reason}") from None
    if vae.config.latent_channels != like.config.latent_channels:
        raise ConjureError(
            f"basic.vae: {source!r} has {vae.config.latent_channels} latent channels, the base model's VAE "
            f"{like.config.latent_channels}"
        )
    return vae.to(torch.float32).eval()
