"""`conjure convert IN OUT --to kohya|peft`: converts plain LoRA files; every refusal is one `error:` line, exit 2."""

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conjure.adapters import LoraModule
from conjure.export.kohya import save_kohya

NAME = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def write_lora(path, dora=False):
    g = torch.Generator().manual_seed(0)
    m = LoraModule(torch.randn(4, 768, generator=g), torch.randn(320, 4, generator=g), alpha=2.0)
    if dora:
        m.dora_scale = torch.rand(1, 768, generator=g) + 0.5
    return save_kohya(path, {("unet", NAME): m}, {"ss_output_name": "x"}, "sd1")


def test_convert_both_ways_and_overwrite_only_with_force(tmp_path, run_cli, assert_one_line_error):
    src = write_lora(tmp_path / "k.safetensors")
    code, out, _ = run_cli("convert", src, tmp_path / "p.safetensors", "--to", "peft")
    assert code == 0 and "p.safetensors" in out
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert list(f.keys()) and all(k.startswith("unet.") for k in f.keys())
    code, _, _ = run_cli("convert", tmp_path / "p.safetensors", tmp_path / "k2.safetensors", "--to", "kohya")
    assert code == 0
    with safe_open(str(src), "pt") as a, safe_open(str(tmp_path / "k2.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    before = (tmp_path / "p.safetensors").read_bytes()
    code, _, err = run_cli("convert", src, tmp_path / "p.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "exists", "--force")
    assert (tmp_path / "p.safetensors").read_bytes() == before
    code, _, _ = run_cli("convert", src, tmp_path / "p.safetensors", "--to", "peft", "--force")
    assert code == 0


def test_convert_refusals_are_one_line(tmp_path, run_cli, assert_one_line_error):
    dora = write_lora(tmp_path / "d.safetensors", dora=True)
    code, _, err = run_cli("convert", dora, tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "DoRA files cannot change format")

    code, _, err = run_cli("convert", tmp_path / "missing.safetensors", tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "no such file")

    plain = write_lora(tmp_path / "k.safetensors")
    code, _, err = run_cli("convert", plain, tmp_path / "o.safetensors", "--to", "kohya")
    assert_one_line_error(code, err, "already a kohya file")

    emb = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(emb))
    code, _, err = run_cli("convert", emb, tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "neither a kohya LoRA")

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    code, _, err = run_cli("convert", text, tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "safetensors")

    code, _, err = run_cli("convert", plain, tmp_path / "no-such-dir" / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o.safetensors").exists()


def test_flux_files_convert_both_ways_and_refuse_in_one_line(tmp_path, run_cli, assert_one_line_error):
    g = torch.Generator().manual_seed(1)
    weights = {("transformer", f"transformer_blocks.0.attn.to_{x}"): LoraModule(
        torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), alpha=1.0) for x in "qkv"}
    src = save_kohya(tmp_path / "k.safetensors", weights, {"ss_output_name": "x"}, "flux")
    code, _, _ = run_cli("convert", src, tmp_path / "p.safetensors", "--to", "peft")
    assert code == 0
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert sorted(f.keys())[0] == "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"
    code, _, _ = run_cli("convert", tmp_path / "p.safetensors", tmp_path / "k2.safetensors", "--to", "kohya")
    with safe_open(str(src), "pt") as a, safe_open(str(tmp_path / "k2.safetensors"), "pt") as b:
        assert code == 0 and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())

    # a linear1 whose rows are not q|k|v|mlp of one width (another model's layout)
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 16),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(50, 2)}, str(odd))
    code, _, err = run_cli("convert", odd, tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "do not split")
    final = tmp_path / "final.safetensors"
    save_file({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 16),
               "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 16),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(16, 2)}, str(final))
    code, _, err = run_cli("convert", final, tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "not a FLUX.1 module conjure reads")
