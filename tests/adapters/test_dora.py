"""The input-column DoRA layer computes exactly what the apps compute from its saved tensors."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conjure.adapters.dora import InputColumnDora, column_norm, merged_weight


def _randomise(layer: InputColumnDora, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.3)
        layer.dora_scale.mul_(1 + 0.2 * torch.rand(layer.dora_scale.shape, generator=g))


def test_linear_forward_equals_the_merged_weight_apps_compute():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = InputColumnDora(base, rank=3, alpha=5.0)
    assert layer.dora_scale.shape == (1, 12)  # [1, in]: the layout every app applies exactly
    x = torch.randn(4, 5, 12)
    assert torch.allclose(layer(x), base(x), atol=1e-6)  # an untrained DoRA is the base layer
    _randomise(layer)
    w = base.weight + (5.0 / 3) * layer.lora_up.weight @ layer.lora_down.weight
    expected = F.linear(x, layer.dora_scale * w / w.norm(dim=0, keepdim=True), base.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(merged_weight(layer), layer.dora_scale * w / w.norm(dim=0, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_forward_equals_the_merged_weight(kernel):
    torch.manual_seed(1)
    base = nn.Conv2d(6, 5, kernel, padding=kernel // 2)
    layer = InputColumnDora(base, rank=2, alpha=2.0)
    assert layer.dora_scale.shape == (1, 6, 1, 1)
    assert layer.lora_down.weight.shape == (2, 6, kernel, kernel) and layer.lora_up.weight.shape == (5, 2, 1, 1)
    _randomise(layer)
    x = torch.randn(2, 6, 8, 8)
    expected = F.conv2d(x, merged_weight(layer), base.bias, padding=kernel // 2)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert column_norm(merged_weight(layer)).flatten().allclose(layer.dora_scale.detach().flatten(), atol=1e-5)


def test_gradients_reach_down_up_and_magnitude_only():
    base = nn.Linear(8, 4)
    base.requires_grad_(False)
    layer = InputColumnDora(base, rank=2, alpha=2.0)
    _randomise(layer)
    layer(torch.randn(3, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_down.weight, layer.lora_up.weight,
                                                                        layer.dora_scale))
    assert base.weight.grad is None


def test_shared_decomposition_is_the_fused_weights_and_trains_one_scale():
    """q, k, v decomposed as the one fused weight apps hold (FLUX.1's qkv): each part's forward is its rows of
    scale * W'_fused / ||W'_fused||_col, and the one shared scale gets every part's gradient."""
    from conjure.adapters.dora import share_decomposition

    torch.manual_seed(2)
    bases = [nn.Linear(8, out).requires_grad_(False) for out in (8, 8, 32)]
    layers = [InputColumnDora(base, rank=2, alpha=3.0) for base in bases]
    share_decomposition(layers, "single_transformer_blocks.0.linear1")
    assert all(layer.dora_scale is layers[0].dora_scale and layer.group == "single_transformer_blocks.0.linear1"
               for layer in layers)
    x = torch.randn(3, 8)
    for layer, base in zip(layers, bases):
        assert torch.allclose(layer(x), base(x), atol=1e-6)  # untrained: the base layers
    for i, layer in enumerate(layers):
        _randomise(layer, seed=i)
    fused = torch.cat([layer.base.weight + layer.scale * layer.lora_up.weight @ layer.lora_down.weight
                       for layer in layers])
    merged = layers[0].dora_scale * fused / fused.norm(dim=0, keepdim=True)
    rows = torch.split(merged, [8, 8, 32])
    for layer, base, part in zip(layers, bases, rows):
        assert torch.allclose(layer(x), F.linear(x, part, base.bias), atol=1e-5)
        assert torch.allclose(merged_weight(layer), part, atol=1e-6)
    sum(layer(x).square().sum() for layer in layers).backward()
    assert layers[0].dora_scale.grad is not None
    assert len({id(p) for layer in layers for p in layer.parameters() if p.requires_grad}) == 3 * 2 + 1
    with pytest.raises(ValueError, match="same input"):
        share_decomposition([InputColumnDora(nn.Linear(8, 4), 1, 1.0), InputColumnDora(nn.Linear(6, 4), 1, 1.0)], "x")
