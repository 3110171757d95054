"""FLUX conditioning (conjure/train/flux.py) against FluxPipeline's own code path on a tiny random FLUX.1:
the text encoding, the transformer call (packing, ids, sigma as timestep, guidance) and the prompt embeddings."""

from types import SimpleNamespace

import pytest
import torch

from conjure.train.flux import FluxConditioning, build_flux_conditioning

T5_TOKENS = 12
CPU = torch.device("cpu")


def _tiny_flux(guidance_embeds: bool = True):
    """A tiny random FluxPipeline, built in memory (STACK_NOTES "FLUX.1 at toy scale")."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from conjure.toy.tokenizer import toy_t5_tokenizer, toy_tokenizer

    torch.manual_seed(0)
    clip_tokenizer, t5_tokenizer = toy_tokenizer(), toy_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        shift_factor=0.1, scaling_factor=0.5,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip,
        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    for part in (clip, t5, transformer, vae):  # built in code, so in training mode: T5's dropout would be on
        part.eval()
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _tiny_flux()


def _pairs(pipe):
    return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]


CAPTIONS = ["a red circle on a white background", "a large blue square in the top left"]


@torch.no_grad()
def test_encode_is_flux_pipelines_encode_prompt(pipe):
    text = FluxConditioning(t5_tokens=T5_TOKENS).encode(_pairs(pipe), CAPTIONS, CPU)
    prompt_embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, max_sequence_length=T5_TOKENS)
    assert text["encoder_hidden_states"].shape == (2, T5_TOKENS, 32)
    assert text["pooled_projections"].shape == (2, 32)
    assert torch.equal(text["encoder_hidden_states"], prompt_embeds)
    assert torch.equal(text["pooled_projections"], pooled)


@torch.no_grad()
def test_prediction_is_the_transformer_call_of_flux_pipeline(pipe):
    """Our predictor on [B, C, H, W] latents at sigma equals what FluxPipeline's loop computes at timestep
    t = 1000 sigma on its packed latents, unpacked with its own helper."""
    conditioning = FluxConditioning(t5_tokens=T5_TOKENS, guidance=3.5)
    text = conditioning.encode(_pairs(pipe), CAPTIONS, CPU)
    latents = torch.randn(2, 1, 8, 6)
    sigmas = torch.tensor([0.3, 0.9])
    ours = conditioning.predictor(pipe.transformer, [], [], CPU, {}, text=text)(latents, sigmas)
    # without cached text it encodes the captions itself
    assert torch.equal(conditioning.predictor(pipe.transformer, _pairs(pipe), CAPTIONS, CPU, {})(latents, sigmas), ours)

    prompt_embeds, pooled, txt_ids = pipe.encode_prompt(CAPTIONS, CAPTIONS, max_sequence_length=T5_TOKENS)
    packed = pipe._pack_latents(latents, 2, 1, 8, 6)
    img_ids = pipe._prepare_latent_image_ids(2, 4, 3, latents.device, latents.dtype)
    t = sigmas * 1000
    theirs = pipe.transformer(
        hidden_states=packed, timestep=t / 1000, guidance=torch.full([1], 3.5, dtype=torch.float32).expand(2),
        pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
        return_dict=False,
    )[0]
    theirs = pipe._unpack_latents(theirs, 8 * pipe.vae_scale_factor, 6 * pipe.vae_scale_factor, pipe.vae_scale_factor)
    assert ours.shape == latents.shape
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_a_wrapped_transformer_predicts_what_it_does_unwrapped(pipe):
    """Several processes call the transformer through its DDP wrapper, which has no `config`
    (DataParallel here: a wrapper that runs without a process group)."""
    conditioning = FluxConditioning(t5_tokens=T5_TOKENS, guidance=3.5)
    text = conditioning.encode(_pairs(pipe), CAPTIONS, CPU)
    latents, sigmas = torch.randn(2, 1, 4, 4), torch.tensor([0.3, 0.9])
    wrapped = torch.nn.DataParallel(pipe.transformer)
    assert not hasattr(wrapped, "config")
    ours = conditioning.predictor(wrapped, [], [], CPU, {}, text=text)(latents, sigmas)
    assert torch.equal(ours, conditioning.predictor(pipe.transformer, [], [], CPU, {}, text=text)(latents, sigmas))


@torch.no_grad()
def test_guidance_reaches_only_a_guidance_distilled_transformer(pipe):
    text = FluxConditioning(t5_tokens=T5_TOKENS).encode(_pairs(pipe), CAPTIONS, CPU)
    latents, sigmas = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 0.5])
    at = {g: FluxConditioning(t5_tokens=T5_TOKENS, guidance=g).predictor(pipe.transformer, [], [], CPU, {}, text=text)(
        latents, sigmas) for g in (1.0, 4.0)}
    assert not torch.equal(at[1.0], at[4.0])
    schnell = _tiny_flux(guidance_embeds=False).transformer
    out = FluxConditioning(t5_tokens=T5_TOKENS, guidance=4.0).predictor(schnell, [], [], CPU, {}, text=text)(
        latents, sigmas)
    assert out.shape == latents.shape


@torch.no_grad()
def test_prompt_embeds_give_flux_pipelines_images(pipe):
    """Validation passes our prompt embeddings: the images are the ones FluxPipeline makes from the prompt."""
    embeds = FluxConditioning(t5_tokens=T5_TOKENS).prompt_embeds(_pairs(pipe), CAPTIONS[0], "blurry", CPU)
    assert set(embeds) == {"prompt_embeds", "pooled_prompt_embeds"}
    common = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=3.5)
    ours = pipe(**embeds, generator=torch.Generator().manual_seed(0), **common).images
    theirs = pipe(CAPTIONS[0], max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(0),
                  **common).images
    assert (ours == theirs).all()


def test_build_reads_the_variant_the_tokenizer_cap_and_guidance(pipe):
    variants = (SimpleNamespace(name="dev", text_tokens=512), SimpleNamespace(name="schnell", text_tokens=256))
    family = SimpleNamespace(variants=variants, text_encoders=(SimpleNamespace(tokenizer="tokenizer"),
                                                             SimpleNamespace(tokenizer="tokenizer_2")))
    big = SimpleNamespace(model_max_length=512)

    def model(variant, tokenizer):
        return SimpleNamespace(family=family, facts={"variant": SimpleNamespace(value=variant)},
                               components={"tokenizer_2": tokenizer})

    assert build_flux_conditioning(model("schnell", big)).t5_tokens == 256
    dev = build_flux_conditioning(model("dev", big), guidance=3.5)
    assert (dev.t5_tokens, dev.guidance) == (512, 3.5)
    assert build_flux_conditioning(model("dev", pipe.tokenizer_2)).t5_tokens == 16  # the toy's


def test_long_captions_are_counted_against_the_t5_length(pipe):
    """The start warning counts captions T5 cuts off (its tokenizer adds only the end token), not CLIP-L's 77."""
    conditioning = FluxConditioning(t5_tokens=5)
    four, five = "a red circle on", "a red circle on a"  # toy words: one token each, + </s>
    assert conditioning.long_captions(_pairs(pipe), [four, five, five]) == (2, "T5 reads 5 tokens")
    assert conditioning.long_captions(_pairs(pipe), []) == (0, "")
