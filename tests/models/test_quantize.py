"""advanced.base_weights_dtype: refusals where it cannot work, and which layers float8/nf4 convert (the libraries
and the GPU are stood in for where this machine has none; the real torchao path runs where torchao is installed)."""

import importlib.util
import re
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from conjure.errors import ConjureError
from conjure.models import quantize
from conjure.models.loading import LoadedModel
from conjure.models.quantize import check_base_weights_dtype, linear_layers, quantize_frozen
from conjure.models.tiny import build_tiny_components
from conjure.train.setup import place_model


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_components("flux")["transformer"]


def _fresh(transformer):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_config(transformer.config)
    model.load_state_dict(transformer.state_dict())
    return model.requires_grad_(False).to(torch.bfloat16)


def test_auto_is_never_refused():
    check_base_weights_dtype("auto", cpu=True)


def test_nf4_is_refused_without_a_cuda_gpu(monkeypatch):
    with pytest.raises(ConjureError, match=r"^advanced.base_weights_dtype: nf4 stores the frozen transformer to save a "
                                           r"CUDA GPU's memory, and advanced.cpu is set; set it to float8 \(which runs "
                                           r"on the CPU too\) or auto$"):
        check_base_weights_dtype("nf4", cpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConjureError, match="and there is no CUDA GPU; set it to float8"):
        check_base_weights_dtype("nf4", cpu=False)


def test_float8_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name, *a: object())
    check_base_weights_dtype("float8", cpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_base_weights_dtype("float8", cpu=False)
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConjureError, match=r"^advanced.base_weights_dtype: float8 needs torchao; pip install "
                                           r"'conjure\[float8\]'$"):
        check_base_weights_dtype("float8", cpu=True)


@pytest.mark.parametrize("choice, library, extra", [("float8", "torchao", "conjure[float8]"),
                                                    ("nf4", "bitsandbytes", "conjure[bnb]")])
def test_refused_without_its_library(choice, library, extra, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name == library else find_spec(name, *a))
    message = f"advanced.base_weights_dtype: {choice} needs {library}; pip install '{extra}'"
    with pytest.raises(ConjureError, match=f"^{re.escape(message)}$"):
        check_base_weights_dtype(choice, cpu=False)
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name, *a: object())
    check_base_weights_dtype(choice, cpu=False)  # a GPU and the library: accepted


def test_every_linear_layer_is_chosen_but_those_kept_in_fp32(transformer):
    names = linear_layers(transformer)
    assert len(names) == sum(isinstance(m, torch.nn.Linear) for m in transformer.modules()) == 50
    assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "proj_out"} <= set(names)
    model = _fresh(transformer)
    model._keep_in_fp32_modules = ["proj_out"]
    kept = linear_layers(model)
    assert "proj_out" not in kept and "single_transformer_blocks.1.proj_out" not in kept and len(kept) == 47


class _FakeParams4bit(torch.nn.Parameter):
    def __new__(cls, data, requires_grad=False, quant_type="fp4"):
        param = super().__new__(cls, data, requires_grad)
        param.quant_type = quant_type
        return param


class _FakeLinear4bit(torch.nn.Linear):
    moved_to: list = []

    def __init__(self, in_features, out_features, bias=True, compute_dtype=None, quant_type="fp4", device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.compute_dtype, self.quant_type = compute_dtype, quant_type

    def to(self, *args, **kwargs):
        self.moved_to.append(args[0])
        return self


def test_nf4_replaces_each_linear_with_a_4bit_layer_of_the_same_weights(transformer, monkeypatch):
    fake = ModuleType("bitsandbytes")
    fake.nn = SimpleNamespace(Linear4bit=_FakeLinear4bit, Params4bit=_FakeParams4bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    model = _fresh(transformer)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantize_frozen(model, "nf4", torch.device("cuda")) == 50
    for name, weight in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, _FakeLinear4bit) and layer.quant_type == "nf4", name
        assert layer.compute_dtype == torch.bfloat16  # matmuls in the run's dtype
        assert isinstance(layer.weight, _FakeParams4bit) and layer.weight.quant_type == "nf4"
        assert not layer.weight.requires_grad and torch.equal(layer.weight.data, weight)
    assert _FakeLinear4bit.moved_to == [torch.device("cuda")] * 50  # quantised on its way to the GPU


def test_float8_converts_the_chosen_layers(transformer, monkeypatch):
    calls = []
    fake = ModuleType("torchao.quantization")
    fake.Float8WeightOnlyConfig = lambda **kwargs: ("float8 weight-only", kwargs)
    fake.quantize_ = lambda module, config, filter_fn, device: calls.append(
        (config, device, [n for n, m in module.named_modules() if filter_fn(m, n)]))
    monkeypatch.setitem(sys.modules, "torchao", ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    model = _fresh(transformer)
    assert quantize_frozen(model, "float8", torch.device("cuda")) == 50
    (config, device, chosen), = calls
    assert config == ("float8 weight-only", {"set_inductor_config": False})
    assert (device, chosen) == (torch.device("cuda"), linear_layers(model))


def test_place_model_quantises_the_denoiser_only_before_it_moves(transformer, monkeypatch):
    from conjure.families import get

    model = LoadedModel(get("flux"), "tiny", {"transformer": _fresh(transformer), "vae": torch.nn.Linear(2, 2)})
    events = []
    monkeypatch.setattr(quantize, "quantize_frozen", lambda module, choice, device: events.append(
        ("quantize", module, choice, device)))
    place_model(model, torch.device("cpu"), "bf16")
    assert not events
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: events.append(("to", self, *a)) or self)
    place_model(model, torch.device("cuda"), "no", "float8")
    denoiser = [e[2:] for e in events if e[1] is model.denoiser]
    # cast to the run's dtype where it is, converted layer by layer onto the device, then the rest moved
    assert denoiser == [(torch.float32,), ("float8", torch.device("cuda")), (torch.device("cuda"),)]
    assert ("to", model.vae, torch.device("cuda"), torch.float32) in events


def test_float8_with_torchao(transformer):
    """The real conversion where torchao is installed (pip install 'conjure[float8]'; it runs on the CPU too)."""
    pytest.importorskip("torchao")
    model = _fresh(transformer)
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]))
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k.endswith(("states", "projections")) else v
              for k, v in inputs.items()}
    expected = model(**inputs).sample.float()
    assert quantize_frozen(model, "float8", torch.device("cpu")) == 50
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "Float8Tensor" and weight.qdata.dtype == torch.float8_e4m3fn
    got = model(**inputs).sample.float()
    assert (got - expected).norm() / expected.norm() < 0.1


class _Packed4bit(torch.nn.Parameter):
    """Stands in for bitsandbytes' Params4bit: packed bytes of another shape, and the quant_state to unpack them."""

    def __new__(cls, weight):
        param = super().__new__(cls, torch.zeros(weight.numel() // 2, 1, dtype=torch.uint8), False)
        param.quant_state = weight
        return param


def test_dora_reads_a_4bit_base_weight_unpacked(monkeypatch):
    from conjure.adapters.dora import InputColumnDora, column_norm, merged_weight

    functional = ModuleType("bitsandbytes.functional")
    functional.dequantize_4bit = lambda packed, state: state.to(torch.bfloat16)
    monkeypatch.setitem(sys.modules, "bitsandbytes", ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)
    plain = torch.nn.Linear(16, 8).to(torch.bfloat16)
    weight = plain.weight.detach().clone()
    packed = torch.nn.Linear(16, 8).to(torch.bfloat16)
    packed.weight = _Packed4bit(weight)
    dora = InputColumnDora(packed, 4, 4.0)
    assert dora.weight_shape == (8, 16)
    assert torch.equal(dora.dora_scale.detach(), column_norm(weight.float()))  # not the packed bytes'
    with torch.no_grad():
        dora.lora_up.weight.normal_()
    assert torch.allclose(merged_weight(dora), merged_weight(_like(dora, plain)))


def _like(dora, base):
    from conjure.adapters.dora import InputColumnDora

    twin = InputColumnDora(base, dora.rank, dora.alpha)
    twin.load_state_dict({k: v for k, v in dora.state_dict().items() if not k.startswith("base.")}, strict=False)
    return twin


def test_dora_on_a_float8_base_with_torchao():
    pytest.importorskip("torchao")
    from conjure.adapters.dora import InputColumnDora

    layer = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16).requires_grad_(False)
    plain = layer[0].weight.detach().float().clone()
    quantize_frozen(layer, "float8", torch.device("cpu"))
    dora = InputColumnDora(layer[0], 4, 4.0)
    assert (dora.base_weight() - plain).norm() / plain.norm() < 0.05
    out = dora(torch.randn(2, 64, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert dora.lora_down.weight.grad is not None and dora.dora_scale.grad is not None
