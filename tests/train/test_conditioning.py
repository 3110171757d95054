"""Text conditioning: which hidden states the UNet reads (clip skip, SDXL's penultimate layers), captions longer
than 75 tokens read in chunks exactly as kohya reads them, and LoRA targets only where a gradient arrives."""

import pytest
import torch

from conjure.config import ConfigError, parse_config
from conjure.errors import ConjureError
from conjure.families import SD1, SDXL
from conjure.train.conditioning import TextReading, _ids, encode_text

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tiny_models):
    from conjure.models.loading import load_base_model

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_base_model(str(tiny_models(family)))
        return cache[family]

    return get


def kohya_ids(tokenizer, caption, max_length):
    """kohya-ss/sd-scripts 48d368f, library/strategy_base.py `_get_input_ids` (unweighted), verbatim in effect:
    tokenise to max_length (= max_token_length + 2), cut into BOS + 75 tokens + last id, then fix the ends."""
    input_ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt").input_ids
    if max_length <= tokenizer.model_max_length:
        return input_ids
    input_ids = input_ids.squeeze(0)
    out = []
    for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
        chunk = torch.cat((input_ids[0].unsqueeze(0), input_ids[i : i + tokenizer.model_max_length - 2],
                           input_ids[-1].unsqueeze(0)))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # v2 / SDXL
            if chunk[-2] != tokenizer.eos_token_id and chunk[-2] != tokenizer.pad_token_id:
                chunk[-1] = tokenizer.eos_token_id
            if chunk[1] == tokenizer.pad_token_id:
                chunk[1] = tokenizer.eos_token_id
        out.append(chunk)
    return torch.stack(out)


def kohya_join(states, model_max_length):
    """kohya's `encode_tokens` (strategy_sd.py, strategy_sdxl.py): [b, n*77, d] -> [<BOS>, n x 75 states, last]."""
    max_token_length = states.shape[1]
    parts = [states[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, model_max_length):
        parts.append(states[:, i : i + model_max_length - 2])
    parts.append(states[:, -1].unsqueeze(1))
    return torch.cat(parts, dim=1)


def words(n, word="red"):
    return " ".join([word] * n)  # "red" is one token of CLIP's vocabulary


CAPTIONS = ["", "a photo", words(74), words(75), words(76), words(80) + ", " + words(60, "blue"), words(300)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("max_tokens", [75, 150, 225])
def test_token_windows_are_kohyas(models, family, max_tokens):
    for tokenizer, _ in models(family).text_encoders():  # SDXL: CLIP-L pads with the end token, CLIP-G with "!"
        got = _ids(tokenizer, CAPTIONS, CPU, max_tokens)
        expected = torch.stack([kohya_ids(tokenizer, c, max_tokens + 2 if max_tokens > 75 else 77) for c in CAPTIONS])
        assert got.shape == (len(CAPTIONS), max_tokens // 75, 77)
        assert torch.equal(got, expected.reshape(got.shape))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tokens_76_to_150_condition_only_with_max_token_length_150(models, family):
    model = models(family)
    width = sum(e.config.hidden_size for _, e in model.text_encoders())
    a, b = words(75) + " " + words(75, "blue"), words(75) + " " + words(75, "green")
    short = encode_text(model.text_encoders(), [a, b], CPU, reading=TextReading(model.family.text_encoders))
    long = encode_text(model.text_encoders(), [a, b], CPU,
                       reading=TextReading(model.family.text_encoders, max_tokens=150))
    assert short["encoder_hidden_states"].shape == (2, 77, width)
    assert long["encoder_hidden_states"].shape == (2, 152, width)  # kohya: 1 + 2 x 75 + 1
    torch.testing.assert_close(short["encoder_hidden_states"][0], short["encoder_hidden_states"][1])
    assert not torch.allclose(long["encoder_hidden_states"][0], long["encoder_hidden_states"][1])
    # the first chunk is the 75-token window: same states for tokens 1-75
    torch.testing.assert_close(long["encoder_hidden_states"][:, :76], short["encoder_hidden_states"][:, :76])
    if family == "sdxl":  # pooled from the first chunk (kohya: pool2[::n_size]), so the same as at 75
        torch.testing.assert_close(long["text_embeds"], short["text_embeds"])
    three = encode_text(model.text_encoders(), [a], CPU, reading=TextReading(model.family.text_encoders, max_tokens=225))
    assert three["encoder_hidden_states"].shape == (1, 227, width)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_chunks_are_encoded_separately_and_joined_as_kohya_joins_them(models, family):
    model = models(family)
    caption = words(80) + ", " + words(100, "blue")
    got = encode_text(model.text_encoders(), [caption], CPU,
                      reading=TextReading(model.family.text_encoders, max_tokens=225))
    parts = []
    for slot, (tokenizer, encoder) in zip(model.family.text_encoders, model.text_encoders()):
        ids = kohya_ids(tokenizer, caption, 227)
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states = out.last_hidden_state if slot.final_norm else out.hidden_states[-2]
        parts.append(kohya_join(states.reshape(1, -1, states.shape[-1]), 77))
        if slot.pooled:
            torch.testing.assert_close(got["text_embeds"], out.text_embeds[:1])
    torch.testing.assert_close(got["encoder_hidden_states"], torch.cat(parts, dim=-1))


def test_clip_skip_2_is_the_penultimate_hidden_state_with_the_final_layer_norm(models):
    model = models("sd1")
    tokenizer, encoder = model.text_encoders()[0]
    reading = TextReading.of(SD1, [encoder], clip_skip=2)
    got = encode_text(model.text_encoders(), ["a red photo"], CPU, reading=reading)["encoder_hidden_states"]
    ids = tokenizer(["a red photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        expected = encoder.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, out.last_hidden_state)
    with pytest.raises(ConjureError, match="advanced.clip_skip 3: the model's text_encoder has only 2 layers"):
        TextReading.of(SD1, [encoder], clip_skip=3)
    with pytest.raises(ConjureError, match="advanced.clip_skip"):
        TextReading.of(SDXL, [e for _, e in models("sdxl").text_encoders()], clip_skip=2)


def lora_config(tiny_models, image_folder, tmp_path, family, **sections):
    raw = {
        "type": "lora",
        "basic": {"base_model": str(tiny_models(family)), "output_dir": str(tmp_path / "runs"), "run_name": "run",
                  "max_train_steps": 1, "save_every_n_steps": 1, "validate_every_n_steps": None, "seed": 3},
        "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2},
        "lora": {"rank": 2, "train_text_encoder": True},
        "validation": {"seeds": [0], "num_inference_steps": 1, "at_start": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_config_fields(tiny_models, image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"advanced\.clip_skip: Stable Diffusion XL reads fixed text-encoder layers"):
        parse_config(lora_config(tiny_models, image_folder, tmp_path, "sdxl", advanced={"clip_skip": 2},
                                 basic={"family": "sdxl"}))
    assert parse_config(lora_config(tiny_models, image_folder, tmp_path, "sd1", advanced={"clip_skip": 2}))
    with pytest.raises(ConfigError, match=r"data\.max_token_length: Input should be a multiple of 75"):
        parse_config(lora_config(tiny_models, image_folder, tmp_path, "sd1", data={"max_token_length": 100}))
    # the web form sends numbers as text
    raw = lora_config(tiny_models, image_folder, tmp_path, "sdxl", data={"max_token_length": "225"})
    assert parse_config(raw).data.max_token_length == 225


@pytest.mark.parametrize("family, clip_skip, unadapted", [
    ("sdxl", 1, {"text_encoder": [1], "text_encoder_2": []}),  # CLIP-L's last layer: SDXL reads hidden_states[-2]
    ("sd1", 1, {"text_encoder": []}),
    ("sd1", 2, {"text_encoder": [1]}),  # clip skip 2: the last layer's output is never read
])
def test_lora_leaves_out_text_encoder_layers_whose_output_is_unused(tiny_models, family, clip_skip, unadapted):
    from conjure.config.lora import LoraSection
    from conjure.methods.lora import Lora
    from conjure.models.loading import load_base_model

    model = load_base_model(str(tiny_models(family)))  # a fresh one: Lora injects its adapters in place
    layers = {slot.encoder: model.components[slot.encoder].config.num_hidden_layers
              for slot in model.family.text_encoders}
    lora = Lora(model, LoraSection(rank=2, train_text_encoder=True), clip_skip=clip_skip)
    for encoder, skipped in unadapted.items():
        adapted = {int(p.split("layers.")[1].split(".")[0]) for p in lora.targets[encoder]}
        assert adapted == set(range(layers[encoder])) - set(skipped)
        assert len(lora.targets[encoder]) == 6 * len(adapted)  # q, k, v, out, fc1, fc2
    meta = lora.metadata("x", step=1, resolution=64, base_model="m", prediction_type="epsilon")
    assert meta.get("ss_clip_skip") == (str(clip_skip) if model.family.clip_skip else None)


def test_training_cache_and_validation_read_alike(tiny_models, image_folder, tmp_path, monkeypatch):
    """One run with clip skip 2, 150 tokens and the text cache: every encoding of training and the text cache goes
    through the same reading, and validation passes the pipeline conjure's own 152-token prompt embeddings."""
    import conjure.train.conditioning as conditioning
    from conjure.train.loop import train

    readings, embeds = [], []
    real_encode, real_embeds = conditioning.encode_text, conditioning.prompt_embeds
    monkeypatch.setattr(conditioning, "encode_text", lambda *a, **k: readings.append(k["reading"]) or real_encode(*a, **k))
    monkeypatch.setattr(conditioning, "prompt_embeds",
                        lambda *a, **k: embeds.append(real_embeds(*a, **k)) or embeds[-1])
    raw = lora_config(tiny_models, image_folder, tmp_path, "sd1", advanced={"clip_skip": 2},
                      data={"max_token_length": 150, "cache_text_encoder_outputs": True},
                      lora={"train_text_encoder": False})
    result = train(parse_config(raw))
    assert result.status == "completed" and readings and embeds
    assert {(r.clip_skip, r.max_tokens) for r in readings} == {(2, 150)}
    assert all(e["prompt_embeds"].shape[1] == e["negative_prompt_embeds"].shape[1] == 152 for e in embeds)


def test_the_long_caption_warning_follows_max_token_length(models):
    from conjure.train.setup import count_long_captions

    tokenizer = models("sd1").text_encoders()[0][0]
    captions = [words(74), words(75), words(76), words(150), words(151)]
    assert count_long_captions(tokenizer, captions, 75) == 3
    assert count_long_captions(tokenizer, captions, 150) == 1
    assert count_long_captions(tokenizer, captions, 225) == 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_validation_embeddings_render_what_the_pipeline_renders_by_default(tiny_models, tmp_path, family):
    """Without clip skip or long captions, conjure's encoding of a prompt and an empty negative is the pipeline's
    own (SDXL: zeros for the empty negative, as force_zeros_for_empty_prompt makes it)."""
    import numpy as np
    from PIL import Image

    from conjure.models.loading import load_base_model
    from conjure.train.conditioning import prompt_embeds
    from conjure.train.validation import build_pipeline, render

    model = load_base_model(str(tiny_models(family)))
    pipe = build_pipeline(model.family.pipeline_class, dict(model.components))
    reading = TextReading.of(model.family, [e for _, e in model.text_encoders()])
    settings = dict(prompts=["a photo of a dog"], seeds=[3], negative_prompt="", num_inference_steps=2,
                    guidance_scale=2.0, resolution=64)
    (own,), _ = render(pipe, tmp_path / "own", **settings)
    (ours,), _ = render(pipe, tmp_path / "ours", **settings,
                        embed=lambda p, n: prompt_embeds(model.text_encoders(), p, n, CPU, reading=reading))
    with Image.open(own) as a, Image.open(ours) as b:
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
