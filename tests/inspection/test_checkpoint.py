"""`conjure inspect` on whole models (inspection/checkpoint.py): single files written by export/single_file.py
from tiny models, the full-size key names on the meta device, FLUX.1 transformers and a diffusers UNet file; one
line per app; `conjure export --to-app` files a checkpoint where each app reads main models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conjure import families
from conjure.cli import main
from conjure.export.single_file import checkpoint_state_dict, save_single_file
from conjure.inspection.apps import verdicts
from conjure.inspection.checkpoint import DIFFUSERS_UNET, FLUX_ALL_IN_ONE, FLUX_FILE, SINGLE_FILE, model_file
from conjure.inspection.reader import inspect_file
from conjure.models.reference import build_reference_components
from conjure.models.tiny import build_tiny_components
from conjure.runs.apps import APPS, MODEL, file_kind

WIDTHS = {"sdxl": (32, 48)}


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize(("family", "predicts"), [("sd1", "epsilon"), ("sd2", "v_prediction (v_pred marker)"),
                                                  ("sdxl", "epsilon")])
def test_single_file_is_a_checkpoint_with_every_part(tmp_path, family, predicts):
    parts = build_tiny_components(family, real_layout=True, encoder_widths=WIDTHS.get(family))
    path = save_single_file(parts, tmp_path / "model.safetensors", family, dtype="fp16")
    insp = inspect_file(path)
    assert (insp.kind, insp.family, insp.family_certain) == ("checkpoint", family, True)
    assert insp.model.layout == SINGLE_FILE and insp.model.missing == []
    assert set(insp.model.parts) == {"unet", "vae", *(s.encoder for s in families.get(family).text_encoders)}
    assert insp.model.prediction.startswith(predicts)
    assert insp.model.size == path.stat().st_size
    assert insp.model.parameters == sum(math.prod(s) for s in insp.shapes.values())
    assert set(insp.dtypes.values()) <= {"F16", "F32"}  # F32: the empty v_pred marker
    found = verdicts(insp)
    assert [v.app for v in found] == ["InvokeAI", "ComfyUI", "AUTOMATIC1111/Forge", "diffusers"]
    assert all(v.complete and "loads" in v.summary and "not an adapter" in v.summary for v in found)


def test_missing_parts_and_family_from_the_unet(tmp_path):
    parts = build_tiny_components("sd2", real_layout=True)
    state = checkpoint_state_dict("sd2", {n: parts[n].state_dict() for n in ("unet", "vae", "text_encoder")},
                                  parts["unet"].config)
    unet_only = {k: v.contiguous() for k, v in state.items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet.safetensors")
    insp = inspect_file(tmp_path / "unet.safetensors")
    assert insp.kind == "checkpoint" and insp.family == "sd2"  # linear projections: SD 2.x's UNet
    assert not insp.family_certain  # a tiny model's cross-attention width is no real family's
    assert insp.model.missing == ["vae", "text_encoder"]
    assert "missing vae, text_encoder" in verdicts(insp)[1].summary


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_single_file_names(family):
    """The real key names and shapes (meta device): the family is certain from the text-encoder prefixes, and from
    the UNet's cross-attention width alone when the encoders are left out."""
    fam = families.get(family)
    parts = build_reference_components(family, device="meta")
    states = {n: parts[n].state_dict() for n in ("unet", "vae", *(s.encoder for s in fam.text_encoders))}
    keys = shapes(checkpoint_state_dict(family, states, parts["unet"].config))
    info, found, certain = model_file(keys, {}, 0)
    assert (info.layout, found, certain, info.missing) == (SINGLE_FILE, family, True, [])
    unet = {k: s for k, s in keys.items() if k.startswith(fam.checkpoint_unet_prefix)}
    assert model_file(unet, {}, 0)[1:] == (family, True)
    assert model_file(shapes(states["unet"]), {}, 0)[:1][0].layout == DIFFUSERS_UNET
    assert model_file(shapes(states["unet"]), {}, 0)[1:] == (family, True)


def test_flux_transformer_files():
    full = shapes(build_reference_components("flux", device="meta")["transformer"].state_dict())
    info, family, certain = model_file(full, {}, 0)
    assert (info.layout, family, certain, info.parts) == (FLUX_FILE, "flux", True, {"transformer": True})
    assert info.prediction.startswith("flow matching (dev")
    # BFL's names under ComfyUI's prefix (which SD files' UNets share), schnell without the guidance embedder
    bfl = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,),
           "model.diffusion_model.img_in.weight": (3072, 64)}
    info, family, _ = model_file(bfl, {}, 0)
    assert (info.layout, family) == (FLUX_FILE, "flux") and "schnell" in info.prediction


def test_a_flux_all_in_one_file_says_it_holds_every_part(tmp_path):
    """ComfyUI's checkpoint (models/flux_single_file.py's prefixes): conjure trains it with no base_model_config."""
    bundle = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4),
              "vae.decoder.conv_in.weight": torch.ones(4),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4),
              "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(4)}
    save_file(bundle, tmp_path / "flux1-schnell-fp8.safetensors")
    insp = inspect_file(tmp_path / "flux1-schnell-fp8.safetensors")
    assert insp.model.layout == FLUX_ALL_IN_ONE and insp.model.missing == []
    assert set(insp.model.parts) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    summaries = {v.app: v.summary for v in verdicts(insp)}
    assert "VAE and text encoders included" in summaries["ComfyUI"]
    assert "its transformer only" in summaries["InvokeAI"]


def test_diffusers_unet_file_is_refused_where_apps_want_a_checkpoint(tmp_path):
    unet = build_tiny_components("sd1")["unet"]
    save_file(unet.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    insp = inspect_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert insp.model.layout == DIFFUSERS_UNET and insp.model.parts == {"unet": True}
    complete = {v.app: v.complete for v in verdicts(insp)}
    assert complete == {"InvokeAI": False, "ComfyUI": True, "AUTOMATIC1111/Forge": False, "diffusers": True}


def test_cli_table_and_json(tmp_path, capsys):
    path = save_single_file(build_tiny_components("sd1"), tmp_path / "m.safetensors", "sd1")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind      checkpoint" in out and "family    Stable Diffusion 1.x (sd1)" in out
    assert "parts     unet, vae, text_encoder" in out and "trigger" not in out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "checkpoint" and data["model"]["parts"] == {"unet": True, "vae": True, "text_encoder": True}
    assert all(app["complete"] and app["summary"] for app in data["apps"])


def test_export_to_app_files_a_checkpoint_as_a_main_model(tmp_path):
    path = save_single_file(build_tiny_components("sdxl", encoder_widths=(32, 48)), tmp_path / "m.safetensors", "sdxl")
    assert file_kind(path) == (MODEL, "Stable Diffusion XL checkpoint")
    assert {name: app.folders[MODEL] for name, app in APPS.items()} == {
        "comfyui": "models/checkpoints", "a1111": "models/Stable-diffusion", "invokeai": "conjure"}
