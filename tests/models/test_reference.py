"""The full-size FLUX.1 built weightless on the meta device from its published configs: sizes and shapes."""

import pytest
import torch

from conjure.models.reference import build_reference_components


@pytest.fixture(scope="module")
def flux():
    return {v: build_reference_components("flux", device="meta", variant=v) for v in ("dev", "schnell")}


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_flux_parts_have_the_published_sizes(flux):
    dev = flux["dev"]
    assert all(p.is_meta for p in dev["transformer"].parameters())  # nothing allocated
    # FLUX.1-dev: 11.9B in the transformer, T5-XXL's encoder 4.76B, CLIP-L's text model 123M, the VAE 83.8M
    sizes = {name: _params(dev[name]) for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}
    assert sizes == {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
                     "vae": 83_819_683}
    # schnell: the same but for the guidance embedder
    assert _params(dev["transformer"]) - _params(flux["schnell"]["transformer"]) == 10_229_760
    assert not flux["schnell"]["transformer"].config.guidance_embeds


def test_flux_module_shapes_and_configs(flux):
    transformer, vae = flux["dev"]["transformer"], flux["dev"]["vae"]
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert transformer.transformer_blocks[18].attn.to_q.weight.shape == (3072, 3072)
    assert transformer.single_transformer_blocks[37].proj_mlp.weight.shape == (12288, 3072)
    assert transformer.single_transformer_blocks[0].proj_out.weight.shape == (3072, 3072 + 12288)
    assert transformer.x_embedder.weight.shape == (3072, 64) and transformer.context_embedder.weight.shape == (3072, 4096)
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (16, 0.3611, 0.1159)
    t5 = flux["dev"]["text_encoder_2"]
    assert t5.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.shape == (10240, 4096)  # gated-gelu
    assert flux["dev"]["scheduler"].config.use_dynamic_shifting
    assert not flux["schnell"]["scheduler"].config.use_dynamic_shifting
    assert flux["dev"]["tokenizer_2"].model_max_length == 512
    assert all(p.dtype == torch.float32 for p in transformer.parameters())
