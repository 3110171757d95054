"""The toy FLUX.1's parts: its T5 tokenizer (every toy word one token, loads offline as FluxPipeline names it)."""

import pytest

from conjure.toy.tokenizer import T5_MODEL_MAX_LENGTH, TOY_WORDS, toy_t5_tokenizer, write_toy_t5_tokenizer

SAMPLE = "a large red circle in the top left on a white background"


@pytest.fixture(scope="module")
def t5():
    return toy_t5_tokenizer()


def test_every_toy_word_is_one_t5_token(t5):
    ids = {w: t5(w).input_ids for w in TOY_WORDS}
    assert all(len(i) == 2 and i[1] == t5.eos_token_id for i in ids.values())
    assert len({i[0] for i in ids.values()}) == len(TOY_WORDS)  # distinct tokens
    assert t5.unk_token_id not in {i[0] for i in ids.values()}
    assert len(t5(SAMPLE).input_ids) == len(SAMPLE.split()) + 1 <= T5_MODEL_MAX_LENGTH


def test_t5_special_tokens_are_t5s_and_other_text_never_becomes_unk(t5):
    assert (t5.pad_token, t5.pad_token_id, t5.eos_token, t5.eos_token_id, t5.unk_token_id) == ("<pad>", 0, "</s>", 1, 2)
    ids = t5("A Photo, of <yellow-star> 42!").input_ids
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    assert t5.decode(ids, skip_special_tokens=True) == "A Photo, of <yellow-star> 42!"


def test_t5_tokenizer_loads_offline_as_t5_tokenizer_fast(tmp_path, t5):
    from transformers import T5TokenizerFast

    write_toy_t5_tokenizer(tmp_path)
    loaded = T5TokenizerFast.from_pretrained(tmp_path)
    assert loaded.model_max_length == T5_MODEL_MAX_LENGTH
    batch = loaded([SAMPLE, "a star"], padding="max_length", max_length=T5_MODEL_MAX_LENGTH).input_ids
    assert batch[0] == t5(SAMPLE, padding="max_length", max_length=T5_MODEL_MAX_LENGTH).input_ids
    assert batch[1][3:] == [loaded.pad_token_id] * (T5_MODEL_MAX_LENGTH - 3)


# The shipped toy FLUX.1 (src/conjure/assets/toy/flux, made by scripts/train_toy_models.py flux + assemble)


@pytest.fixture(scope="module")
def toy_flux():
    import torch
    from diffusers import FluxPipeline

    from conjure.toy.models import toy_model

    return FluxPipeline.from_pretrained(toy_model("flux"), torch_dtype=torch.float32)


def test_toy_flux_loads_offline_in_flux_pipeline_and_draws(toy_flux):
    import torch

    config = toy_flux.transformer.config
    assert (config.in_channels, config.guidance_embeds) == (4 * toy_flux.vae.config.latent_channels, True)
    assert type(toy_flux.tokenizer_2).__name__ == "T5Tokenizer" and toy_flux.tokenizer_2.model_max_length == 16
    assert toy_flux.scheduler.config.use_dynamic_shifting
    for tokenizer in (toy_flux.tokenizer, toy_flux.tokenizer_2):  # the shipped folders: one token per toy word
        assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in TOY_WORDS)
    toy_flux.set_progress_bar_config(disable=True)
    image = toy_flux("a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_toy_vae_shift_is_registered_and_far_from_zero(toy_flux):
    from conjure.toy.pretrain_flux import SHIFT_FACTOR, latent_stats

    vae = toy_flux.vae
    assert vae.config.shift_factor == SHIFT_FACTOR
    means, std = latent_stats(vae, n=32)
    assert float(means.abs().max()) < 0.15  # (z - shift) * scale is centred
    unshifted, _ = latent_stats(vae, n=32, shifted=False)
    assert float(unshifted.min()) > 3 * std  # forgetting the shift puts every channel >3 std off


def test_build_flux_is_what_ships():
    import json

    from conjure.toy.models import toy_model
    from conjure.toy.pretrain_flux import MODEL_INDEX, build_flux

    folder, parts = toy_model("flux"), build_flux()
    ignored = {"_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version",
               "dtype", "torch_dtype", "_use_default_values"}
    for name, file in (("transformer", "config.json"), ("text_encoder", "config.json"),
                       ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):
        shipped = json.loads((folder / name / file).read_text())
        built = json.loads(json.dumps(dict(parts[name].config.to_dict() if hasattr(parts[name].config, "to_dict")
                                           else parts[name].config), default=list))
        assert {k: built.get(k) for k in shipped if k not in ignored} == {
            k: v for k, v in shipped.items() if k not in ignored}, name
    index = json.loads((folder / "model_index.json").read_text())
    assert {k: v for k, v in index.items() if k != "_diffusers_version"} == MODEL_INDEX


def test_shift_keeps_reconstructions_and_a_short_run_saves_the_parts(tmp_path):
    import random

    import torch
    from diffusers import AutoencoderKL

    from conjure.toy import pretrain, pretrain_flux
    from conjure.toy.models import toy_model

    vae = AutoencoderKL.from_pretrained(toy_model("sd1") / "vae", torch_dtype=torch.float32)
    pixels = pretrain.render_batch(pretrain._scenes(random.Random(1), 4, with_new_concepts=True))
    with torch.no_grad():
        before = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        pretrain_flux.shift_vae(vae, n=8)
        after = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    torch.testing.assert_close(after, before, atol=1e-3, rtol=0)
    parts = pretrain_flux.train_flux(vae, 2, out=tmp_path, images=4, batch=4, distill_from=0.5, log_every=1)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert (tmp_path / name / "config.json").is_file(), name
    assert parts["transformer"].config.guidance_embeds
