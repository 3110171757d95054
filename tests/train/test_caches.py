"""Latent and text-encoder caches: a cached run trains exactly what an uncached one does; disk entries are
reused across runs and recomputed for exactly the images that changed; settings that cannot be cached are
refused naming the field."""

import numpy as np
import pytest
import torch
from PIL import Image

from conjure.config import ConfigError, parse_config
from conjure.errors import ConjureError
from conjure.models.loading import LoadedModel
from conjure.train.loop import train
from conjure.train.text_ahead import encode_ahead as real_ahead
from conjure.train.text_ahead import free_encoders as real_free
from conjure.train.text_ahead import still_needed


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"zwx picture, item {i % 2}")
    return data


def config(tiny_models, folder, tmp_path, name="run", family="sd1", **data):
    return parse_config({
        "type": "lora",
        "basic": {"base_model": str(tiny_models(family)), "output_dir": str(tmp_path / "runs"), "run_name": name,
                  "max_train_steps": 6, "save_every_n_steps": 6, "validate_every_n_steps": None, "seed": 4},
        "data": {"source": str(folder), "resolution": 64, "batch_size": 2, "random_flip": True, **data},
        "lora": {"trigger_word": "zwx", "rank": 2, "save_dtype": "fp32"},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
    })


def final_state(result):
    return torch.load(result.checkpoints[-1] / "training_state.pt", weights_only=False)["method"]


def counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(args)
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cached_runs_train_exactly_what_uncached_runs_do(tiny_models, folder, tmp_path, family, monkeypatch):
    import conjure.train.conditioning as conditioning
    import conjure.train.loss as loss

    plain = final_state(train(config(tiny_models, folder, tmp_path, "plain", family)))
    encodes = counting(monkeypatch, loss, "vae_posterior")
    texts = counting(monkeypatch, conditioning, "encode_text")
    cached = final_state(train(config(tiny_models, folder, tmp_path, "cached", family, cache_latents="memory",
                                      cache_text_encoder_outputs=True)))
    assert plain.keys() == cached.keys()
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], atol=1e-6, rtol=1e-5)
    # 6 steps x 2 images = 12 items from 4 images x 2 flips: at most 8 encodings; 2 caption texts, once each
    # (validation encodes its prompts through encode_text too, uncached)
    assert sum(len(args[1]) for args in encodes) <= 8
    assert sorted(c for args in texts for c in args[1] if "item" in c) == ["zwx picture, item 0", "zwx picture, item 1"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoded_ahead_trains_what_the_step_by_step_cache_does(tiny_models, folder, tmp_path, family,
                                                                     monkeypatch):
    """On a GPU the captions and validation prompts are encoded before the denoiser is placed and the encoders
    leave for the CPU (train/text_ahead.py); forced here on the CPU: every caption and prompt is encoded once, up
    front, none during the steps or the validations, the encoders are then freed (nothing needs them again), and
    the run trains what the step-by-step cache trains."""
    import conjure.train.conditioning as conditioning
    import conjure.train.loop as loop

    def run(name):
        raw = config(tiny_models, folder, tmp_path, name, family, cache_text_encoder_outputs=True,
                     caption_dropout=0.3)
        raw.basic.validate_every_n_steps = 3
        raw.validation.prompts = ["a zwx photo", "a painting"]
        return final_state(train(raw))

    step_by_step = run("lazy")
    texts = counting(monkeypatch, conditioning, "encode_text")
    prompts = counting(monkeypatch, conditioning, "prompt_embeds")
    monkeypatch.setattr(loop, "offloads", lambda device: True)
    monkeypatch.setattr(loop, "encode_ahead", lambda *a, **k: texts.append(("ahead",)) or real_ahead(*a, **k))
    freed = []
    monkeypatch.setattr(loop, "free_encoders", lambda model, ahead: freed.append(model) or real_free(model, ahead))
    ahead = run("ahead")
    assert texts[0] == ("ahead",)
    (model,) = freed
    assert all(model.components[slot.encoder] is None for slot in model.family.text_encoders)
    encoded = [c for args in texts[1:] for c in args[1]]
    assert sorted(encoded) == sorted(["zwx picture, item 0", "zwx picture, item 1", ""] + ["a zwx photo", "a painting"]
                                     + [""] * 2)  # two prompts, each with its empty negative
    assert len(prompts) == 2  # once each, though the run validated twice (steps 3 and 6)
    for key in step_by_step:
        torch.testing.assert_close(ahead[key], step_by_step[key], atol=1e-6, rtol=1e-5)


def test_flux_text_encoded_ahead_frees_t5_and_clip_and_trains_the_same(tiny_models, folder, tmp_path, monkeypatch):
    """FLUX.1's T5 and CLIP-L, encoded ahead (forced on the CPU) and then freed before the transformer's weights are
    read, give the steps the step-by-step cache gives, validation included (its prompt read from what was encoded
    ahead)."""
    import conjure.train.loop as loop

    def run(name):
        raw = config(tiny_models, folder, tmp_path, name, "flux", cache_text_encoder_outputs=True,
                     caption_dropout=0.3)
        raw.basic.validate_every_n_steps = 3
        return final_state(train(raw))

    step_by_step = run("lazy")
    freed, met = [], []
    monkeypatch.setattr(loop, "offloads", lambda device: True)
    monkeypatch.setattr(loop, "free_encoders", lambda model, ahead: freed.append(model) or real_free(model, ahead))
    read = LoadedModel.load_pending
    monkeypatch.setattr(LoadedModel, "load_pending", lambda model: met.append(
        [(name, model.components[name]) for name in ("text_encoder", "text_encoder_2", "transformer")]) or read(model))
    ahead = run("ahead")
    (model,) = freed
    assert [model.components[slot.encoder] for slot in model.family.text_encoders] == [None, None]
    # the transformer's weights were read after the encoders had gone: until then it was built on the meta device
    ((clip, t5, transformer),) = met
    assert clip == ("text_encoder", None) and t5 == ("text_encoder_2", None) and transformer[1].device.type == "meta"
    assert model.denoiser.device.type == "cpu" and not model.pending
    for key in step_by_step:
        torch.testing.assert_close(ahead[key], step_by_step[key], atol=1e-6, rtol=1e-5)


def test_text_encoders_are_kept_for_the_held_out_loss_and_a_whole_model_save(tiny_models, folder, tmp_path):
    """The held-out loss encodes its captions as it measures, so it keeps the encoders; without it they go, unless
    the method saves them (a fine-tune's whole model)."""
    import conjure.train.loop as loop
    from conjure.methods import method_spec

    raw = config(tiny_models, folder, tmp_path, cache_text_encoder_outputs=True)
    raw.validation.holdout = 0.25
    freed = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "offloads", lambda device: True)
        patch.setattr(loop, "free_encoders", lambda model, ahead: freed.append(model))
        train(raw)
    assert not freed and still_needed(method_spec("lora"), False) is None
    assert "whole model" in still_needed(method_spec("finetune"), False)  # its saved files hold the text encoders


def test_disk_cache_is_reused_and_recomputes_exactly_the_changed_image(tiny_models, folder, tmp_path, monkeypatch):
    import conjure.train.loss as loss

    encodes = counting(monkeypatch, loss, "vae_posterior")
    first = train(config(tiny_models, folder, tmp_path, "a", cache_latents="disk", center_crop=True))
    first_count = sum(len(args[1]) for args in encodes)
    entries = sorted((tmp_path / "runs" / ".cache" / "latents").rglob("*.safetensors"))
    assert first_count == len(entries) > 0

    encodes.clear()
    second = train(config(tiny_models, folder, tmp_path, "b", cache_latents="disk"))
    assert encodes == []  # every entry came from disk
    assert all(torch.equal(final_state(first)[k], final_state(second)[k]) for k in final_state(first))

    Image.new("RGB", (64, 72), (10, 200, 10)).save(folder / "2.png")  # one image changes
    train(config(tiny_models, folder, tmp_path, "c", cache_latents="disk"))
    # only the new image's variants (a flip or not) are encoded; its old entries stay but are never used
    assert 1 <= sum(len(args[1]) for args in encodes) <= 2
    assert all(args[1].shape[0] <= 2 for args in encodes)
    assert len(list((tmp_path / "runs" / ".cache" / "latents").rglob("*.safetensors"))) == len(entries) + sum(
        len(args[1]) for args in encodes)


def test_settings_that_cannot_be_cached_are_refused(tiny_models, folder, tmp_path, ti_config):
    with pytest.raises(ConfigError, match="data.cache_latents"):
        config(tiny_models, folder, tmp_path, cache_latents="memory", center_crop=False)
    with pytest.raises(ConfigError, match=r"data\.cache_text_encoder_outputs.*data\.shuffle_caption_delimiter"):
        config(tiny_models, folder, tmp_path, cache_text_encoder_outputs=True, shuffle_caption_delimiter=",")
    config(tiny_models, folder, tmp_path, cache_text_encoder_outputs=True, caption_dropout=0.1)  # one more text: ""
    raw = ti_config(data={"cache_text_encoder_outputs": True})
    with pytest.raises(ConjureError, match="data.cache_text_encoder_outputs"):
        train(parse_config(raw))


def test_training_never_writes_into_the_data_folder(tiny_models, folder, tmp_path):
    import hashlib

    def listing():
        return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = listing()
    train(config(tiny_models, folder, tmp_path, cache_latents="disk", aspect_ratio_buckets=True, bucket_step=16))
    assert listing() == before and not any(p.name.startswith(".") for p in folder.iterdir())
