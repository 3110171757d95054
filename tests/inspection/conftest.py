"""Adapters with the module paths and shapes of the full-size models (built on the meta device: no weights), at
rank 1, written by conjure's own writers: what `conjure inspect` must pass for every app."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conjure import families
from conjure.adapters import LoraModule, LoraWeights
from conjure.export.embeddings import bundle_tensors, save_embedding
from conjure.export.kohya import kohya_fused_parts, save_kohya
from conjure.export.peft import save_peft

META = {"ss_output_name": "test", "conjure.trigger_words": "zq"}


@pytest.fixture(scope="session")
def full_size():
    """family -> {component: meta-device model} of the full-size reference models (denoiser and text encoders)."""
    from conjure.models.reference import build_reference_components

    cache: dict[str, dict[str, Any]] = {}

    def get(family: str) -> dict[str, Any]:
        if family not in cache:
            fam = families.get(family)
            parts = build_reference_components(family, device="meta")
            cache[family] = {c: parts[c] for c in (fam.denoiser, *(s.encoder for s in fam.text_encoders))}
        return cache[family]
    return get


def _targets(family: str, models: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(component, path, module) of what conjure's LoRA recipe adapts with the widest preset and the text encoders."""
    from conjure.methods.lora import denoiser_targets, text_encoder_targets

    fam = families.get(family)
    denoiser = models[fam.denoiser]
    out = [(fam.denoiser, p, denoiser.get_submodule(p)) for p in denoiser_targets(fam, denoiser, "all")]
    for slot in fam.text_encoders:
        if slot.kind == "clip":
            model = models[slot.encoder]
            out += [(slot.encoder, p, model.get_submodule(p)) for p in text_encoder_targets(model, slot.unread_layers())]
    return out


def lora_weights(family: str, models: dict[str, Any], *, dora: str | None = None, rank: int = 1,
                 alpha: float = 2.0) -> LoraWeights:
    """Random rank-`rank` modules on every target; dora: "scale" (kohya [1, in], shared across a fused FLUX
    layer as conjure trains it) or "magnitude" (PEFT [out])."""
    g = torch.Generator().manual_seed(0)
    weights: LoraWeights = {}
    for component, path, module in _targets(family, models):
        shape = tuple(module.weight.shape)
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        m = LoraModule(down=torch.randn(down_shape, generator=g) * 0.1,
                       up=torch.randn(up_shape, generator=g) * 0.1, alpha=alpha)
        if dora == "scale":
            m.dora_scale = torch.rand((1, shape[1], 1, 1) if len(shape) == 4 else (1, shape[1]), generator=g) + 0.5
        elif dora == "magnitude":
            m.magnitude = torch.rand(shape[0], generator=g) + 0.5
        weights[(component, path)] = m
    if dora == "scale":
        _share_fused_scales(family, weights)
    return weights


def _share_fused_scales(family: str, weights: LoraWeights) -> None:
    """The parts of a fused kohya layer decompose as one (adapters/dora.py share_decomposition): one scale."""
    fam = families.get(family)
    paths = [p for c, p in weights if c == fam.denoiser]
    for group, members in kohya_fused_parts(fam, fam.denoiser, paths).items():
        present = [weights[(fam.denoiser, p)] for p in members if (fam.denoiser, p) in weights]
        for m in present:
            m.dora_scale, m.dora_group = present[0].dora_scale, group


def embedding_tensors(family: str, vectors: int = 2) -> dict[str, torch.Tensor]:
    return {slot.embedding_key: torch.randn(vectors, slot.width) for slot in families.get(family).text_encoders}


@pytest.fixture
def conjure_files(full_size, tmp_path):
    """write(kind, family) -> path of a file as conjure writes it: "lora", "dora" (kohya), "peft-lora",
    "peft-dora", "ti", "pivotal" (kohya LoRA + bundled embedding)."""
    def write(kind: str, family: str):
        path = tmp_path / f"{kind}-{family}.safetensors"
        if kind == "ti":
            save_embedding(path, embedding_tensors(family), {"conjure.method": "textual_inversion"})
            return path
        models = full_size(family)
        dora = {"dora": "scale", "peft-dora": "magnitude"}.get(kind)
        weights = lora_weights(family, models, dora=dora)
        if kind.startswith("peft"):
            return save_peft(path, weights, META, family, dtype=torch.float16)
        bundle = bundle_tensors("zq", embedding_tensors(family)) if kind == "pivotal" else None
        return save_kohya(path, weights, META, family, dtype=torch.float16, bundle=bundle)
    return write
