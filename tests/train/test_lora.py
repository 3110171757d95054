"""LoRA / DoRA end to end on tiny models: files apps load reproduce the trained model, exact resume, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conjure.config import ConfigError, parse_config
from conjure.errors import ConjureError
from conjure.toy.learning import load_pipeline  # the model's own pipeline class, float32
from conjure.train.control import TrainControl


def unet_output(unet, family, text_width_seed=0):
    """The UNet's output on a fixed input (latents, timestep, text states and SDXL extras)."""
    g = torch.Generator().manual_seed(text_width_seed)
    cfg = unet.config
    latents = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    states = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), states, **kwargs).sample


def text_output(pipe, prompt="a zwx photo"):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def trained_model(result):
    """The run's trained model in memory is gone after train(); rebuild it from the resume state instead."""
    state = torch.load(result.checkpoints[-1] / "training_state.pt", weights_only=False)
    return state["method"]


def file_keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_lora_loads_in_diffusers_and_reproduces_the_trained_unet(lora_config, tiny_models, family, tmp_path, run_config):
    from conjure.methods.lora import Lora
    from conjure.models.loading import load_base_model

    # 2 layers per block, as the real UNets: the layout the kohya (SDXL: LDM) names are defined on
    raw = lora_config(family, real_layout=True, lora={"unet_targets": "all", "train_text_encoder": True})
    result = run_config(raw)
    path = result.checkpoints[-1] / "run.safetensors"
    keys, meta = file_keys(path)
    prefix = ("lora_te1_", "lora_te2_", "lora_unet_") if family == "sdxl" else ("lora_te_", "lora_unet_")
    assert all(k.startswith(prefix) for k in keys) and all(any(k.startswith(p) for k in keys) for p in prefix)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    if family == "sdxl":
        assert any("input_blocks" in k for k in keys) and not any("down_blocks" in k for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["modelspec.architecture"].endswith("/lora") and "zwx" in meta["ss_tag_frequency"]
    with safe_open(str(path), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert alphas == {2.0}  # the configured alpha, not the rank

    # The trained model, rebuilt from the checkpoint's adapter state.
    model = load_base_model(raw["basic"]["base_model"])
    recipe = Lora(model, parse_config(raw).lora)
    recipe.load_state_dict(trained_model(result))
    expected_unet = unet_output(model.unet, family)

    pipe = load_pipeline(raw["basic"]["base_model"])
    base_unet = unet_output(pipe.unet, family)
    pipe.load_lora_weights(str(path))
    assert not torch.allclose(base_unet, expected_unet, atol=1e-4)  # training changed something
    torch.testing.assert_close(unet_output(pipe.unet, family), expected_unet, atol=1e-5, rtol=1e-4)
    # every adapted module of the trained model has its adapter in diffusers' model
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert loaded == set(recipe.targets["unet"])
    expected_te = text_output(_with_components(model))
    torch.testing.assert_close(text_output(pipe), expected_te, atol=1e-5, rtol=1e-4)


def _with_components(model):
    class View:
        tokenizer = model.components["tokenizer"]
        text_encoder = model.components["text_encoder"]

    return View


def test_kohya_dora_file_layout_and_conjures_reader_reproduce_the_trained_unet(lora_config, tiny_models, run_config):
    from conjure.export.convert import apply_lora
    from conjure.export.kohya import load_kohya
    from conjure.methods.lora import Lora
    from conjure.models.loading import load_base_model

    raw = lora_config("sd1", real_layout=True, lora={"dora": True, "unet_targets": "all"})
    result = run_config(raw)
    path = result.checkpoints[-1] / "run.safetensors"
    keys, meta = file_keys(path)
    with safe_open(str(path), "pt") as f:
        for key in keys:
            if key.endswith(".dora_scale"):
                name = key.removesuffix(".dora_scale")
                down = f.get_tensor(name + ".lora_down.weight")
                scale = f.get_tensor(key)
                # [1, in] (conv [1, in, 1, 1]): the input-column layout every app applies exactly
                assert scale.shape[0] == 1 and scale.shape[1] == down.shape[1] and scale.dim() == down.dim()
    assert sum(k.endswith(".dora_scale") for k in keys) == sum(k.endswith(".alpha") for k in keys) > 0

    model = load_base_model(raw["basic"]["base_model"])
    Lora(model, parse_config(raw).lora).load_state_dict(trained_model(result))
    expected = unet_output(model.unet, "sd1")

    fresh = load_base_model(raw["basic"]["base_model"])
    base = unet_output(fresh.unet, "sd1")
    weights, _ = load_kohya(path)
    apply_lora(fresh.components, weights)
    assert not torch.allclose(base, expected, atol=1e-4)
    torch.testing.assert_close(unet_output(fresh.unet, "sd1"), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_format_loads_in_diffusers(lora_config, tiny_models, dora, run_config):
    from conjure.methods.lora import Lora
    from conjure.models.loading import load_base_model

    # DoRA on every preset loads in diffusers, convolutions included ("all")
    raw = lora_config("sd1", real_layout=True, lora={"dora": dora, "save_format": "peft", "alpha": 8.0,
                                                     "train_text_encoder": True, "unet_targets": "all"})
    result = run_config(raw)
    path = result.checkpoints[-1] / "run.safetensors"
    keys, _ = file_keys(path)
    assert any(".lora_A." in k for k in keys) and not any(k.startswith("lora_unet") for k in keys)
    assert any("lora_magnitude_vector" in k for k in keys) == dora

    model = load_base_model(raw["basic"]["base_model"])
    Lora(model, parse_config(raw).lora).load_state_dict(trained_model(result))
    expected = unet_output(model.unet, "sd1")
    pipe = load_pipeline(raw["basic"]["base_model"])
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(unet_output(pipe.unet, "sd1"), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_output(pipe), text_output(_with_components(model)), atol=1e-5, rtol=1e-4)


def test_validation_images_show_the_lora(lora_config, run_config):
    """Step 0 renders the base model (the LoRA starts at zero); a later step, same prompt and seed, differs."""
    from PIL import Image

    result = run_config(lora_config("sd1", basic={"max_train_steps": 3}))
    first, last = (sorted(p for p in g.parent.glob("*.png") if p.name != "grid.png")[0]
                   for g in (result.validations[0], result.validations[-1]))
    assert first.parent.name == "step-000000" and last.parent.name == "step-000003" and first.name == last.name
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (first, last))
    assert np.abs(a - b).max() > 0


def test_resume_matches_an_uninterrupted_run(lora_config, straight_and_resumed):
    raw = lora_config("sdxl", lora={"dora": True, "train_text_encoder": True},
                      data={"random_flip": True, "center_crop": False},
                      optimizer={"scheduler": "cosine", "warmup_steps": 2},
                      validation={"at_start": False}, basic={"validate_every_n_steps": None})
    straight, resumed = straight_and_resumed(raw)
    a, b = trained_model(straight), trained_model(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_runs_repeat_and_resume_bit_for_bit(lora_config, dora, run_config):
    """Dropout draws from torch's global RNG: seeded from basic.seed and checkpointed (issue 21 D3, issue 13
    #11). The validation at step 2 happens in the straight runs only: it must not move the training RNG."""
    raw = lora_config("sd1", lora={"dropout": 0.1, "dora": dora}, validation={"at_start": False},
                      basic={"max_train_steps": 4, "save_every_n_steps": 100, "validate_every_n_steps": 2})
    first, second = run_config(raw), run_config(dict(raw, basic=dict(raw["basic"], run_name="again")))
    a, b = trained_model(first), trained_model(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    control = TrainControl()
    control.on_step = lambda step, loss: control.request_stop("test") if step == 2 else None
    raw["basic"].update(run_name="stopped", validate_every_n_steps=None)
    stopped = run_config(raw, control=control)
    assert stopped.step == 2
    torch.manual_seed(12345)  # whatever the process did in between
    c = trained_model(run_config(raw, resume=str(stopped.run_dir)))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_validation_renders_with_dropout_off(lora_config, monkeypatch, run_config):
    """Issue 13 #10: validation shows what the saved file does: the adapters' dropout is off while rendering
    (the same images as the model in eval mode) and on again for the next training step."""
    from conjure.train import validation

    real_render, renders = validation.render, []

    def render(pipe, folder, **kwargs):
        dropouts = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        modes = [m.training for m in dropouts]
        images, grid = real_render(pipe, folder, **kwargs)
        trained = [(m, m.training) for m in pipe.unet.modules()]
        pipe.unet.eval()
        eval_images, _ = real_render(pipe, folder.with_name(folder.name + "-eval"), **kwargs)
        for module, mode in trained:
            module.train(mode)
        renders.append((modes, images, eval_images, dropouts))
        return images, grid

    monkeypatch.setattr(validation, "render", render)
    raw = lora_config("sd1", lora={"dropout": 0.5}, validation={"at_start": False},
                      basic={"max_train_steps": 4, "validate_every_n_steps": 2, "save_every_n_steps": 100})
    run_config(raw)
    assert len(renders) == 2
    for modes, images, eval_images, dropouts in renders:
        assert modes and not any(modes)
        assert all(m.training for m in dropouts)  # back in train mode after rendering
        for image, eval_image in zip(images, eval_images):
            assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(eval_image)))


def test_a_named_family_refuses_another_model_before_loading_weights(lora_config, tiny_models, monkeypatch, run_config):
    import diffusers

    raw = lora_config("sd1")
    raw["basic"].update(base_model=str(tiny_models("sdxl")), family="sd1")
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the family check"))
    with pytest.raises(ConjureError, match="basic.family is 'sd1' but the model looks like sdxl"):
        run_config(raw)


@pytest.mark.parametrize("change, message", [
    ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than or equal to 1"),
    ({"basic": {"family": "sdxl"}, "advanced": {"clip_skip": 2}}, "advanced.clip_skip: Stable Diffusion XL reads fixed"),
    ({"lora": {"dora": True, "unet_targets": "attn"}}, "lora.unet_targets"),
    ({"lora": {"output_name": "a/b"}}, "lora.output_name"),
])
def test_bad_lora_configs_name_the_field(lora_config, change, message):
    raw = lora_config("sd1")
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(raw)
