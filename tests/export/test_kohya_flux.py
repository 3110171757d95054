"""FLUX.1 LoRA files: the kohya layout (fused q/k/v) and the diffusers/PEFT layout.

- Every key of both layouts, for every preset, maps to a module of the right shape in a weightless full-size
  FLUX.1-dev transformer (meta device) and CLIP-L, through each app's rule: diffusers' kohya converter
  (`_convert_kohya_flux_lora_to_diffusers`, what `FluxPipeline.load_lora_weights` runs), ComfyUI's key map
  (comfy/lora.py model_lora_keys_unet/clip over BFL names, comfy/utils.py flux_to_diffusers for the PEFT names) and
  InvokeAI's (flux_kohya_lora_conversion_utils.py regexes), the last two restated here from their sources.
- Fusion split -> fused -> split is exact; dense fused layers (trained fused) read as the same update; refusals.
- Files load through FluxPipeline.load_lora_weights and give what conjure's reader (apply_lora) gives
  (tests/export/test_flux_lora_load.py).
"""

import re

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from conjure.adapters import LoraModule
from conjure.errors import ConjureError
from conjure.export.convert import convert_lora, detect_lora_format
from conjure.export.kohya import kohya_fused_parts, kohya_state_dict, load_kohya, parse_kohya, save_kohya
from conjure.export.kohya_flux import flux_kohya_modules, flux_module_paths
from conjure.export.lora import detect_lora_family
from conjure.export.peft import load_peft, save_peft
from conjure.families import FLUX
from conjure.methods.lora import denoiser_targets, text_encoder_targets

PRESETS = [name for name, _ in FLUX.lora_presets]
META = {"ss_output_name": "test", "conjure.trigger_words": "zq"}


def flux_config(**overrides):
    """FLUX.1-dev's published transformer config, from the family record."""
    ref = FLUX.reference
    config = dict(
        patch_size=1, in_channels=ref.in_channels, num_layers=ref.num_layers, num_single_layers=ref.num_single_layers,
        attention_head_dim=ref.attention_head_dim, num_attention_heads=ref.num_attention_heads,
        joint_attention_dim=ref.joint_attention_dim, pooled_projection_dim=ref.pooled_projection_dim,
        guidance_embeds=True, axes_dims_rope=tuple(ref.axes_dims_rope),
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def full_size():
    """(transformer, CLIP-L) of FLUX.1-dev on the meta device: every shape, no weights."""
    clip = FLUX.reference.encoders[0]
    clip_config = CLIPTextConfig(
        hidden_size=clip.hidden, intermediate_size=clip.intermediate, num_hidden_layers=clip.layers,
        num_attention_heads=clip.heads, hidden_act=clip.activation, projection_dim=clip.projection_dim,
    )
    with torch.device("meta"):
        return FluxTransformer2DModel(**flux_config()), CLIPTextModel(clip_config)


def weights_for(transformer, preset, text_encoder=None, *, rank=1, alpha=2.0, seed=0):
    """Random LoraWeights (real tensors, shapes of the given modules, meta or not) for a preset's targets."""
    g = torch.Generator().manual_seed(seed)
    parts = [("transformer", transformer, denoiser_targets(FLUX, transformer, preset))]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, text_encoder_targets(text_encoder)))
    weights = {}
    for component, model, targets in parts:
        for path in targets:
            linear = model.get_submodule(path)
            weights[(component, path)] = LoraModule(
                down=torch.randn(rank, linear.in_features, generator=g) * 0.1,
                up=torch.randn(linear.out_features, rank, generator=g) * 0.1, alpha=alpha,
            )
    return weights


def shapes(model):
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ---------------------------------------------------------------------------------------------------------------
# the presets


def test_presets_adapt_the_blocks_linears_and_never_the_final_layer(full_size):
    transformer, _ = full_size
    expected = {
        "attention": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out"},
        "attention_mlp": {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                          "proj_out"},
        "all": {"norm1.linear", "norm1_context.linear", "norm.linear"},
    }
    seen: set[str] = set()
    for preset in PRESETS:
        seen |= expected[preset]
        targets = denoiser_targets(FLUX, transformer, preset)
        inner = {re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", t) for t in targets}
        assert inner == seen, (preset, inner ^ seen)
        assert all(t.startswith(("transformer_blocks.", "single_transformer_blocks.")) for t in targets)
        assert "proj_out" not in targets and not any(t.startswith("norm_out") for t in targets)
    assert FLUX.default_lora_preset == "attention_mlp"
    # 19 double blocks x 8 attention linears + 38 single blocks x q/k/v
    assert len(denoiser_targets(FLUX, transformer, "attention")) == 19 * 8 + 38 * 3


# ---------------------------------------------------------------------------------------------------------------
# every key of both layouts, full size, through each app's rule

# ComfyUI comfy/utils.py flux_to_diffusers: diffusers path in a block -> (BFL module in the block, row offset in
# hidden sizes, rows in hidden sizes); a None offset is the whole module.
_COMFY_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 1), "attn.to_k": ("img_attn.qkv", 1, 1), "attn.to_v": ("img_attn.qkv", 2, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 1), "attn.add_k_proj": ("txt_attn.qkv", 1, 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 1), "attn.to_out.0": ("img_attn.proj", None, None),
    "norm1.linear": ("img_mod.lin", None, None), "norm1_context.linear": ("txt_mod.lin", None, None),
    "attn.to_add_out": ("txt_attn.proj", None, None), "ff.net.0.proj": ("img_mlp.0", None, None),
    "ff.net.2": ("img_mlp.2", None, None), "ff_context.net.0.proj": ("txt_mlp.0", None, None),
    "ff_context.net.2": ("txt_mlp.2", None, None),
}
_COMFY_SINGLE = {
    "attn.to_q": ("linear1", 0, 1), "attn.to_k": ("linear1", 1, 1), "attn.to_v": ("linear1", 2, 1),
    "proj_mlp": ("linear1", 3, 4), "norm.linear": ("modulation.lin", None, None), "proj_out": ("linear2", None, None),
}


def bfl_shapes(transformer):
    """BFL module path -> weight shape, built from the diffusers modules by ComfyUI's table (fused rows stacked)."""
    diffusers = shapes(transformer)
    out: dict[str, list[int]] = {}
    for blocks, bfl_blocks, table in (("transformer_blocks", "double_blocks", _COMFY_DOUBLE),
                                      ("single_transformer_blocks", "single_blocks", _COMFY_SINGLE)):
        for path, shape in diffusers.items():
            m = re.fullmatch(rf"{blocks}\.(\d+)\.(.+)", path)
            if m and m.group(2) in table:
                bfl = f"{bfl_blocks}.{m.group(1)}.{table[m.group(2)][0]}"
                rows = out.setdefault(bfl, [0, shape[1]])
                assert rows[1] == shape[1]
                rows[0] += shape[0]
    return {k: tuple(v) for k, v in out.items()}


# InvokeAI flux_kohya_lora_conversion_utils.py
INVOKE_TRANSFORMER = (
    r"lora_unet_(\w+_blocks)_(\d+)_(img_attn|img_mlp|img_mod|txt_attn|txt_mlp|txt_mod|linear1|linear2|modulation)_?(.*)"
)
INVOKE_CLIP = r"lora_te1_text_model_encoder_layers_(\d+)_(mlp|self_attn)_(\w+)\.?.*"
# ComfyUI comfy/lora.py LORA_CLIP_MAP (kohya text-encoder names of CLIP-L under `lora_te1_`)
COMFY_CLIP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
              "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
              "self_attn.out_proj": "self_attn_out_proj"}


def _modules_of_kohya(state):
    names = {k.split(".")[0] for k in state}
    return {n: (tuple(state[f"{n}.lora_up.weight"].shape), tuple(state[f"{n}.lora_down.weight"].shape)) for n in names}


@pytest.mark.parametrize("preset", PRESETS)
def test_kohya_keys_map_to_full_size_modules_in_every_app(full_size, preset):
    transformer, clip = full_size
    weights = weights_for(transformer, preset, clip)
    state = kohya_state_dict(weights, FLUX)
    modules = _modules_of_kohya(state)
    bfl = bfl_shapes(transformer)
    clip_shapes = shapes(clip)
    for name, (up, down) in modules.items():
        product = (up[0], down[1])
        if name.startswith("lora_unet_"):
            # ComfyUI: lora_unet_ + the BFL state-dict key with `.` -> `_`
            comfy = {"lora_unet_" + k.replace(".", "_"): k for k in bfl}
            assert bfl[comfy[name]] == product, name
            # InvokeAI: its regex gives the BFL module path
            m = re.fullmatch(INVOKE_TRANSFORMER, name)
            path = f"{m.group(1)}.{m.group(2)}.{m.group(3)}" + (f".{m.group(4)}" if m.group(4) else "")
            assert bfl[path] == product, name
        else:
            m = re.fullmatch(INVOKE_CLIP, name)
            assert m, name
            inner = next(k for k, v in COMFY_CLIP.items() if v == f"{m.group(2)}_{m.group(3)}")
            assert clip_shapes[f"encoder.layers.{m.group(1)}.{inner}"] == product, name
    assert all(re.match(INVOKE_TRANSFORMER, k) or re.match(INVOKE_CLIP, k) for k in state)  # InvokeAI's detector
    # fused layers are rank x members: q/k/v 3, single linear1 4 (proj_mlp a zero block under `attention`)
    assert modules["lora_unet_double_blocks_0_img_attn_qkv"][1][0] == 3
    assert modules["lora_unet_single_blocks_37_linear1"] == ((7 * 3072, 4), (4, 3072))
    assert float(state["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0

    # diffusers: the converter FluxPipeline.load_lora_weights runs; every transformer key lands on a module
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    diffusers = shapes(transformer)
    got = {}
    for key, value in converted.items():
        if key.startswith("transformer."):
            path, part = re.fullmatch(r"transformer\.(.+)\.(lora_A|lora_B)\.weight", key).groups()
            got.setdefault(path, {})[part] = tuple(value.shape)
    for path, parts in got.items():
        out, n_in = diffusers[path]
        assert parts["lora_A"][1] == n_in and parts["lora_B"][0] == out and parts["lora_A"][0] == parts["lora_B"][1]
        assert parts["lora_A"][0] == 1, path  # split back to the member's own rank ("sparse")
    trained = {p for c, p in weights if c == "transformer"}
    padded = {p for p in got if p.endswith("proj_mlp")} - trained
    assert set(got) == trained | padded
    assert padded == (set() if preset != "attention" else {f"single_transformer_blocks.{i}.proj_mlp" for i in range(38)})


@pytest.mark.parametrize("preset", PRESETS)
def test_peft_keys_map_to_full_size_modules(full_size, preset, tmp_path):
    transformer, clip = full_size
    weights = weights_for(transformer, preset, clip)
    path = save_peft(tmp_path / "lora.safetensors", weights, META, FLUX)
    diffusers, clip_shapes = shapes(transformer), shapes(clip)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            component, module, part = re.fullmatch(r"(transformer|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight", key).groups()
            shape = tuple(f.get_slice(key).get_shape())
            if component == "transformer":
                # ComfyUI maps `transformer.<diffusers path>` (comfy/lora.py, Flux branch); diffusers loads it as is
                out, n_in = diffusers[module]
            else:
                out, n_in = clip_shapes[module.removeprefix("text_model.")]
            assert shape == ((1, n_in) if part == "lora_A" else (out, 1)), key
    assert len(keys) == 2 * len(weights)


# ---------------------------------------------------------------------------------------------------------------
# fusion both ways


def _block_weights(rank=3, alpha=5.0, skip=(), seed=0, width=8):
    """One double and one single block of a width-8 FLUX, every preset-`all` module."""
    g = torch.Generator().manual_seed(seed)
    mlp = 4 * width
    shapes_ = {
        "transformer_blocks.0.attn.to_q": (width, width), "transformer_blocks.0.attn.to_k": (width, width),
        "transformer_blocks.0.attn.to_v": (width, width), "transformer_blocks.0.attn.to_out.0": (width, width),
        "transformer_blocks.0.attn.add_q_proj": (width, width), "transformer_blocks.0.attn.add_k_proj": (width, width),
        "transformer_blocks.0.attn.add_v_proj": (width, width), "transformer_blocks.0.attn.to_add_out": (width, width),
        "transformer_blocks.0.ff.net.0.proj": (mlp, width), "transformer_blocks.0.ff.net.2": (width, mlp),
        "transformer_blocks.0.ff_context.net.0.proj": (mlp, width), "transformer_blocks.0.ff_context.net.2": (width, mlp),
        "transformer_blocks.0.norm1.linear": (6 * width, width),
        "transformer_blocks.0.norm1_context.linear": (6 * width, width),
        "single_transformer_blocks.3.attn.to_q": (width, width), "single_transformer_blocks.3.attn.to_k": (width, width),
        "single_transformer_blocks.3.attn.to_v": (width, width), "single_transformer_blocks.3.proj_mlp": (mlp, width),
        "single_transformer_blocks.3.proj_out": (width, width + mlp),
        "single_transformer_blocks.3.norm.linear": (3 * width, width),
    }
    return {
        ("transformer", p): LoraModule(down=torch.randn(rank, n_in, generator=g), up=torch.randn(out, rank, generator=g),
                                       alpha=alpha)
        for p, (out, n_in) in shapes_.items() if not p.endswith(skip)
    }


def _delta(m):
    return m.scale * m.up @ m.down


@pytest.mark.parametrize("skip", [(), ("proj_mlp",)])
def test_fusion_round_trip_is_exact(skip, tmp_path):
    weights = _block_weights(skip=skip)
    path = save_kohya(tmp_path / "lora.safetensors", weights, META, FLUX)
    back, header = load_kohya(path)
    assert header["ss_base_model_version"] == "flux1" and header["ss_output_name"] == "test"
    assert set(back) == set(weights)
    for key, m in weights.items():
        assert torch.equal(back[key].down, m.down) and torch.equal(back[key].up, m.up), key
        assert back[key].alpha == m.alpha, key
    with safe_open(str(path), "pt") as f:
        up = f.get_tensor("lora_unet_single_blocks_3_linear1.lora_up.weight")
        down = f.get_tensor("lora_unet_single_blocks_3_linear1.lora_down.weight")
        alpha = f.get_tensor("lora_unet_single_blocks_3_linear1.alpha")
    assert up.shape == (7 * 8, 12) and down.shape == (12, 8) and float(alpha) == 20.0
    # the fused update is the members' updates stacked (the zero block adds nothing)
    fused = LoraModule(down=down, up=up, alpha=float(alpha))
    members = [weights.get(("transformer", f"single_transformer_blocks.3.{p}"))
               for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    stacked = torch.cat([_delta(m) if m is not None else torch.zeros(32, 8) for m in members])
    torch.testing.assert_close(_delta(fused), stacked)


def test_dense_fused_layers_read_as_the_same_update():
    """A layer trained fused (kohya on BFL's model: one down for q, k, v) splits into members sharing the down."""
    g = torch.Generator().manual_seed(1)
    fused = LoraModule(down=torch.randn(4, 8, generator=g), up=torch.randn(24, 4, generator=g), alpha=2.0)
    parts = flux_module_paths("lora_unet_double_blocks_2_txt_attn_qkv", fused)
    assert [p for p, _ in parts] == [f"transformer_blocks.2.attn.add_{x}_proj" for x in "qkv"]
    torch.testing.assert_close(torch.cat([_delta(m) for _, m in parts]), _delta(fused), rtol=0, atol=0)
    # written back: the same function at k x the rank
    again = flux_kohya_modules(dict(parts))["lora_unet_double_blocks_2_txt_attn_qkv"]
    assert again.rank == 12
    torch.testing.assert_close(_delta(again), _delta(fused))


def test_fusion_and_reading_refusals():
    weights = _block_weights()
    mixed = dict(weights)
    mixed[("transformer", "transformer_blocks.0.attn.to_k")] = LoraModule(
        down=torch.zeros(2, 8), up=torch.zeros(8, 2), alpha=5.0)
    with pytest.raises(ConjureError, match="one rank and alpha"):
        kohya_state_dict(mixed, FLUX)
    # a fused layer's DoRA is one decomposition of all its parts: not per part, not on some parts only
    qkv = [("transformer", f"transformer_blocks.0.attn.to_{x}") for x in "qkv"]
    for scales, group, drop in (([torch.ones(1, 8)], "g", None), ([torch.ones(1, 8) * (i + 1) for i in range(3)], "g", None),
                                ([torch.ones(1, 8)] * 3, None, None), ([torch.ones(1, 8)] * 3, "g", qkv[2])):
        dora = {k: LoraModule(m.down, m.up, m.alpha) for k, m in _block_weights().items() if k != drop}
        for key, scale in zip(qkv, scales):
            if key in dora:
                dora[key].dora_scale, dora[key].dora_group = scale, group
        with pytest.raises(ConjureError, match="one decomposition shared by all its parts"):
            kohya_state_dict(dora, FLUX)
    with pytest.raises(ConjureError, match="no kohya FLUX name"):
        kohya_state_dict({("transformer", "proj_out"): LoraModule(torch.zeros(1, 8), torch.zeros(4, 1), 1.0)}, FLUX)
    with pytest.raises(ConjureError, match="do not split"):
        flux_module_paths("lora_unet_single_blocks_0_linear1", LoraModule(torch.zeros(4, 8), torch.zeros(50, 4), 1.0))
    for name in ("lora_unet_final_layer_linear", "lora_unet_double_blocks_0_img_attn_norm"):
        with pytest.raises(ConjureError, match="not a FLUX.1 module conjure reads"):
            flux_module_paths(name, LoraModule(torch.zeros(4, 8), torch.zeros(4, 4), 1.0))


def test_dora_on_unfused_layers_is_written_as_input_column_scales(tmp_path):
    weights = {k: m for k, m in _block_weights().items() if k[1].endswith(("to_out.0", "ff.net.2", "proj_out"))}
    for m in weights.values():
        m.dora_scale = torch.rand(1, m.down.shape[1]) + 0.5
    path = save_kohya(tmp_path / "dora.safetensors", weights, META, FLUX)
    with safe_open(str(path), "pt") as f:
        assert tuple(f.get_slice("lora_unet_single_blocks_3_linear2.dora_scale").get_shape()) == (1, 40)
    back, _ = load_kohya(path)
    for key, m in weights.items():
        assert torch.equal(back[key].dora_scale, m.dora_scale)


# ---------------------------------------------------------------------------------------------------------------
# detection and conversion


def test_detect_and_convert_both_ways_exactly(tmp_path):
    weights = _block_weights(skip=("proj_mlp",))
    weights[("text_encoder", "encoder.layers.0.self_attn.q_proj")] = LoraModule(
        torch.randn(3, 8), torch.randn(8, 3), alpha=5.0)
    kohya = save_kohya(tmp_path / "k.safetensors", weights, META, FLUX)
    peft = save_peft(tmp_path / "p.safetensors", weights, META, FLUX)
    # without metadata too: the block names (kohya) and the `transformer.` prefix (PEFT) tell
    bare_k, bare_p = tmp_path / "bare_k.safetensors", tmp_path / "bare_p.safetensors"
    for src, dst in ((kohya, bare_k), (peft, bare_p)):
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(src)), str(dst))
    for path, fmt in ((kohya, "kohya"), (peft, "peft"), (bare_k, "kohya"), (bare_p, "peft")):
        assert detect_lora_format(path) == fmt and detect_lora_family(path) == "flux", path

    to_peft = convert_lora(kohya, tmp_path / "kp.safetensors", "peft")
    back = convert_lora(to_peft, tmp_path / "kpk.safetensors", "kohya")
    with safe_open(str(kohya), "pt") as a, safe_open(str(back), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    split, _ = load_peft(to_peft)
    direct, _ = load_peft(peft)
    assert set(split) == set(direct) == set(weights)
    for key in weights:
        assert torch.equal(split[key].down, weights[key].down.to(split[key].down.dtype))
        assert split[key].alpha == direct[key].alpha == weights[key].alpha
    # both layouts read back to the same modules with conjure's reader
    parsed, family = parse_kohya(_state(kohya), {}, None, None, "k")
    assert family == "flux" and set(parsed) == set(weights)


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("dense", [False, True])
def test_fused_dora_reads_as_what_apps_compute_on_the_fused_weight(dense, tmp_path):
    """ComfyUI's weight_decompose on BFL's fused linear1 (scale * W' / (||W'||_col + eps)) == conjure's reader on
    the split parts; a file conjure writes from a shared decomposition reads back bit for bit."""
    from conjure.export.convert import apply_lora
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    parts = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    base = torch.cat([transformer.get_submodule(p).weight.detach() for p in parts])  # BFL linear1: [7 x 32, 32]
    g = torch.Generator().manual_seed(3)
    if dense:  # trained fused, as kohya/LyCORIS do on BFL's model
        fused = LoraModule(torch.randn(4, 32, generator=g) * 0.1, torch.randn(224, 4, generator=g) * 0.1, 3.0)
    else:
        fused = flux_kohya_modules({p: LoraModule(torch.randn(2, 32, generator=g) * 0.1,
                                                  torch.randn(w, 2, generator=g) * 0.1, 3.0)
                                    for p, w in zip(parts, (32, 32, 32, 128))})["lora_unet_single_blocks_0_linear1"]
    fused.dora_scale = (base.norm(dim=0, keepdim=True) * (1 + 0.3 * torch.rand(1, 32, generator=g)))
    new = base + fused.scale * fused.up @ fused.down
    comfy = fused.dora_scale * new / (new.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)

    path = tmp_path / "dora.safetensors"
    from safetensors.torch import save_file

    name = "lora_unet_single_blocks_0_linear1"
    save_file({f"{name}.lora_down.weight": fused.down, f"{name}.lora_up.weight": fused.up,
               f"{name}.alpha": torch.tensor(fused.alpha), f"{name}.dora_scale": fused.dora_scale}, str(path))
    weights, _ = load_kohya(path, "flux")
    assert {p for _, p in weights} == set(parts)
    assert all(m.dora_group == "single_transformer_blocks.0.linear1" for m in weights.values())
    apply_lora({"transformer": transformer}, weights)
    got = torch.cat([transformer.get_submodule(p).weight.detach() for p in parts])
    torch.testing.assert_close(got, comfy, rtol=1e-5, atol=1e-6)
    again = kohya_state_dict(weights, FLUX)
    assert torch.equal(again[f"{name}.dora_scale"], fused.dora_scale)
    if not dense:
        assert torch.equal(again[f"{name}.lora_up.weight"], fused.up) and torch.equal(again[f"{name}.lora_down.weight"], fused.down)


def test_fused_parts_name_every_part_of_the_layers_a_dora_must_decompose_as_one(full_size):
    transformer, _ = full_size
    targets = denoiser_targets(FLUX, transformer, "attention")
    groups = kohya_fused_parts(FLUX, "transformer", targets)
    assert len(groups) == 19 * 2 + 38
    assert groups["transformer_blocks.4.txt_attn_qkv"] == tuple(f"transformer_blocks.4.attn.add_{x}_proj" for x in "qkv")
    # under `attention` the single block's proj_mlp is no target, but a part of linear1 all the same
    assert groups["single_transformer_blocks.0.linear1"][-1] == "single_transformer_blocks.0.proj_mlp"
    assert kohya_fused_parts("sdxl", "unet", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]) == {}
    assert kohya_fused_parts(FLUX, "text_encoder", ["encoder.layers.0.self_attn.q_proj"]) == {}


def test_shared_dora_layers_saved_as_kohya_reproduce_the_adapted_transformer(tmp_path):
    """InputColumnDora layers on every preset-`all` Linear, the fused ones decomposed together
    (share_decomposition over kohya_fused_parts): the kohya file, read back and merged as apps merge it, gives the
    adapted transformer's output."""
    import copy

    from conjure.adapters.dora import InputColumnDora, share_decomposition
    from conjure.export.convert import apply_lora

    torch.manual_seed(0)
    base = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()
    adapted = copy.deepcopy(base)
    targets = denoiser_targets(FLUX, adapted, "all")
    g = torch.Generator().manual_seed(5)
    for path in targets:
        parent, _, child = path.rpartition(".")
        layer = InputColumnDora(adapted.get_submodule(path), rank=2, alpha=3.0)
        with torch.no_grad():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.2)
        setattr(adapted.get_submodule(parent), child, layer)
    for group, parts in kohya_fused_parts(FLUX, "transformer", targets).items():
        share_decomposition([adapted.get_submodule(p) for p in parts], group)
    with torch.no_grad():
        for path in targets:
            adapted.get_submodule(path).dora_scale.mul_(1.1)  # a trained magnitude (shared ones grow more)
    weights = {}
    for path in targets:
        layer = adapted.get_submodule(path)
        weights[("transformer", path)] = LoraModule(
            layer.lora_down.weight.detach().clone(), layer.lora_up.weight.detach().clone(), layer.alpha,
            dora_scale=layer.dora_scale.detach().clone(), dora_group=layer.group)
    path = save_kohya(tmp_path / "dora.safetensors", weights, META, FLUX)
    with safe_open(str(path), "pt") as f:
        scales = [k for k in f.keys() if k.endswith(".dora_scale")]
    assert "lora_unet_single_blocks_1_linear1.dora_scale" in scales and len(scales) == 10 + 2 * 3  # one per named (fused or not) layer

    loaded, _ = load_kohya(path)
    apply_lora({"transformer": base}, loaded)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.6]),
        img_ids=torch.rand(16, 3, generator=g) * 4, txt_ids=torch.zeros(5, 3), guidance=None)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).sample, adapted(**inputs).sample, rtol=1e-4, atol=1e-5)


def test_other_tools_embedder_layers_read_as_diffusers_reads_them_and_are_never_written():
    g = torch.Generator().manual_seed(2)
    names = ["lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer",
             "lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer", "lora_unet_guidance_in_in_layer",
             "lora_unet_guidance_in_out_layer"]
    state = {}
    for name in names:
        state.update({f"{name}.lora_down.weight": torch.randn(2, 8, generator=g),
                      f"{name}.lora_up.weight": torch.randn(8, 2, generator=g), f"{name}.alpha": torch.tensor(2.0)})
    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    expected = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in converted if "lora_A" in k}
    ours = {path: m for name in names for path, m in flux_module_paths(name, LoraModule(
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], 2.0))}
    assert set(ours) == expected
    with pytest.raises(ConjureError, match="InvokeAI reads block modules only"):
        kohya_state_dict({("transformer", "x_embedder"): ours["x_embedder"]}, FLUX)
