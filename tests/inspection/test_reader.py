"""The reader on each trainer's layout: synthetic files of real key names and real shapes at small rank."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from conjure.inspection.reader import inspect_file

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def write(tmp_path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None, name="f.safetensors"):
    path = tmp_path / name
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path), metadata)
    return path


def lora(name: str, n_out: int, n_in: int, rank: int = 2, *, spelling=("lora_down.weight", "lora_up.weight")):
    return {f"{name}.{spelling[0]}": (rank, n_in), f"{name}.{spelling[1]}": (n_out, rank)}


def test_kohya_sdxl_ldm_names_and_alpha(tmp_path):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    path = write(tmp_path, {**lora(name, 640, 2048), f"{name}.alpha": ()})
    insp = inspect_file(path)
    (m,) = insp.modules
    assert (insp.family, insp.family_certain, m.naming, m.component) == ("sdxl", True, "kohya-ldm", "unet")
    assert m.targets == ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",) and m.alpha == 0.0


def test_peft_text_encoder_and_diffusers_adapter_alpha(tmp_path):
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    meta = {"lora_adapter_metadata": '{"text_encoder.r": 2, "text_encoder.lora_alpha": 8}'}
    insp = inspect_file(write(tmp_path, lora(te, 768, 768, spelling=("lora_A.weight", "lora_B.weight")), meta))
    (m,) = insp.modules
    assert (m.naming, m.spelling, m.component, m.alpha, m.rank) == ("peft", "peft", "text_encoder", 8.0, 2)
    assert m.targets == ("text_model.encoder.layers.0.self_attn.q_proj",)


def test_old_diffusers_attention_processors(tmp_path):
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    shapes = {**lora(f"{base}.to_q", 320, 320, spelling=("_lora.down.weight", "_lora.up.weight")),
              **lora(f"{base}.to_out", 320, 320, spelling=("_lora.down.weight", "_lora.up.weight"))}
    shapes = {k.replace("._lora", "_lora"): v for k, v in shapes.items()}
    insp = inspect_file(write(tmp_path, shapes))
    assert {m.targets[0] for m in insp.modules} == {Q, Q.replace("to_q", "to_out.0")}
    assert {(m.naming, m.spelling) for m in insp.modules} == {("attn-procs", "attn-procs")}


def test_lycoris_loha_lokr_and_locon(tmp_path):
    loha = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lokr = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    shapes = {f"{loha}.hada_w1_a": (320, 4), f"{loha}.hada_w1_b": (4, 320), f"{loha}.hada_w2_a": (320, 4),
              f"{loha}.hada_w2_b": (4, 320), f"{loha}.alpha": (),
              f"{lokr}.lokr_w1": (8, 8), f"{lokr}.lokr_w2_a": (40, 4), f"{lokr}.lokr_w2_b": (4, 40)}
    insp = inspect_file(write(tmp_path, shapes))
    assert insp.kind == "LoHa + LoKr"
    assert {m.algorithm: m.rank for m in insp.modules} == {"loha": 4, "lokr": 4}
    locon = inspect_file(write(tmp_path, {f"{conv}.lora_down.weight": (4, 320, 3, 3),
                                          f"{conv}.lora_up.weight": (320, 4, 1, 1)}, name="c.safetensors"))
    assert locon.kind == "LoCon" and locon.modules[0].conv_kernel == (3, 3)


def test_flux_layouts_of_kohya_onetrainer_and_ai_toolkit(tmp_path):
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    kohya = inspect_file(write(tmp_path, {**lora(qkv, 9216, 3072, 6), f"{qkv}.alpha": ()}, name="k.safetensors"))
    (m,) = kohya.modules
    assert (kohya.family, m.naming) == ("flux", "kohya-bfl")
    assert m.targets == tuple(f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v"))
    onetrainer = inspect_file(write(tmp_path, lora("lora_transformer_single_transformer_blocks_0_attn_to_q", 3072,
                                                   3072), name="o.safetensors"))
    (m,) = onetrainer.modules
    assert (onetrainer.family, m.naming, m.targets) == ("flux", "onetrainer", ("single_transformer_blocks.0.attn.to_q",))
    aitk = inspect_file(write(tmp_path, lora("transformer.transformer_blocks.3.ff.net.2", 3072, 12288,
                                             spelling=("lora_A.weight", "lora_B.weight")), name="a.safetensors"))
    (m,) = aitk.modules
    assert (aitk.family, m.component, m.targets) == ("flux", "transformer", ("transformer_blocks.3.ff.net.2",))


def test_embeddings_bundles_and_trigger_words(tmp_path):
    sdxl = inspect_file(write(tmp_path, {"clip_l": (3, 768), "clip_g": (3, 1280)}, name="e.safetensors"))
    assert (sdxl.kind, sdxl.family, sdxl.family_certain, sdxl.embeddings[0].vectors) == ("embedding", "sdxl", True, 3)
    lone = inspect_file(write(tmp_path, {"<cat-toy>": (768,)}, name="learned_embeds.safetensors"))
    assert (lone.family, lone.embeddings[0].name, lone.embeddings[0].vectors) == ("sd1", "<cat-toy>", 1)
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    bundle = inspect_file(write(tmp_path, {**lora(name, 768, 768), "bundle_emb.ohwx.clip_l": (2, 768),
                                           "bundle_emb.ohwx.clip_g": (2, 1280)}, name="b.safetensors"))
    (emb,) = bundle.bundled()
    assert bundle.kind == "LoRA + embedding" and emb.name == "ohwx" and set(emb.tensors) == {"clip_l", "clip_g"}


def test_unknown_module_names_are_kept_and_reported(tmp_path):
    insp = inspect_file(write(tmp_path, {**lora("lora_unet_not_a_module", 8, 8), "extra_tensor": (3,)}))
    (m,) = insp.modules
    assert (m.naming, m.component, m.targets) == ("unknown", None, ()) and insp.unknown == ["extra_tensor"]


def test_simpletuner_lycoris_flux_and_sd_names_tell_their_family(tmp_path):
    flux = inspect_file(write(tmp_path, {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": (8, 8),
                                         "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": (384, 384)},
                              name="f.safetensors"))
    (m,) = flux.modules
    assert (flux.family, m.naming, m.targets, m.algorithm) == ("flux", "lycoris", ("transformer_blocks.0.attn.to_q",),
                                                               "lokr")
    sd = inspect_file(write(tmp_path, lora(f"lycoris_{Q.replace('.', '_')}".replace("attn1_to_q", "attn2_to_k"),
                                           320, 1024), name="s.safetensors"))
    assert (sd.family, sd.family_certain, sd.modules[0].naming) == ("sd2", True, "lycoris")


def test_an_embedding_of_a_toy_width_takes_the_family_its_header_names(tmp_path):
    """A toy or tiny model's embedding (width 64: no real encoder's) is no family's by its shapes; the header's
    modelspec.architecture names one, which the report shows as not certain."""
    named = inspect_file(write(tmp_path, {"emb_params": (1, 64)},
                               {"modelspec.architecture": "stable-diffusion-v1/textual-inversion"}))
    assert (named.family, named.family_certain) == ("sd1", False)
    bare = inspect_file(write(tmp_path, {"emb_params": (1, 64)}, name="bare.safetensors"))
    assert (bare.family, bare.family_certain) == (None, False)


def test_a_safetensors_header_whose_length_starts_with_a_pickle_opcode_reads_as_safetensors(tmp_path):
    """The length's low byte 0x80 (one safetensors header in 32, conjure's shared files' among them) is no pickle."""
    import json
    import struct

    path = write(tmp_path, {"emb_params": (2, 8)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + n])).encode()
    header += b" " * (0x180 - len(header))  # a length of 0x180: its first byte is 0x80
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    assert path.read_bytes()[:1] == b"\x80" and inspect_file(path).format == "safetensors"
