"""FLUX.1 LoRA / DoRA end to end on the tiny random FLUX: the run trains the transformer's adapters with the flow
objective, checkpoints files whose tensors are exactly the trained adapters, validates with FluxPipeline, resumes
exactly, caches text, and the PEFT file reproduces the trained transformer in diffusers."""

import pytest
import torch
from safetensors import safe_open

from conjure.config import parse_config
from conjure.errors import ConjureError

ADAPTER = ".lora_A.default.weight"


def trained_state(result):
    return torch.load(result.checkpoints[-1] / "training_state.pt", weights_only=True)["method"]


def only_file(result, suffix=".safetensors"):
    (path,) = [p for p in result.checkpoints[-1].iterdir() if p.name.endswith(suffix)]
    return path


def flux_config(lora_config, **sections):
    raw = lora_config("flux", **sections)
    raw["validation"].pop("guidance_scale", None)  # FLUX.1-dev's own 3.5
    return raw


def merged_transformer(model_dir, state, *, scale):
    """The tiny model's transformer with the trained adapters merged in by hand: W + scale * up @ down."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.float32)
    with torch.no_grad():
        for key, down in state.items():
            if not key.endswith(ADAPTER) or not key.startswith("transformer."):
                continue
            path = key[len("transformer."):-len(ADAPTER)]
            up = state[key.replace("lora_A", "lora_B")]
            transformer.get_submodule(path).weight += scale * up.float() @ down.float()
    return transformer.eval()


def transformer_output(transformer, seed=0):
    """The transformer on fixed packed latents, sigma, text and guidance."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    from conjure.train.flow import image_ids, text_ids

    kwargs = dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.6]), img_ids=image_ids(8, 8, torch.device("cpu"), torch.float32),
        txt_ids=text_ids(6, torch.device("cpu"), torch.float32),
        guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None,
    )
    with torch.no_grad():
        return transformer(**kwargs).sample


def test_a_flux_lora_trains_saves_the_trained_adapters_and_validates(lora_config, run_config, tiny_models):
    from conjure.export.kohya import load_kohya
    from conjure.families import FLUX

    result = run_config(flux_config(lora_config))
    assert result.status == "completed" and result.step == 6
    assert result.validations and all(p.is_file() for p in result.validations)
    state = trained_state(result)
    assert state and all(k.startswith("transformer.") for k in state)  # T5 and CLIP-L stay frozen
    assert any(".single_transformer_blocks." in k for k in state) and any(".ff_context." in k for k in state)
    path = only_file(result)
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # kohya's fused FLUX layout
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in keys
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    # kohya flux_train_network.py's own keys (train/kohya_record.py), in its vocabulary
    assert (meta["ss_model_type"], meta["ss_weighting_scheme"], meta["ss_model_prediction_type"]) == ("flux", "none", "raw")
    # the file holds exactly the trained adapters (fp32 file): read back and split, every tensor equal
    weights, _ = load_kohya(path, FLUX)
    for (component, module_path), m in weights.items():
        assert torch.equal(m.down, state[f"{component}.{module_path}{ADAPTER}"])
        assert torch.equal(m.up, state[f"{component}.{module_path}.lora_B.default.weight"])
    assert len(weights) == sum(k.endswith(ADAPTER) for k in state)


def test_the_flux_peft_file_reproduces_the_trained_transformer_in_diffusers(lora_config, run_config, tiny_models):
    from diffusers import FluxPipeline

    raw = flux_config(lora_config, lora={"save_format": "peft"}, validation={"at_start": False},
                      basic={"validate_every_n_steps": None})
    result = run_config(raw)
    state = trained_state(result)
    rank, alpha = raw["lora"]["rank"], raw["lora"]["alpha"]
    expected = transformer_output(merged_transformer(tiny_models("flux"), state, scale=alpha / rank))
    pipe = FluxPipeline.from_pretrained(tiny_models("flux"), torch_dtype=torch.float32)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(only_file(result)))
    got = transformer_output(pipe.transformer)
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapters changed the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_flux_run_resumes_exactly(lora_config, straight_and_resumed):
    raw = flux_config(lora_config, lora={"dora": True}, data={"random_flip": True},
                      optimizer={"scheduler": "cosine", "warmup_steps": 2}, validation={"at_start": False},
                      basic={"validate_every_n_steps": None})
    straight, resumed = straight_and_resumed(raw)
    a, b = trained_state(straight), trained_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_text_encoder_adapts_clip_l_and_leaves_t5_frozen(lora_config, run_config):
    result = run_config(flux_config(lora_config, lora={"train_text_encoder": True}, validation={"at_start": False},
                                    basic={"validate_every_n_steps": None}))
    state = trained_state(result)
    assert any(k.startswith("text_encoder.") for k in state) and not any(k.startswith("text_encoder_2.") for k in state)
    with safe_open(str(only_file(result)), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert not any(k.startswith("lora_te2_") for k in keys)


def test_cached_text_trains_the_same_flux_run(lora_config, run_config):
    """T5 and CLIP-L outputs kept per caption give the same steps as encoding every step."""
    raw = flux_config(lora_config, data={"caption_dropout": 0.3}, validation={"at_start": False},
                      basic={"validate_every_n_steps": None})
    plain = run_config(raw)
    cached = run_config(dict(raw, basic=dict(raw["basic"], run_name="cached"),
                             data=dict(raw["data"], cache_text_encoder_outputs=True, cache_latents="memory")))
    a, b = trained_state(plain), trained_state(cached)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_kohya_dora_trains_one_decomposition_per_fused_flux_layer(lora_config, run_config):
    """kohya's FLUX layout fuses q|k|v (and the single blocks' q|k|v|proj_mlp): apps decompose the fused weight as
    one, so its parts share one dora_scale, written once as [1, in]; the `attention` preset's single-block q, k, v
    bring proj_mlp along (kohya adapts `linear1` whole)."""
    raw = flux_config(lora_config, lora={"dora": True, "unet_targets": "attention"}, validation={"at_start": False},
                      basic={"validate_every_n_steps": None})
    result = run_config(raw)
    state = trained_state(result)
    assert any(".single_transformer_blocks.0.proj_mlp.lora_down" in k for k in state)
    scales = [k for k in state if k.endswith("dora_scale")]
    assert not any(".attn.to_k." in k or ".attn.to_v." in k for k in scales)  # shared with to_q: one parameter
    with safe_open(str(only_file(result)), "pt") as f:
        scale = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.dora_scale")
        assert "lora_unet_single_blocks_0_linear1.dora_scale" in set(f.keys())
    assert tuple(scale.shape) == (1, 32)  # [1, in]: ComfyUI/InvokeAI's input-column rule


@pytest.mark.parametrize("section, field", [
    ({"advanced": {"min_snr_gamma": 5.0}}, "advanced.min_snr_gamma"),
    ({"advanced": {"prediction_type": "epsilon"}}, "advanced.prediction_type"),
    ({"lora": {"unet_targets": "attention_ff"}}, "lora.unet_targets"),
])
def test_settings_a_flux_model_cannot_use_are_refused_naming_the_field(lora_config, section, field):
    from conjure.train.loop import train

    with pytest.raises(ConjureError, match=field.replace(".", r"\.")):
        train(parse_config(flux_config(lora_config, **section)))


def test_a_bucket_step_flux_cannot_pack_is_refused_naming_the_field(lora_config, run_config):
    """FLUX.1 packs 2x2 patches of 8x-downscaled latents: sides must be multiples of 16 px (FluxPipeline too)."""
    raw = flux_config(lora_config, data={"aspect_ratio_buckets": True, "bucket_step": 8})
    with pytest.raises(ConjureError, match=r"data\.bucket_step: FLUX\.1 needs image sides in multiples of 16 px"):
        run_config(raw)
    run_config(flux_config(lora_config, data={"aspect_ratio_buckets": True, "bucket_step": 16},
                           basic={"max_train_steps": 1, "validate_every_n_steps": None},
                           validation={"at_start": False}))


def test_a_float8_base_trains_on_the_cpu(lora_config, run_config, monkeypatch):
    """advanced.base_weights_dtype: float8 on the CPU: the text is encoded ahead and the encoders freed, then the
    transformer streams in quantised (placed as it is, not converted twice), PEFT's adapters wrap its float8 layers
    and train, and the file reads back as any other."""
    pytest.importorskip("torchao")
    import conjure.train.loop as loop
    from conjure.export.kohya import load_kohya
    from conjure.families import FLUX
    from conjure.models.loading import LoadedModel

    placed = []
    place = loop.place_model
    monkeypatch.setattr(loop, "place_model", lambda model, *a, **k: placed.append(
        (model, model.denoiser.transformer_blocks[0].attn.to_q.weight)) or place(model, *a, **k))
    read, met = LoadedModel.load_pending, []
    monkeypatch.setattr(LoadedModel, "load_pending", lambda model: met.append(
        [model.components[slot.encoder] for slot in model.family.text_encoders]) or read(model))
    raw = flux_config(lora_config, validation={"at_start": False}, data={"cache_text_encoder_outputs": True},
                      advanced={"mixed_precision": "bf16", "base_weights_dtype": "float8", "cpu": True},
                      basic={"validate_every_n_steps": None, "max_train_steps": 2, "save_every_n_steps": 2})
    result = run_config(raw)
    assert result.status == "completed" and result.step == 2
    # captions encoded ahead on the CPU and the encoders freed before the transformer streamed in
    assert met == [[None, None]]
    ((model, streamed),) = placed
    base = model.denoiser.transformer_blocks[0].attn.to_q.base_layer
    assert type(streamed).__name__ == "Float8Tensor" and base.weight is streamed  # placed as it streamed in
    state = trained_state(result)
    weights, _ = load_kohya(only_file(result), FLUX)
    assert len(weights) == sum(k.endswith(ADAPTER) for k in state)
    for (component, module_path), m in weights.items():
        trained = state[f"{component}.{module_path}.lora_B.default.weight"]
        assert torch.equal(m.up, trained.float())
    assert any(m.up.abs().sum() > 0 for m in weights.values())  # the adapters (up: zeros at the start) learned
