"""Any LoRA layout the reader understands becomes conjure's neutral form, which the kohya writer turns into the
file every app loads: the same tensors, under the names apps read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conjure.errors import ConjureError
from conjure.export.kohya import load_kohya, save_kohya
from conjure.inspection.apps import verdicts
from conjure.inspection.reader import inspect_file
from conjure.inspection.weights import lora_weights

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata)
    return path


def test_attention_processor_file_to_kohya_keeps_every_tensor_and_loads_everywhere(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for proj, n_in in (("to_q", 320), ("to_k", 768), ("to_out", 320)):
        base = f"unet.{ATTN}.attn{2 if proj == 'to_k' else 1}.processor.{proj}_lora"
        tensors[f"{base}.down.weight"] = torch.randn(4, n_in, generator=g)
        tensors[f"{base}.up.weight"] = torch.randn(320, 4, generator=g)
    src = inspect_file(write(tmp_path / "procs.safetensors", tensors))
    assert not all(v.complete for v in verdicts(src))  # ComfyUI reads it, A1111 and InvokeAI do not
    weights = lora_weights(src)
    out = save_kohya(tmp_path / "kohya.safetensors", weights, {}, src.family)
    assert all(v.complete for v in verdicts(inspect_file(out)))
    back, _ = load_kohya(out)
    assert torch.equal(back[("unet", f"{ATTN}.attn1.to_out.0")].up, tensors[f"unet.{ATTN}.attn1.processor.to_out_lora.up.weight"])
    assert {m.alpha for m in back.values()} == {4.0}  # no alpha in the source: alpha = rank, the same scale


def test_fused_and_onetrainer_flux_names_split_into_diffusers_modules(tmp_path):
    g = torch.Generator().manual_seed(1)
    up = torch.zeros(9216, 6)
    for i in range(3):  # block-diagonal: three rank-2 members, as a split -> fused writer leaves them
        up[i * 3072:(i + 1) * 3072, 2 * i:2 * i + 2] = torch.randn(3072, 2, generator=g)
    tensors = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(6, 3072, generator=g),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": up,
               "lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight": torch.randn(2, 15360),
               "lora_transformer_single_transformer_blocks_0_proj_out.lora_up.weight": torch.randn(3072, 2)}
    weights = lora_weights(inspect_file(write(tmp_path / "f.safetensors", tensors, {"ss_base_model_version": "flux1"})))
    assert {(c, p, m.rank) for (c, p), m in weights.items()} == {
        ("transformer", "transformer_blocks.0.attn.to_q", 2), ("transformer", "transformer_blocks.0.attn.to_k", 2),
        ("transformer", "transformer_blocks.0.attn.to_v", 2), ("transformer", "single_transformer_blocks.0.proj_out", 2)}
    out = save_kohya(tmp_path / "k.safetensors", weights, {}, "flux")
    assert all(v.complete for v in verdicts(inspect_file(out)))


def test_dora_orientations_and_refusals(tmp_path):
    name = f"lora_unet_{ATTN.replace('.', '_')}_attn2_to_k"
    base = {f"{name}.lora_down.weight": torch.ones(2, 768), f"{name}.lora_up.weight": torch.ones(320, 2)}
    (m,) = lora_weights(inspect_file(write(tmp_path / "a.safetensors", {**base, f"{name}.dora_scale": torch.ones(1, 768)}))).values()
    assert m.dora_scale.shape == (1, 768) and m.magnitude is None
    (m,) = lora_weights(inspect_file(write(tmp_path / "b.safetensors", {**base, f"{name}.dora_scale": torch.ones(320, 1)}))).values()
    assert m.magnitude.shape == (320,) and m.dora_scale is None
    lokr = {f"{name}.lokr_w1": torch.ones(8, 8), f"{name}.lokr_w2": torch.ones(40, 96)}
    with pytest.raises(ConjureError, match="lokr, which has no LoRA form"):
        lora_weights(inspect_file(write(tmp_path / "c.safetensors", lokr)))
