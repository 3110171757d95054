"""The lean LoRA forward (conjure.adapters.lean_lora) computes what PEFT's forward computes, gradients included,
and leaves every layer state it does not cover to PEFT."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import layer as peft_lora
from torch import nn

from conjure.adapters.lean_lora import LeanConv2d, LeanLinear, use_lean_forward


class Block(nn.Module):
    """A Linear and a 3x3 Conv2d, the two layer kinds conjure adapts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.proj = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.proj(h.flatten(2).transpose(1, 2))


def _pair(dropout: float = 0.0, dora: bool = False, dtype: torch.dtype = torch.float32):
    """The same adapted block twice: PEFT's forward and (after use_lean_forward) the lean one."""
    torch.manual_seed(0)
    block = Block().to(dtype).requires_grad_(False)
    config = LoraConfig(r=3, lora_alpha=5.0, lora_dropout=dropout, use_dora=dora, target_modules=["conv", "proj"])
    inject_adapter_in_model(config, block, adapter_name="default")
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: make the update visible
                p.copy_(torch.randn(p.shape) * 0.3)
                p.data = p.data.float()  # the recipe's float32 masters
    lean = copy.deepcopy(block)
    return block, lean, use_lean_forward(lean)


def _run(block: nn.Module, x: torch.Tensor, seed: int = 1):
    torch.manual_seed(seed)  # the same dropout masks for both
    out = block(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad}
    block.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_forward_matches_peft_outputs_and_gradients(dropout):
    peft_block, lean_block, swapped = _pair(dropout)
    assert swapped == 2
    assert type(lean_block.conv) is LeanConv2d and type(lean_block.proj) is LeanLinear
    # the same modules and parameter names: checkpoints, resume and the exporters see no difference
    assert list(dict(lean_block.named_parameters())) == list(dict(peft_block.named_parameters()))
    x = torch.randn(2, 6, 4, 4)
    out, grads = _run(peft_block, x)
    lean_out, lean_grads = _run(lean_block, x)
    assert torch.allclose(lean_out, out, atol=1e-6, rtol=1e-5)
    assert grads.keys() == lean_grads.keys() and len(grads) == 4
    for name in grads:
        assert torch.allclose(lean_grads[name], grads[name], atol=1e-6, rtol=1e-5), name


def test_lean_forward_keeps_peft_casts_with_low_precision_base_weights():
    """bf16 base weights, float32 adapters, no autocast: the adapter computes in float32 and the output is bf16, as
    PEFT's. (bf16 results agree to bf16 rounding only: a fused addmm rounds the base product once where F.linear may
    round twice, and two layers carry a 1-ulp difference on; the float32 test above is the exact comparison.)"""
    peft_block, lean_block, _ = _pair(dtype=torch.bfloat16)
    x = torch.randn(2, 6, 4, 4, dtype=torch.bfloat16)
    out, grads = _run(peft_block, x)
    lean_out, lean_grads = _run(lean_block, x)
    assert lean_out.dtype == out.dtype == torch.bfloat16
    assert torch.allclose(lean_out.float(), out.float(), atol=0.05)
    for name in grads:
        assert lean_grads[name].dtype == grads[name].dtype == torch.float32
        assert torch.allclose(lean_grads[name], grads[name], atol=0.02), name


def test_disabled_or_merged_adapters_take_peft_forward():
    _, lean_block, _ = _pair()
    conv, proj = lean_block.conv, lean_block.proj
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        adapted = lean_block(x)
        for layer in (conv, proj):
            layer.enable_adapters(False)
        disabled = lean_block(x)
        base = proj.base_layer(conv.base_layer(x).flatten(2).transpose(1, 2))
        for layer in (conv, proj):
            layer.enable_adapters(True)
            layer.merge()
        merged = lean_block(x)
    assert torch.equal(disabled, base) and not torch.allclose(disabled, adapted, atol=1e-3)
    assert torch.allclose(merged, adapted, atol=1e-5)  # not added twice: merged weights, no update on top


def test_dora_layers_keep_peft_forward():
    _, lean_block, swapped = _pair(dora=True)
    assert swapped == 0
    assert type(lean_block.proj) is peft_lora.Linear and type(lean_block.conv) is peft_lora.Conv2d
