"""Load a base model's parts for training: from a hub id, a diffusers folder, or a single-file checkpoint.

Components are loaded one by one (not as a pipeline) so that nothing training does not need (safety
checker, feature extractor) is loaded. The family is read from the model's own configs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conjure import families
from conjure.errors import ConjureError
from conjure.families import Family

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class LoadedModel:
    """A base model's parts under their diffusers pipeline names (unet, vae, scheduler, text_encoder, ...)."""

    family: Family
    source: str
    components: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> Any:
        return self.components["unet"]

    @property
    def vae(self) -> Any:
        return self.components["vae"]

    @property
    def noise_scheduler(self) -> Any:
        return self.components["scheduler"]

    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in the family's order."""
        return [(self.components[s.tokenizer], self.components[s.encoder]) for s in self.family.text_encoders]


def _fail(source: str, exc: BaseException) -> ConjureError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConjureError(f"cannot load base model {source!r}: {reason}")


def _pick_family(requested: str, detected: Family, allowed: tuple[str, ...] | None = None, method: str = "") -> Family:
    if requested != "auto" and requested != detected.name:
        raise ConjureError(
            f"basic.family is {requested!r} but the model looks like {detected.name} ({detected.title}); "
            "set basic.family: auto or check basic.base_model"
        )
    if allowed is not None and detected.name not in allowed:
        # Checked from the configs, before any weights load.
        raise ConjureError(
            f"{method or 'this method'} trains {' and '.join(allowed)} models, but the base model is "
            f"{detected.name} ({detected.title})"
        )
    return detected


def load_base_model(
    base_model: str,
    *,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    base_model_config: str | None = None,
    allowed_families: tuple[str, ...] | None = None,
    method: str = "",
) -> LoadedModel:
    """`allowed_families`: refuse (from the configs, before weights load) a model of another family."""
    check = {"allowed": allowed_families, "method": method}
    path = Path(base_model).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ConjureError(f"base model {base_model!r} is a file but not a .safetensors/.ckpt checkpoint")
        return _load_single_file(path, family, base_model_config, **check)
    if path.is_dir():
        if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
            raise ConjureError(
                f"base model folder {base_model!r} is not a diffusers model (no model_index.json and unet/); "
                "give a diffusers folder, a .safetensors checkpoint or a hub id"
            )
        return _load_diffusers(str(path), family, revision=None, variant=variant, **check)
    if HUB_ID.match(base_model) and not base_model.startswith((".", "/", "~")):
        return _load_diffusers(base_model, family, revision=revision, variant=variant, **check)
    raise ConjureError(f"base model not found: {base_model!r} is not a folder, a checkpoint file or a hub id")


def _load_diffusers(
    source: str, family: str, *, revision: str | None, variant: str | None, allowed: tuple[str, ...] | None = None,
    method: str = "",
) -> LoadedModel:
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import torch

    common = {"revision": revision}
    # Load in float32 whatever the files hold (fp16 files are common): training keeps fp32 masters and casts
    # frozen parts to the run's precision itself. transformers 5 keeps a file's dtype unless told.
    fp32 = {"torch_dtype": torch.float32}
    try:
        index = DiffusionPipeline.load_config(source, **common)
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
    except Exception as exc:  # diffusers raises OSError, ValueError or hub errors here
        raise _fail(source, exc) from None
    detected = families.detect(unet_config, has_text_encoder_2=bool(index.get("text_encoder_2", [None])[0]))
    fam = _pick_family(family, detected, allowed, method)
    encoder_classes = {"CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    try:
        components: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **fp32, **common),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **fp32, **common),
            # Training always uses the DDPM forward process of the model's own scheduler config
            # (betas, prediction type), whatever sampler the model ships for inference.
            "scheduler": DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        }
        for slot in fam.text_encoders:
            class_name = index.get(slot.encoder, [None, "CLIPTextModel"])[1]
            cls = encoder_classes.get(class_name, CLIPTextModel)
            components[slot.tokenizer] = CLIPTokenizer.from_pretrained(source, subfolder=slot.tokenizer, **common)
            components[slot.encoder] = cls.from_pretrained(
                source, subfolder=slot.encoder, variant=variant, dtype=torch.float32, **common
            )
    except Exception as exc:
        raise _fail(source, exc) from None
    return LoadedModel(family=fam, source=source, components=components)


def _single_file_family(path: Path) -> Family:
    """Guess the family from an original (LDM) checkpoint's key names."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        return families.SD1
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return families.SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return families.SD2
    return families.SD1


def _load_single_file(
    path: Path, family: str, base_model_config: str | None, *, allowed: tuple[str, ...] | None = None, method: str = ""
) -> LoadedModel:
    import diffusers

    try:
        fam = families.get(family) if family != "auto" else _single_file_family(path)
        fam = _pick_family(fam.name, fam, allowed, method)
        pipeline_cls = getattr(diffusers, fam.pipeline_class)
        kwargs: dict[str, Any] = {"safety_checker": None} if fam.name != "sdxl" else {}
        if base_model_config:
            kwargs["config"] = base_model_config
        pipe = pipeline_cls.from_single_file(str(path), **kwargs)
    except ConjureError:
        raise
    except Exception as exc:
        hint = "" if base_model_config else " (offline, set basic.base_model_config to a diffusers folder of its family)"
        raise ConjureError(f"cannot load checkpoint {str(path)!r}: {str(exc).splitlines()[0]}{hint}") from None
    components = {"unet": pipe.unet, "vae": pipe.vae, "scheduler": diffusers.DDPMScheduler.from_config(pipe.scheduler.config)}
    for slot in fam.text_encoders:
        components[slot.tokenizer] = getattr(pipe, slot.tokenizer)
        components[slot.encoder] = getattr(pipe, slot.encoder)
    return LoadedModel(family=fam, source=str(path), components=components)

