"""LoRA/DoRA files: kohya and diffusers/PEFT files load completely in diffusers and give what conjure's own reader
(apply_lora, the ComfyUI/A1111 formula) gives; kohya DoRA layout and orientation; exact round trips and conversion.

Models: tiny SD1/SDXL with the real UNet block layout (2 layers per block), every Linear/Conv2d adapted (attention
q/k/v/out, feed-forward, proj_in/out, resnet convs and time projections, samplers, conv_in/out, time/add
embeddings; text-encoder q/k/v/out_proj, mlp fc1/fc2, SDXL's text_projection).
"""

import copy
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from conjure.adapters import LoraModule
from conjure.errors import ConjureError
from conjure.export.convert import ConvertOptions, apply_lora, convert, convert_lora, detect_lora_format
from conjure.export.kohya import load_kohya, save_kohya
from conjure.export.kohya_names import resolve_module_path
from conjure.export.lora import detect_lora_family
from conjure.export.peft import load_peft, save_peft
from conjure.models.tiny import build_tiny_components

FAMILIES = ["sd1", "sdxl"]
ENCODERS = ("text_encoder", "text_encoder_2")
META = {"ss_output_name": "test", "modelspec.title": "test", "conjure.trigger_words": "zq"}


@pytest.fixture(scope="module")
def base():
    """family -> a fresh copy of the tiny real-layout components (built once per module)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny_components(family, real_layout=True)
        return {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in cache[family].items()}

    return get


def adaptable(components):
    for component in ("unet",) + ENCODERS:
        if component in components:
            for path, module in components[component].named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    yield component, path, module


def random_weights(components, *, seed=0, alphas="uniform", dora=None):
    """Every adaptable module: ranks 2-4, non-zero up; alpha 3.0 everywhere ('uniform', != rank for most
    modules) or 1-4 varying per module ('varied'); dora None, 'magnitude' (PEFT) or 'scale' (kohya)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, (component, path, module) in enumerate(adaptable(components)):
        rank = 2 + i % 3
        w = module.weight
        if w.dim() == 4:
            down, up = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        m = LoraModule(down=down * 0.1, up=up * 0.1, alpha=3.0 if alphas == "uniform" else float(1 + i % 4))
        if dora == "magnitude":
            m.magnitude = torch.rand(w.shape[0], generator=g) + 0.5
        elif dora == "scale":
            m.dora_scale = (torch.rand(w.shape[1], generator=g) + 0.5).reshape((1, w.shape[1]) + (1,) * (w.dim() - 2))
        weights[(component, path)] = m
    assert any(m.alpha != m.rank for m in weights.values()) and any(m.rank == 4 for m in weights.values())
    return weights


def assert_outputs_close(got, expected, base_out=None):
    for key, value in expected.items():
        scale = value.abs().max().item()
        torch.testing.assert_close(got[key], value, atol=1e-5 * max(scale, 1.0), rtol=1e-5, msg=key)
        if base_out is not None and key in ("unet", "text_encoder"):
            assert (value - base_out[key]).abs().max() > 1e-2, f"the LoRA must change {key}"


@contextmanager
def library_warnings():
    """Everything diffusers/transformers/peft log at WARNING or above, and every Python warning."""
    messages = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                messages.append(f"{record.name}: {record.getMessage()}")

    handler = Handler()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"warning: {w.message}" for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def load_in_diffusers(family, components, path, weights):
    """Load `path` with the pipeline's load_lora_weights; assert no warning and an adapter on every file module
    (a file without text-encoder modules gets diffusers' note that it has none, and only that)."""
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    with library_warnings() as messages:
        pipe.load_lora_weights(str(path))
    if not any(c in ENCODERS for c, _ in weights):
        messages = [m for m in messages if "No LoRA keys associated to CLIPTextModel" not in m]
    assert messages == []
    for component in ("unet",) + ENCODERS:
        if component not in components:
            continue
        model = getattr(pipe, component)
        adapted = {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        wanted = {resolve_module_path(p, model) for c, p in weights if c == component}
        assert adapted == wanted, component
    return pipe


@pytest.fixture
def applied(base, outputs):
    """`applied(family, weights)`: the outputs of a fresh base model with `weights` applied by conjure's reader."""

    def run(family, weights, multiplier=1.0):
        fresh = base(family)
        assert apply_lora(fresh, weights, multiplier) == len(weights)
        return outputs(fresh, family)

    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_loads_completely_in_diffusers_and_matches_conjures_reader(base, outputs, applied, family,
                                                                              tmp_path):
    components = base(family)
    weights = random_weights(components, alphas="uniform")
    path = save_kohya(tmp_path / "lora.safetensors", weights, META, family, components["unet"].config)
    base_out = outputs(components, family)
    pipe = load_in_diffusers(family, components, path, weights)
    assert_outputs_close(outputs(pipe.components, family), applied(family, weights), base_out)


@pytest.mark.parametrize("dora", [None, "magnitude"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_file_loads_completely_in_diffusers_and_matches_conjures_reader(base, outputs, applied, family, dora,
                                                                            tmp_path):
    components = base(family)
    weights = random_weights(components, alphas="varied", dora=dora)  # per-module ranks and alphas
    path = save_peft(tmp_path / "lora.safetensors", weights, META, family)
    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert any(k.endswith("lora_magnitude_vector") for k in keys) == (dora is not None)
    assert {k: header[k] for k in META} == META and "lora_adapter_metadata" in header
    base_out = outputs(components, family)
    pipe = load_in_diffusers(family, components, path, weights)
    assert_outputs_close(outputs(pipe.components, family), applied(family, weights), base_out)

    loaded, meta = load_peft(path)
    assert set(loaded) == set(weights) and "lora_adapter_metadata" not in meta
    for key, m in weights.items():
        assert torch.equal(loaded[key].down, m.down) and torch.equal(loaded[key].up, m.up)
        assert loaded[key].alpha == m.alpha
        if dora:
            assert torch.equal(loaded[key].magnitude, m.magnitude)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_round_trip_keeps_every_tensor_and_alpha(base, family, applied, tmp_path):
    components = base(family)
    weights = random_weights(components, alphas="varied")
    path = save_kohya(tmp_path / "lora.safetensors", weights, META, family, components["unet"].config)
    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
        tensors = [f.get_tensor(k) for k in keys]
    assert len(keys) == 3 * len(weights) and len(alphas) == len(weights)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors)
    assert all(a.shape == () for a in alphas.values())
    assert sorted({a.item() for a in alphas.values()}) == [1.0, 2.0, 3.0, 4.0]  # the alphas, not the ranks
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert {k: header[k] for k in META} == META
    assert header["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    if family == "sdxl":
        assert header["conjure.unet_layers_per_block"] == "2" and not any("down_blocks" in k for k in keys)

    loaded, meta = load_kohya(path)
    assert meta == header and set(loaded) == set(weights)
    for key, m in weights.items():
        got = loaded[key]
        assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up) and got.alpha == m.alpha
        assert got.dora_scale is None and got.magnitude is None
    assert_outputs_close(applied(family, loaded), applied(family, weights))
    assert detect_lora_format(path) == "kohya" and detect_lora_family(path) == family


def test_kohya_alpha_is_the_configured_alpha_and_reload_reproduces_the_output(base, applied, tmp_path):
    components = base("sd1")
    path_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w = components["unet"].get_submodule(path_q).weight
    g = torch.Generator().manual_seed(3)
    weights = {("unet", path_q): LoraModule(torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g), alpha=1.5)}
    path = save_kohya(tmp_path / "a.safetensors", weights, {}, "sd1")
    with safe_open(str(path), "pt") as f:
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha")
    assert alpha.dtype == torch.float32 and alpha.item() == 1.5
    loaded, _ = load_kohya(path)
    assert loaded[("unet", path_q)].scale == 1.5 / 4
    expected = w.detach() + (1.5 / 4) * weights[("unet", path_q)].up @ weights[("unet", path_q)].down
    apply_lora(components, loaded)
    torch.testing.assert_close(components["unet"].get_submodule(path_q).weight.detach(), expected)
    assert_outputs_close(applied("sd1", loaded), applied("sd1", weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(base, tmp_path, dtype):
    components = base("sd1")
    weights = random_weights(components)
    path = save_kohya(tmp_path / "h.safetensors", weights, {}, "sd1", dtype=dtype)
    loaded, _ = load_kohya(path)
    for key, m in weights.items():
        assert loaded[key].down.dtype == dtype and torch.equal(loaded[key].down, m.down.to(dtype))
        assert loaded[key].alpha == m.alpha
    with safe_open(str(path), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys() if k.endswith(".alpha"))
    path = save_peft(tmp_path / "p.safetensors", weights, {}, "sd1", dtype="fp16")
    assert all(m.down.dtype == torch.float16 for m in load_peft(path)[0].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_dora_layout_orientation_and_round_trip(base, family, applied, tmp_path):
    components = base(family)
    weights = random_weights(components, dora="scale")
    path = save_kohya(tmp_path / "dora.safetensors", weights, META, family, components["unet"].config)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for key in keys:
            if key.endswith(".dora_scale"):
                name = key.removesuffix(".dora_scale")
                scale, down, up = (f.get_tensor(f"{name}.{p}") for p in ("dora_scale", "lora_down.weight", "lora_up.weight"))
                n_in = down.shape[1]
                assert scale.shape == ((1, n_in, 1, 1) if down.dim() == 4 else (1, n_in)), key  # input column
                assert up.shape[-2:] == (1, 1) or up.dim() == 2
    assert sum(k.endswith(".dora_scale") for k in keys) == len(weights) and len(keys) == 4 * len(weights)

    loaded, _ = load_kohya(path)
    for key, m in weights.items():
        assert torch.equal(loaded[key].dora_scale, m.dora_scale) and torch.equal(loaded[key].down, m.down)
    assert_outputs_close(applied(family, loaded), applied(family, weights))


def test_untrained_dora_leaves_the_lora_weight_and_a_hand_example():
    # dora_scale = the input-column norms of W' = W + scale * up @ down: the DoRA weight is W' itself
    torch.manual_seed(0)
    for layer in (torch.nn.Linear(6, 5), torch.nn.Conv2d(6, 5, 3)):
        w = layer.weight.detach().clone()
        rank = 2
        conv = w.dim() == 4
        down = torch.randn(rank, 6, *w.shape[2:]) if conv else torch.randn(rank, 6)
        up = torch.randn(5, rank, 1, 1) if conv else torch.randn(5, rank)
        w_lora = w + (3.0 / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        column_norms = torch.linalg.vector_norm(w_lora, dim=[d for d in range(w.dim()) if d != 1], keepdim=True)
        assert column_norms.shape == ((1, 6, 1, 1) if conv else (1, 6))
        m = LoraModule(down=down, up=up, alpha=3.0, dora_scale=column_norms)
        apply_lora({"unet": torch.nn.ModuleDict({"layer": layer})}, {("unet", "layer"): m})
        torch.testing.assert_close(layer.weight.detach(), w_lora, atol=1e-5, rtol=1e-5)

    # W = [[1, 0], [0, 2]], up @ down = [[1, 1], [0, 0]], alpha/rank = 1 -> W' = [[2, 1], [0, 2]];
    # column norms 2 and sqrt(5); dora_scale [3, 5] -> W'' = [[3, sqrt(5)], [0, 2 sqrt(5)]]
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    m = LoraModule(down=torch.tensor([[1.0, 1.0]]), up=torch.tensor([[1.0], [0.0]]), alpha=1.0,
                   dora_scale=torch.tensor([[3.0, 5.0]]))
    apply_lora({"unet": torch.nn.ModuleDict({"l": layer})}, {("unet", "l"): m})
    s5 = 5**0.5
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[3.0, s5], [0.0, 2 * s5]]))

    # multiplier scales the whole change: W + 0.5 * (W'' - W)
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    apply_lora({"unet": torch.nn.ModuleDict({"l": layer})}, {("unet", "l"): m}, multiplier=0.5)
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[2.0, s5 / 2], [0.0, 1 + s5]]))


def test_writers_refuse_what_apps_would_misread(base, tmp_path):
    components = base("sd1")
    weights = random_weights(components)
    key = next(iter(weights))
    with pytest.raises(ConjureError, match="magnitude"):
        save_kohya(tmp_path / "x.safetensors", {**weights, key: LoraModule(**{**vars(weights[key]), "magnitude": torch.ones(weights[key].up.shape[0])})}, {}, "sd1")
    scale_key = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    m = weights[scale_key]
    with pytest.raises(ConjureError, match="dora_scale"):
        save_peft(tmp_path / "x.safetensors", {scale_key: LoraModule(m.down, m.up, m.alpha, dora_scale=torch.ones(1, m.down.shape[1]))}, {}, "sd1")
    with pytest.raises(ConjureError, match="input-column"):  # [out, 1] is the output-row layout A1111 misreads
        save_kohya(tmp_path / "x.safetensors", {scale_key: LoraModule(m.down, m.up, m.alpha, dora_scale=torch.ones(m.up.shape[0], 1) * 2)}, {}, "sd1")
    with pytest.raises(ConjureError, match="strings"):
        save_kohya(tmp_path / "x.safetensors", weights, {"ss_network_dim": 4}, "sd1")
    with pytest.raises(ConjureError, match="use_dora"):
        mixed = dict(weights)
        mixed[key] = LoraModule(**{**vars(weights[key]), "magnitude": torch.ones(weights[key].up.shape[0])})
        save_peft(tmp_path / "x.safetensors", mixed, {}, "sd1")
    with pytest.raises(ConjureError, match="no component|no text_encoder_2"):
        save_kohya(tmp_path / "x.safetensors", {("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"): m}, {}, "sd1")
    with pytest.raises(ConjureError, match="no LoRA modules"):
        save_kohya(tmp_path / "x.safetensors", {}, {}, "sd1")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_kohya_to_peft_and_back_is_exact(base, family, outputs, applied, tmp_path):
    components = base(family)
    weights = random_weights(components, alphas="varied")
    kohya = save_kohya(tmp_path / "k.safetensors", weights, META, family, components["unet"].config, dtype=torch.float16)
    peft = convert_lora(kohya, tmp_path / "p.safetensors", "peft")
    back = convert_lora(peft, tmp_path / "k2.safetensors", "kohya")
    assert detect_lora_format(peft) == "peft" and detect_lora_format(back) == "kohya"
    with safe_open(str(kohya), "pt") as a, safe_open(str(back), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), key
    # the PEFT file is the same LoRA in diffusers (per-module alphas included)
    expected = applied(family, load_kohya(kohya)[0])
    pipe = load_in_diffusers(family, base(family), peft, weights)
    assert_outputs_close(outputs(pipe.components, family), expected)


def test_convert_keeps_foreign_alpha_dtypes_and_metadata(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}.lora_down.weight": torch.randn(4, 768, generator=g).half(),
        f"{name}.lora_up.weight": torch.randn(320, 4, generator=g).half(),
        f"{name}.alpha": torch.tensor(0.7, dtype=torch.float16),
    }
    src = tmp_path / "foreign.safetensors"
    save_file(tensors, str(src), metadata={"ss_network_dim": "4"})  # no family in the metadata: 768 wide -> sd1
    assert detect_lora_family(src) == "sd1"
    back = convert_lora(convert_lora(src, tmp_path / "p.safetensors", "peft"), tmp_path / "k.safetensors", "kohya")
    with safe_open(str(back), "pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}
        for key, value in tensors.items():
            assert f.get_tensor(key).dtype == value.dtype and torch.equal(f.get_tensor(key), value)


def test_convert_refuses_dora_same_format_and_other_files(base, tmp_path):
    components = base("sd1")
    kohya_dora = save_kohya(tmp_path / "kd.safetensors", random_weights(components, dora="scale"), {}, "sd1")
    peft_dora = save_peft(tmp_path / "pd.safetensors", random_weights(components, dora="magnitude"), {}, "sd1")
    for src in (kohya_dora, peft_dora):
        with pytest.raises(ConjureError, match="DoRA files cannot change format"):
            convert_lora(src, tmp_path / "out.safetensors", "peft" if src == kohya_dora else "kohya")
    plain = save_kohya(tmp_path / "k.safetensors", random_weights(components), {}, "sd1")
    with pytest.raises(ConjureError, match="already a kohya"):
        convert_lora(plain, tmp_path / "out.safetensors", "kohya")
    with pytest.raises(ConjureError, match="unknown LoRA format"):
        convert_lora(plain, tmp_path / "out.safetensors", "lycoris")
    embedding = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(embedding))
    with pytest.raises(ConjureError, match="neither a kohya LoRA"):
        convert_lora(embedding, tmp_path / "out.safetensors", "peft")
    with pytest.raises(ConjureError, match="no such file"):
        detect_lora_format(tmp_path / "missing.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_converting_a_peft_file_of_unknown_family_needs_the_family(base, tmp_path):
    components = base("sdxl")
    unet_only = {k: v for k, v in random_weights(components).items() if k[0] == "unet" and "add_embedding" not in k[1]}
    peft = tmp_path / "p.safetensors"
    save_peft(peft, unet_only, {}, "sdxl")
    # strip our metadata to make it a foreign file
    with safe_open(str(peft), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = {"lora_adapter_metadata": f.metadata()["lora_adapter_metadata"]}
    save_file(tensors, str(peft), metadata=header)
    with pytest.raises(ConjureError, match="--family"):
        convert_lora(peft, tmp_path / "k.safetensors", "kohya")
    out = convert_lora(peft, tmp_path / "k.safetensors", "kohya", family="sdxl")
    weights, _ = load_kohya(out, family="sdxl")
    assert set(weights) == set(unet_only)
    with safe_open(str(out), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())


@pytest.mark.parametrize("to", ["kohya", "peft"])
def test_resized_files_load_completely_in_diffusers(base, outputs, applied, tmp_path, to):
    """`conjure convert --resize-rank`: the file holds every module at rank <= R (the lower ones as they were) and
    loads completely in diffusers, as conjure's reader applies it."""
    components = base("sd1")
    weights = random_weights(components, alphas="uniform")  # ranks 2-4, one alpha (diffusers' kohya reader)
    src = save_kohya(tmp_path / "k.safetensors", weights, META, "sd1")
    done = convert(src, tmp_path / "r.safetensors", ConvertOptions(to=to, resize_rank=3))
    assert {r.copied for r in done.resized} == {True, False}
    resized = (load_kohya if to == "kohya" else load_peft)(done.path)[0]
    assert set(resized) == set(weights) and max(m.rank for m in resized.values()) == 3
    pipe = load_in_diffusers("sd1", components, done.path, resized)
    assert_outputs_close(outputs(pipe.components, "sd1"), applied("sd1", resized))


# --- Files conjure's tools write load back in diffusers as conjure's reader applies them: `conjure lora combine`,
# `conjure convert` from other trainers' layouts and with --dtype, --split-bundle's LoRA and embeddings.


def test_a_combined_file_loads_completely_in_diffusers(base, outputs, tmp_path):
    """SDXL: LDM names, two text encoders; rank concatenation with per-module alphas folded to one."""
    from conjure.tools.combine import combine
    from conjure.tools.lora_inputs import LoraInput

    family = "sdxl"
    components = base(family)
    a, b = random_weights(components, seed=0), random_weights(components, seed=1, alphas="varied")
    for name, weights in (("a", a), ("b", b)):
        save_kohya(tmp_path / f"{name}.safetensors", weights, META, family, components["unet"].config)
    done = combine([LoraInput(tmp_path / "a.safetensors", 0.7), LoraInput(tmp_path / "b.safetensors", -1.5)],
                   tmp_path / "ab.safetensors", save_dtype="fp32")
    in_turn = base(family)
    apply_lora(in_turn, a, 0.7)
    apply_lora(in_turn, b, -1.5)
    pipe = load_in_diffusers(family, components, done.path, load_kohya(done.path)[0])
    assert_outputs_close(outputs(pipe.components, family), outputs(in_turn, family), outputs(base(family), family))


def foreign_file(path, weights, spelling):
    """`weights` (UNet modules) as SimpleTuner's LyCORIS names (`lycoris_` + the diffusers path, `.` -> `_`, with
    alphas) or ai-toolkit's unprefixed PEFT names (no alphas: alpha = rank)."""
    tensors = {}
    for (_, module_path), m in weights.items():
        if spelling == "lycoris":
            name = "lycoris_" + module_path.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up,
                            f"{name}.alpha": torch.tensor(m.alpha)})
        else:
            tensors.update({f"{module_path}.lora_A.weight": m.down, f"{module_path}.lora_B.weight": m.up})
    save_file(tensors, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    return path


@pytest.mark.parametrize("spelling", ["lycoris", "bare"])
def test_another_trainers_file_converted_to_kohya_loads_completely_in_diffusers(base, outputs, applied, spelling,
                                                                               tmp_path):
    components = base("sdxl")
    # unprefixed names need a dot to be told from other keys (inspection/keys.py resolve): conv_in/conv_out left out
    weights = {k: m for k, m in random_weights(components).items() if k[0] == "unet" and "." in k[1]}
    if spelling == "bare":
        weights = {k: LoraModule(m.down, m.up, float(m.rank)) for k, m in weights.items()}
    src = foreign_file(tmp_path / "foreign.safetensors", weights, spelling)
    done = convert(src, tmp_path / "k.safetensors", ConvertOptions())
    assert detect_lora_format(done.path) == "kohya"
    pipe = load_in_diffusers("sdxl", components, done.path, weights)
    assert_outputs_close(outputs(pipe.components, "sdxl"), applied("sdxl", weights))


def test_a_dtype_converted_file_loads_completely_in_diffusers(base, outputs, applied, tmp_path):
    """fp16, the dtype files are shared in (bf16 takes the same path: convert._recast)."""
    dtype = "fp16"
    components = base("sdxl")
    weights = random_weights(components)
    src = save_kohya(tmp_path / "k.safetensors", weights, META, "sdxl", components["unet"].config)
    done = convert(src, tmp_path / "h.safetensors", ConvertOptions(dtype=dtype))
    cast = load_kohya(done.path)[0]
    assert {m.down.dtype for m in cast.values()} == {torch.float16}
    pipe = load_in_diffusers("sdxl", components, done.path, weights)
    assert_outputs_close(outputs(pipe.components, "sdxl"), applied("sdxl", cast))


@pytest.mark.parametrize("family", FAMILIES)
def test_split_bundle_files_load_in_diffusers(base, outputs, applied, family, tmp_path):
    """A LoRA bundling an embedding (refused whole by diffusers: "Invalid LoRA checkpoint") splits into a LoRA and
    an embedding file that diffusers loads: the LoRA completely, the embedding's vectors as the token's (SDXL's
    file one encoder at a time, as diffusers takes it)."""
    from conjure.export.embeddings import bundle_tensors, load_embedding

    components = base(family)
    weights = random_weights(components)
    g = torch.Generator().manual_seed(3)
    encoders = [e for e in ENCODERS if e in components]
    keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"} if family == "sdxl" else {"text_encoder": "emb_params"}
    vectors = {keys[e]: torch.randn(2, components[e].config.hidden_size, generator=g) for e in encoders}
    bundled = save_kohya(tmp_path / "b.safetensors", weights, META, family, components["unet"].config,
                         bundle=bundle_tensors("zq-style", vectors))
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        load_in_diffusers(family, base(family), bundled, weights)
    (tmp_path / "out").mkdir()
    done = convert(bundled, tmp_path / "out" / "l.safetensors", ConvertOptions(split_bundle=True))
    pipe = load_in_diffusers(family, components, done.path, weights)
    assert_outputs_close(outputs(pipe.components, family), applied(family, weights))
    embedding, _ = load_embedding(tmp_path / "out" / "zq-style.safetensors")
    for encoder in encoders:
        tokenizer = pipe.tokenizer if encoder == "text_encoder" else pipe.tokenizer_2
        source = str(tmp_path / "out" / "zq-style.safetensors") if family == "sd1" else embedding[keys[encoder]]
        pipe.load_textual_inversion(source, token="zq-style", text_encoder=getattr(pipe, encoder), tokenizer=tokenizer)
        ids = tokenizer.convert_tokens_to_ids(["zq-style", "zq-style_1"])
        table = getattr(pipe, encoder).get_input_embeddings().weight
        torch.testing.assert_close(table[ids], vectors[keys[encoder]], rtol=0, atol=0)
