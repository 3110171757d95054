"""Each app's rules (src/conjure/inspection/apps/, docs/app-loaders.md) on small synthetic files of real key
names and real shapes: one known-bad case per rule (the finding, its outcome and the keys it names) and the
good case beside it where the rule has one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conjure.inspection.apps import verdicts
from conjure.inspection.model import DROPPED, IGNORED, REFUSED, WRONG
from conjure.inspection.reader import inspect_file

ATTN = "down_blocks_0_attentions_0_transformer_blocks_0"
SD1_K = f"lora_unet_{ATTN}_attn2_to_k"  # cross-attention to_k: InvokeAI's base probe reads its in-width
SDXL_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_OUT = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"


def lora(name, n_out, n_in, rank=2, a="lora_down.weight", b="lora_up.weight", alpha=True):
    out = {f"{name}.{a}": (rank, n_in), f"{name}.{b}": (n_out, rank)}
    return {**out, f"{name}.alpha": ()} if alpha else out


def findings(tmp_path, shapes, app, metadata=None):
    path = tmp_path / "f.safetensors"
    save_file({k: torch.ones(s, dtype=torch.float16) for k, s in shapes.items()}, str(path), metadata)
    (v,) = [v for v in verdicts(inspect_file(path)) if v.app == app]
    return v


def only(v, outcome, needle):
    """The verdict's one failing (or ignored) finding has `outcome` and mentions `needle`; returns its keys."""
    relevant = [f for f in v.findings if f.outcome == outcome]
    assert len(relevant) == 1 and needle in relevant[0].reason, v.findings
    return set(relevant[0].keys)


GOOD_SD1 = {**lora(SD1_K, 320, 768), **lora(TE, 768, 768), **lora(TE_OUT, 768, 768)}


@pytest.mark.parametrize("app", ["InvokeAI", "ComfyUI", "AUTOMATIC1111/Forge", "diffusers"])
def test_a_plain_kohya_sd1_file_is_complete_everywhere(tmp_path, app):
    v = findings(tmp_path, GOOD_SD1, app)
    assert v.complete and v.findings == [] and v.applied == 9


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI


def test_comfyui_peft_unet_attention_is_not_in_the_key_map_but_ff_and_text_encoders_are(tmp_path):
    peft = {**lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320, a="lora_A.weight",
                   b="lora_B.weight", alpha=False),
            **lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", 320, 1280, a="lora_A.weight",
                   b="lora_B.weight", alpha=False),
            **lora("text_encoder.text_model.encoder.layers.0.mlp.fc1", 3072, 768, a="lora_A.weight",
                   b="lora_B.weight", alpha=False)}
    keys = only(findings(tmp_path, peft, "ComfyUI"), DROPPED, "attention-processor spelling")
    assert keys == {k for k in peft if ".attn1.to_q." in k}


def test_comfyui_text_encoder_names_need_text_model(tmp_path):
    bare = "lora_te_encoder_layers_0_self_attn_q_proj"
    keys = only(findings(tmp_path, {**lora(SD1_K, 320, 768), **lora(bare, 768, 768)}, "ComfyUI"), DROPPED,
                "without `text_model`")
    assert keys == set(lora(bare, 768, 768))


@pytest.mark.parametrize("shape, outcome", [((1, 768), None), ((320, 1), None), ((320,), WRONG), ((2, 7), DROPPED)])
def test_comfyui_dora_scale_orientations(tmp_path, shape, outcome):
    v = findings(tmp_path, {**lora(SD1_K, 320, 768), f"{SD1_K}.dora_scale": shape}, "ComfyUI")
    if outcome is None:
        assert v.complete
    else:
        assert only(v, outcome, "dora_scale") == {*lora(SD1_K, 320, 768), f"{SD1_K}.dora_scale"}


def test_comfyui_drops_peft_magnitudes_and_ignores_the_adapter_config_alpha(tmp_path):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    shapes = {**lora(name, 320, 1280, a="lora_A.weight", b="lora_B.weight", alpha=False),
              f"{name}.lora_magnitude_vector": (320,)}
    meta = {"lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 4, "unet.use_dora": true}'}
    v = findings(tmp_path, shapes, "ComfyUI", meta)
    assert only(v, DROPPED, "magnitude") == {f"{name}.lora_magnitude_vector"}
    assert only(v, WRONG, "scales by 1") == set(shapes)


def test_comfyui_ignores_bundles_and_drops_unknown_keys(tmp_path):
    v = findings(tmp_path, {**GOOD_SD1, "bundle_emb.zq.string_to_param.*": (1, 768), "step": (1,)}, "ComfyUI")
    assert only(v, IGNORED, "bundled") == {"bundle_emb.zq.string_to_param.*"}
    assert only(v, DROPPED, "neither an adapter part") == {"step"}


# ---------------------------------------------------------------------------------------------------------------
# diffusers


def test_diffusers_refuses_kohya_lokr_and_drops_dora_scales(tmp_path):
    lokr = {f"{SD1_K}.lokr_w1": (8, 8), f"{SD1_K}.lokr_w2": (40, 96), **lora(TE, 768, 768)}
    assert only(findings(tmp_path, lokr, "diffusers"), REFUSED, "lora_down/lora_up/alpha only") == {
        f"{SD1_K}.lokr_w1", f"{SD1_K}.lokr_w2"}
    dora = {**GOOD_SD1, f"{SD1_K}.dora_scale": (1, 768)}
    assert only(findings(tmp_path, dora, "diffusers"), DROPPED, "filters out every dora_scale") == {f"{SD1_K}.dora_scale"}


def test_diffusers_refuses_keys_without_lora_and_flux_kohya_extras(tmp_path):
    v = findings(tmp_path, {**GOOD_SD1, "bundle_emb.zq.string_to_param.*": (1, 768)}, "diffusers")
    assert only(v, REFUSED, "Invalid LoRA checkpoint") == {"bundle_emb.zq.string_to_param.*"} and v.applied == 0
    flux = {**lora("lora_unet_double_blocks_0_img_attn_proj", 3072, 3072), "bundle_emb.zq.clip_l": (1, 768)}
    assert only(findings(tmp_path, flux, "diffusers"), REFUSED, "Incompatible keys") == {"bundle_emb.zq.clip_l"}


def test_diffusers_drops_components_the_pipeline_lacks_and_sdxl_add_embedding_names(tmp_path):
    peft = {**lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 320, 768, a="lora_A.weight",
                   b="lora_B.weight", alpha=False),
            **lora("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1024, 1024, a="lora_A.weight",
                   b="lora_B.weight", alpha=False)}
    keys = only(findings(tmp_path, peft, "diffusers", {"ss_base_model_version": "sd_v1"}), DROPPED, "has no text_encoder_2")
    assert keys == {k for k in peft if k.startswith("text_encoder_2.")}
    sdxl = {**lora(SDXL_K, 640, 2048), **lora("lora_unet_add_embedding_linear_1", 1280, 2816)}
    assert only(findings(tmp_path, sdxl, "diffusers"), DROPPED, "add.embedding.linear") == {
        k for k in sdxl if "add_embedding" in k}


def test_diffusers_needs_an_out_proj_module_per_kohya_text_encoder(tmp_path):
    qkv = {k: s for p in ("q", "k", "v") for k, s in lora(TE.replace("q_proj", f"{p}_proj"), 768, 768).items()}
    v = findings(tmp_path, {**lora(SD1_K, 320, 768), **qkv}, "diffusers")
    assert only(v, REFUSED, "Could not automatically infer state dict type") == set(qkv) and v.applied == 0
    fc1 = lora("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768)
    v = findings(tmp_path, {**lora(SD1_K, 320, 768), **qkv, **fc1}, "diffusers")
    assert only(v, DROPPED, "no out_proj") == set(qkv) and v.applied == 6
    # per encoder: text_encoder_2's out_proj does not help text_encoder
    te2_out = lora("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", 1280, 1280)
    v = findings(tmp_path, {**lora(SDXL_K, 640, 2048), **lora(TE.replace("lora_te_", "lora_te1_"), 768, 768),
                            **te2_out}, "diffusers")
    assert only(v, REFUSED, "text_encoder has q/k/v but no out_proj")


def test_diffusers_refuses_an_sd1_embedding_with_more_than_one_tensor(tmp_path):
    v = findings(tmp_path, {"emb_params": (2, 768), "string_to_param.*": (2, 768)}, "diffusers")
    assert only(v, REFUSED, "several tensors")


# ---------------------------------------------------------------------------------------------------------------
# InvokeAI


def test_invokeai_identifies_the_base_from_widths(tmp_path):
    v = findings(tmp_path, lora(f"lora_unet_{ATTN}_attn1_to_q", 320, 320), "InvokeAI")
    assert only(v, REFUSED, "base not identified")  # no cross-attention, no text encoder: nothing to tell by
    v = findings(tmp_path, GOOD_SD1, "InvokeAI", {"ss_base_model_version": "sd_v2", "ss_v2": "True"})
    assert only(v, REFUSED, "identified as sd1")
    assert findings(tmp_path, {**lora(SDXL_K, 640, 2048)}, "InvokeAI").complete


def test_invokeai_refuses_peft_sd_files_and_mixed_sdxl_names(tmp_path):
    peft = lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 320, 768, a="lora_A.weight",
                b="lora_B.weight", alpha=False)
    assert only(findings(tmp_path, peft, "InvokeAI"), REFUSED, "base not identified")
    mixed = {**lora(SDXL_K, 640, 2048), **lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                                                640, 640)}
    assert only(findings(tmp_path, mixed, "InvokeAI"), REFUSED, "both LDM and diffusers")


def test_invokeai_sd1_layers_that_find_no_module(tmp_path):
    ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"
    v = findings(tmp_path, {**GOOD_SD1, **lora(ldm, 320, 320), **lora(te1, 768, 768)}, "InvokeAI")
    dropped = [f for f in v.findings if f.outcome == DROPPED]
    assert {f.reason.split(":")[0] for f in dropped} == {
        "no module of the diffusers UNet/CLIP has this flattened name (LDM names)",
        "prefix is not one of Stable Diffusion 1.x's (lora_unet_, lora_te_)"}
    assert {k.split(".")[0] for f in dropped for k in f.keys} == {ldm, te1}


def test_invokeai_dora_must_be_input_column(tmp_path):
    v = findings(tmp_path, {**GOOD_SD1, f"{SD1_K}.dora_scale": (320, 1)}, "InvokeAI")
    assert only(v, WRONG, "DoRALayer always normalises input columns")


def test_invokeai_flux_formats(tmp_path):
    narrow = lora("lora_unet_double_blocks_0_img_attn_proj", 128, 128)
    assert only(findings(tmp_path, narrow, "InvokeAI"), REFUSED, "FLUX.2")
    peft = lora("transformer.transformer_blocks.0.attn.to_q", 3072, 3072, a="lora_A.weight", b="lora_B.weight",
                alpha=False)
    assert only(findings(tmp_path, peft, "InvokeAI"), REFUSED, "not one of the FLUX LoRA formats")


# ---------------------------------------------------------------------------------------------------------------
# AUTOMATIC1111 / Forge


def test_a1111_loads_nothing_of_a_peft_file(tmp_path):
    peft = lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 320, 768, a="lora_A.weight",
                b="lora_B.weight", alpha=False)
    v = findings(tmp_path, peft, "AUTOMATIC1111/Forge")
    assert only(v, DROPPED, "cuts keys at the first dot") == set(peft) and v.applied == 0


def test_a1111_sdxl_diffusers_names_without_a_conversion(tmp_path):
    shapes = {**lora(SDXL_K, 640, 2048), **lora("lora_unet_add_embedding_linear_1", 1280, 2816),
              **lora("lora_unet_up_blocks_0_upsamplers_0_conv", 1280, 1280)}
    v = findings(tmp_path, shapes, "AUTOMATIC1111/Forge")
    reasons = sorted(f.reason.split(":")[0] for f in v.findings)
    assert reasons == ["diffusers add_embedding name", "up_blocks_0_upsamplers"]


def test_a1111_open_clip_attention_needs_q_k_v_and_out(tmp_path):
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_{}_proj"
    partial = {**lora(SDXL_K, 640, 2048), **lora(te2.format("q"), 1280, 1280), **lora(te2.format("v"), 1280, 1280)}
    keys = only(findings(tmp_path, partial, "AUTOMATIC1111/Forge"), DROPPED, "all of q, k, v and out_proj")
    assert {k.split(".")[0] for k in keys} == {te2.format("q"), te2.format("v")}
    full = {**lora(SDXL_K, 640, 2048), **{k: s for p in "qkv" for k, s in lora(te2.format(p), 1280, 1280).items()},
            **lora(te2.format("out"), 1280, 1280)}
    assert findings(tmp_path, full, "AUTOMATIC1111/Forge").complete


def test_a1111_dora_is_input_column_only_and_forge_reads_flux_as_comfyui(tmp_path):
    v = findings(tmp_path, {**GOOD_SD1, f"{SD1_K}.dora_scale": (320, 1)}, "AUTOMATIC1111/Forge")
    assert only(v, WRONG, "input columns only")
    flux = lora("transformer.transformer_blocks.0.attn.to_q", 3072, 3072, a="lora_A.weight", b="lora_B.weight",
                alpha=False)
    assert findings(tmp_path, flux, "AUTOMATIC1111/Forge").complete  # Forge maps `transformer.` as ComfyUI does
    flux["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = (3072,)
    assert only(findings(tmp_path, flux, "AUTOMATIC1111/Forge"), DROPPED, "Forge (AUTOMATIC1111 has no FLUX.1)")


def test_a1111_refuses_an_embedding_with_a_step_tensor(tmp_path):
    v = findings(tmp_path, {"emb_params": (2, 768), "step": (1,)}, "AUTOMATIC1111/Forge")
    assert only(v, REFUSED, "multiple terms")


@pytest.mark.parametrize("app", ["InvokeAI", "ComfyUI", "AUTOMATIC1111/Forge", "diffusers"])
def test_an_embedding_of_no_family_width_is_dropped_everywhere(tmp_path, app):
    assert only(findings(tmp_path, {"emb_params": (2, 640)}, app), DROPPED, "(640) fit no real model")


def test_the_diffusers_rules_agree_with_diffusers_own_reader():
    """The installed diffusers' `lora_state_dict` raises on what _refusals calls refused and filters dora_scale."""
    from diffusers import StableDiffusionPipeline

    tensors = {k: torch.ones(s) for k, s in {**GOOD_SD1, f"{SD1_K}.lokr_w1": (8, 8)}.items()}
    with pytest.raises(ValueError, match="not been correctly renamed"):
        StableDiffusionPipeline.lora_state_dict(tensors)
    tensors = {k: torch.ones(s) for k, s in {**GOOD_SD1, f"{SD1_K}.dora_scale": (1, 768)}.items()}
    state, _ = StableDiffusionPipeline.lora_state_dict(tensors)
    assert state and not any("dora" in k or "magnitude" in k for k in state)


def test_diffusers_own_loader_refuses_a_text_encoder_without_out_proj_and_loads_its_peft_conversion(tmp_path):
    """What _text_encoder_format_guess restates, with the installed pipeline's load_lora_weights on a tiny SD1 model;
    `conjure convert --to peft` (the repair the finding names) loads with every module adapted."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from conjure.adapters import LoraModule
    from conjure.export.convert import ConvertOptions, convert
    from conjure.export.kohya import save_kohya
    from conjure.models.tiny import build_tiny_components

    components = build_tiny_components("sd1")
    g = torch.Generator().manual_seed(0)
    paths = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")]
    paths += [("text_encoder", f"text_model.encoder.layers.0.self_attn.{p}_proj") for p in "qkv"]
    weights = {}
    for component, path in paths:
        w = components[component].get_submodule(path.removeprefix("text_model.")).weight
        weights[(component, path)] = LoraModule(down=torch.randn(2, w.shape[1], generator=g),
                                                up=torch.randn(w.shape[0], 2, generator=g), alpha=2.0)
    kohya = save_kohya(tmp_path / "kohya.safetensors", weights, {}, "sd1")
    (v,) = [v for v in verdicts(inspect_file(kohya)) if v.app == "diffusers"]
    assert [f.outcome for f in v.findings] == [REFUSED]
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        StableDiffusionPipeline(**components, requires_safety_checker=False).load_lora_weights(str(kohya))

    peft = convert(kohya, tmp_path / "peft.safetensors", ConvertOptions(to="peft")).path
    (v,) = [v for v in verdicts(inspect_file(peft)) if v.app == "diffusers"]
    assert v.complete
    pipe = StableDiffusionPipeline(**build_tiny_components("sd1"), requires_safety_checker=False)
    pipe.load_lora_weights(str(peft))
    adapted = {(c, p) for c in ("unet", "text_encoder")
               for p, m in getattr(pipe, c).named_modules() if isinstance(m, LoraLayer)}
    assert {p.removeprefix("text_model.") for _, p in adapted} == {p.removeprefix("text_model.") for _, p in paths}


def test_diffusers_gives_kohya_attention_projections_their_components_most_common_alpha(tmp_path):
    """Read against the installed loader: after load_lora_weights each layer's scaling is alpha/rank for what the
    rule passes and the component's most common alpha/rank for what it calls wrong."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from conjure.adapters import LoraModule
    from conjure.export.kohya import save_kohya
    from conjure.models.tiny import build_tiny_components

    components = build_tiny_components("sd1")
    block = "down_blocks.0.attentions.0.transformer_blocks.0."
    alphas = {("unet", block + "attn2.to_q"): 2.0, ("unet", block + "attn2.to_v"): 1.0,
              ("unet", block + "attn1.to_out.0"): 1.0, ("unet", block + "ff.net.2"): 4.0,
              ("unet", "down_blocks.0.resnets.0.conv1"): 4.0,
              ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"): 2.0,
              ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj"): 2.0,
              ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj"): 1.0,
              ("text_encoder", "text_model.encoder.layers.0.mlp.fc1"): 4.0}
    weights = {}
    for (component, path), alpha in alphas.items():
        w = components[component].get_submodule(path.removeprefix("text_model.")).weight
        kernel = (1, 1) if w.dim() == 4 else ()
        weights[(component, path)] = LoraModule(torch.ones(2, *w.shape[1:]), torch.ones(w.shape[0], 2, *kernel), alpha)
    path = save_kohya(tmp_path / "k.safetensors", weights, {}, "sd1")
    (v,) = [v for v in verdicts(inspect_file(path)) if v.app == "diffusers"]
    wrong = {k.split(".")[0] for f in v.findings if f.outcome == WRONG for k in f.keys}
    assert wrong == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
                     "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
                     "lora_te_text_model_encoder_layers_0_mlp_fc1"}

    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    common = {"unet": 1.0, "text_encoder": 2.0}
    for (component, module_path), alpha in alphas.items():
        layer = getattr(pipe, component).get_submodule(module_path.removeprefix("text_model."))
        assert isinstance(layer, LoraLayer)
        name = ("lora_unet_" if component == "unet" else "lora_te_") + module_path.replace(".", "_")
        expected = common[component] if name in wrong else alpha
        assert layer.scaling["default_0"] == expected / 2, module_path
