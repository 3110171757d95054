"""advanced.base_weights_dtype: float8 quantises the FLUX.1 transformer as it streams in, a block at a time: the
same float8 bytes and scales as torchao's quantize_ on the whole bf16 model, from a diffusers folder (one file or
shards) and from a single file in BFL's layout, with no more than one block's bf16 tensors alive at once."""

import inspect
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

pytest.importorskip("torchao")

from conjure.config.sections import AdvancedConfig  # noqa: E402
from conjure.errors import ConjureError  # noqa: E402
from conjure.models import transformer_stream as stream  # noqa: E402
from conjure.models.loading import load_base_model  # noqa: E402
from conjure.models.quantize import quantize_frozen  # noqa: E402
from conjure.models.tiny import write_tiny_model  # noqa: E402

FLOAT8 = AdvancedConfig(base_weights_dtype="float8", mixed_precision="bf16", cpu=True)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return write_tiny_model("flux", tmp_path_factory.mktemp("tiny-flux") / "dev", variant="dev")


@pytest.fixture(scope="module")
def expected(dev):
    """torchao's quantize_ on the whole bf16 transformer (what place_model does to a model loaded whole)."""
    model = FluxTransformer2DModel.from_pretrained(dev, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert quantize_frozen(model.requires_grad_(False), "float8", torch.device("cpu")) == 50
    return model


def _load(source, **kwargs):
    model = load_base_model(str(source), advanced=FLOAT8, frozen_dtype=torch.bfloat16, defer_denoiser=True,
                            **kwargs)
    assert model.denoiser.device.type == "meta"
    model.load_pending()
    return model.denoiser


def _assert_same(got, expected):
    """Every Linear weight the same float8 bytes and scales; every other tensor the same bf16 values."""
    want = dict(expected.named_parameters())
    assert set(dict(got.named_parameters())) == set(want)
    converted = 0
    for name, param in got.named_parameters():
        if type(param).__name__ == "Float8Tensor":
            assert type(want[name]).__name__ == "Float8Tensor", name
            assert torch.equal(param.qdata.view(torch.uint8), want[name].qdata.view(torch.uint8)), name
            assert torch.equal(param.scale, want[name].scale), name
            converted += 1
        else:
            assert param.dtype == torch.bfloat16 and torch.equal(param, want[name]), name
    assert converted == 50


class _Watch:
    """Wraps a reader: at each read, no Linear weight of the model is still plain bf16 (every block read before
    was converted), and what one read returns is one group's tensors."""

    def __init__(self, model_of):
        self.model_of, self.sizes = model_of, []

    def __call__(self, read):
        def watched(names):
            model = self.model_of()
            plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     and type(m.weight) is torch.nn.Parameter and not m.weight.is_meta]
            assert not plain, plain
            out = read(names)
            self.sizes.append(sum(t.numel() * t.element_size() for t in out.values()))
            return out

        return watched


def _watched(monkeypatch):
    """Watch the reader stream_into is given."""
    seen = {}
    watch = _Watch(lambda: seen["model"])
    into = stream.stream_into

    def spy(model, keys, read, *args):
        seen["model"] = model
        return into(model, keys, watch(read), *args)

    monkeypatch.setattr(stream, "stream_into", spy)
    return watch


def test_a_folder_streams_to_the_same_float8_a_block_at_a_time(dev, expected, monkeypatch):
    watch = _watched(monkeypatch)
    _assert_same(_load(dev), expected)
    double_block = sum(p.numel() * 2 for p in expected.transformer_blocks[0].parameters())  # in bf16
    # 2 double blocks, 2 single blocks, the rest: each read one group's bf16 tensors (a double block the largest)
    assert len(watch.sizes) == 5 and max(watch.sizes) == double_block


def _sharded(dev, folder):
    """A copy of the tiny model at `folder` whose transformer is two shards and their index, as FLUX.1-dev's."""
    import shutil

    shutil.copytree(dev, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = FluxTransformer2DModel.from_pretrained(dev, subfolder="transformer").state_dict()
    weights.unlink()
    names = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(weights.parent / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_folder_streams_from_its_index(dev, expected, tmp_path):
    _assert_same(_load(_sharded(dev, tmp_path / "sharded")), expected)


def test_a_cached_hub_id_streams_from_its_snapshot(dev, expected, tmp_path, monkeypatch):
    """A hub id in the Hugging Face cache (laid out as huggingface_hub lays it out, offline): its transformer's
    index and shards are found there and streamed as the folder's."""
    from pathlib import Path

    from huggingface_hub import constants

    from conjure.models.single_file import CheckpointTensors

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--conjure-test--tiny-flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _sharded(dev, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at each call, not at import
    read = []
    original = CheckpointTensors.read
    monkeypatch.setattr(CheckpointTensors, "read", lambda self, *a, **kw: read.append(self) or original(self, *a, **kw))
    _assert_same(_load("conjure-test/tiny-flux"), expected)
    assert {Path(t.path).name for t in read} == {"diffusion_pytorch_model-00001-of-00002.safetensors",
                                                 "diffusion_pytorch_model-00002-of-00002.safetensors"}
    assert all(Path(t.path).is_relative_to(repo / "snapshots" / commit / "transformer") for t in read)


def test_a_diffusers_named_file_under_comfy_prefix_streams(dev, expected, tmp_path):
    state = FluxTransformer2DModel.from_pretrained(dev, subfolder="transformer").state_dict()
    path = tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in state.items()}, str(path))
    _assert_same(_load(path, base_model_config=str(dev)), expected)


def _tiny_converter(monkeypatch, width):
    """diffusers' own BFL converter with its one FLUX.1-sized constant (`inner_dim = 3072`) set to the tiny width:
    the converter assumes FLUX.1's widths, so a tiny BFL file cannot be converted otherwise."""
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1
    scope = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), scope)  # noqa: S102
    monkeypatch.setattr(single_file_utils, "convert_flux_transformer_checkpoint_to_diffusers",
                        scope["convert_flux_transformer_checkpoint_to_diffusers"])
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def _bfl(state, config):
    """The tiny transformer's weights under BFL's names (flux1-dev.safetensors' layout): the inverse of diffusers'
    converter, whose output the test checks against this transformer."""
    out = {}

    def both(src, dst):
        out[dst + ".weight"], out[dst + ".bias"] = state[src + ".weight"], state[src + ".bias"]

    def swap(weight):  # diffusers' AdaLayerNormContinuous is scale, shift; BFL's shift, scale
        scale, shift = weight.chunk(2)
        return torch.cat([shift, scale])

    for i in range(config["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for side, attn, norm, ff in (("img", "attn.to_", "norm1", "ff"), ("txt", "attn.add_", "norm1_context",
                                                                            "ff_context")):
            qkv = ["q", "k", "v"] if side == "img" else ["q_proj", "k_proj", "v_proj"]
            for part in ("weight", "bias"):
                out[f"{b}{side}_attn.qkv.{part}"] = torch.cat([state[f"{d}{attn}{x}.{part}"] for x in qkv])
            both(f"{d}{norm}.linear", f"{b}{side}_mod.lin")
            both(f"{d}attn.to_out.0" if side == "img" else f"{d}attn.to_add_out", f"{b}{side}_attn.proj")
            both(f"{d}{ff}.net.0.proj", f"{b}{side}_mlp.0")
            both(f"{d}{ff}.net.2", f"{b}{side}_mlp.2")
            q, k = ("norm_q", "norm_k") if side == "img" else ("norm_added_q", "norm_added_k")
            out[f"{b}{side}_attn.norm.query_norm.scale"] = state[f"{d}attn.{q}.weight"]
            out[f"{b}{side}_attn.norm.key_norm.scale"] = state[f"{d}attn.{k}.weight"]
    for i in range(config["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{b}linear1.{part}"] = torch.cat([state[f"{d}attn.to_{x}.{part}"] for x in "qkv"]
                                                  + [state[f"{d}proj_mlp.{part}"]])
        both(f"{d}proj_out", f"{b}linear2")
        both(f"{d}norm.linear", f"{b}modulation.lin")
        out[f"{b}norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]
    for src, dst in (("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                     ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                     ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                     ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                     ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                     ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                     ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear")):
        both(src, dst)
    out["final_layer.adaLN_modulation.1.weight"] = swap(state["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = swap(state["norm_out.linear.bias"])
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_bfl_file_streams_through_diffusers_converter_a_block_at_a_time(dev, expected, tmp_path, monkeypatch,
                                                                          prefix):
    plain = FluxTransformer2DModel.from_pretrained(dev, subfolder="transformer")
    config = dict(plain.config)
    convert = _tiny_converter(monkeypatch, config["num_attention_heads"] * config["attention_head_dim"])
    bfl = _bfl(plain.state_dict(), config)
    # the inverse is right: diffusers' converter on the whole file gives the transformer back
    assert set(convert(dict(bfl))) == set(plain.state_dict())
    path = tmp_path / "flux1-dev.safetensors"
    save_file({prefix + k: v for k, v in bfl.items()}, str(path))
    watch = _watched(monkeypatch)
    _assert_same(_load(path, base_model_config=str(dev)), expected)
    assert len(watch.sizes) == 5  # double_blocks.0/1, single_blocks.0/1, the rest


def test_a_truncated_file_is_one_line(dev, tmp_path):
    state = FluxTransformer2DModel.from_pretrained(dev, subfolder="transformer").state_dict()
    path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConjureError, match=r"^cannot load checkpoint .*flux.safetensors'?: the file ends inside"):
        _load(path, base_model_config=str(dev))


def test_a_file_missing_a_block_is_one_line(dev, tmp_path):
    state = FluxTransformer2DModel.from_pretrained(dev, subfolder="transformer").state_dict()
    path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("single_transformer_blocks.1.")},
              str(path))
    with pytest.raises(ConjureError, match=r"it has no weights for the transformer's 'single_transformer_blocks\.1\."):
        _load(path, base_model_config=str(dev))


def test_a_folder_without_safetensors_loads_whole_and_place_model_converts_it(dev, expected, tmp_path):
    import shutil

    from conjure.train.setup import place_model

    folder = tmp_path / "bin"
    shutil.copytree(dev, folder)
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    transformer.save_pretrained(folder / "transformer", safe_serialization=False)
    model = load_base_model(str(folder), advanced=FLOAT8, frozen_dtype=torch.bfloat16, defer_denoiser=True)
    model.load_pending()
    assert type(model.denoiser.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter  # read whole, in bf16
    place_model(model, torch.device("cpu"), "bf16", "float8")
    _assert_same(model.denoiser, expected)
