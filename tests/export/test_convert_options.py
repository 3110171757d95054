"""`conjure convert` options: --dtype (fp16 overflow refused), --resize-rank / --energy (SVD, energy against a hand
SVD, low-rank modules copied bit for bit, resized files load completely in diffusers), --merge-embedding /
--split-bundle (tensor-equal both ways, family mismatches refused), LyCORIS LoCon accepted and LoHa/LoKr refused,
and a truncated input refused in one line."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conjure.adapters import LoraModule
from conjure.export.convert import ConvertOptions, convert
from conjure.export.embeddings import save_embedding
from conjure.export.kohya import load_kohya, save_kohya
from conjure.export.peft import load_peft
from conjure.export.resize import resize_module

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"
META = {"ss_output_name": "x", "ss_network_dim": "8", "ss_network_alpha": "4"}


def lora(path, *, rank=8, conv_rank=2, dora=False, scale=1.0):
    g = torch.Generator().manual_seed(0)
    weights = {
        ("unet", ATTN): LoraModule(torch.randn(rank, 768, generator=g), torch.randn(320, rank, generator=g) * scale,
                                   alpha=4.0),
        ("unet", CONV): LoraModule(torch.randn(conv_rank, 320, 3, 3, generator=g),
                                   torch.randn(320, conv_rank, 1, 1, generator=g), alpha=1.0),
    }
    if dora:
        for m in weights.values():
            m.dora_scale = (torch.rand(m.down.shape[1], generator=g) + 0.5).reshape((1, -1) + (1,) * (m.down.dim() - 2))
    return save_kohya(path, weights, META, "sd1")


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_dtype_casts_the_lora_tensors_keeps_alphas_and_goes_back_exactly(tmp_path, run_cli):
    src = lora(tmp_path / "k.safetensors", dora=True)
    code, out, _ = run_cli("convert", src, tmp_path / "h.safetensors", "--dtype", "fp16")
    assert code == 0 and "fp16" in out
    original, meta = read(src)
    half, half_meta = read(tmp_path / "h.safetensors")
    assert set(half) == set(original) and half_meta == meta
    for key, value in original.items():
        if key.endswith(".alpha"):
            assert half[key].dtype == torch.float32 and torch.equal(half[key], value)
        else:
            assert half[key].dtype == torch.float16 and torch.equal(half[key], value.half()), key
    run_cli("convert", tmp_path / "h.safetensors", tmp_path / "f.safetensors", "--dtype", "fp32")
    assert all(torch.equal(v, half[k].float()) for k, v in read(tmp_path / "f.safetensors")[0].items())

    plain = lora(tmp_path / "plain.safetensors")
    code, _, _ = run_cli("convert", plain, tmp_path / "p.safetensors", "--to", "peft", "--dtype", "bf16")
    peft, _ = load_peft(tmp_path / "p.safetensors")
    assert code == 0 and all(m.down.dtype == m.up.dtype == torch.bfloat16 for m in peft.values())
    assert {m.alpha for m in peft.values()} == {4.0, 1.0}


def test_fp16_overflow_is_refused_naming_the_tensor(tmp_path, run_cli, assert_one_line_error):
    src = lora(tmp_path / "k.safetensors", scale=1e5)
    for extra in ([], ["--to", "peft"]):
        code, _, err = run_cli("convert", src, tmp_path / "h.safetensors", "--dtype", "fp16", *extra)
        message = assert_one_line_error(code, err, "float16's range", "would be written as inf")
        assert "lora_up" in message or "up" in message.split(":")[1]
        assert not (tmp_path / "h.safetensors").exists()
    code, _, err = run_cli("convert", src, tmp_path / "h.safetensors", "--dtype", "fp16")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in err
    assert run_cli("convert", src, tmp_path / "b.safetensors", "--dtype", "bf16")[0] == 0  # bf16 has the range


@pytest.mark.parametrize("conv", [False, True])
def test_resize_energy_and_update_match_a_hand_svd(conv):
    g = torch.Generator().manual_seed(3)
    down = torch.randn(6, 5, 3, 3, generator=g) if conv else torch.randn(6, 20, generator=g)
    up = torch.randn(12, 6, 1, 1, generator=g) if conv else torch.randn(12, 6, generator=g)
    m = LoraModule(down, up, alpha=3.0)
    delta = up.flatten(1) @ down.flatten(1)
    s = torch.linalg.svdvals(delta.double())
    resized, record = resize_module("m", m, 2, None)
    assert record.new_rank == resized.rank == 2 and record.old_rank == 6
    assert record.energy == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-5)
    assert resized.down.shape == (2, *down.shape[1:]) and resized.up.shape == (12, 2, *up.shape[2:])
    assert resized.alpha == m.alpha  # kept: lora_up takes the rank ratio
    u, _, vh = torch.linalg.svd(delta.double())
    best = (u[:, :2] * s[:2]) @ vh[:2] * m.scale  # Eckart-Young: the closest rank-2 update
    got = resized.up.flatten(1).double() @ resized.down.flatten(1).double() * resized.scale
    torch.testing.assert_close(got, best, atol=1e-4, rtol=1e-4)

    # --energy: the smallest rank keeping the fraction (here 3 singular values of 10, 5, 1, 0.1 keep 0.9999...)
    q1, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))
    known = LoraModule(q2.T.float(), (q1 * torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64)).float(), alpha=4.0)
    assert resize_module("k", known, None, 0.9)[1].new_rank == 2  # 125 / 126.01 = 0.992
    assert resize_module("k", known, None, 0.995)[1].new_rank == 3
    assert resize_module("k", known, 1, 0.995)[1].new_rank == 1  # R caps


def test_resize_copies_low_rank_modules_bit_for_bit_and_writes_kohya_metadata(tmp_path, run_cli):
    src = lora(tmp_path / "k.safetensors", rank=8, conv_rank=2, dora=True)
    code, out, _ = run_cli("convert", src, tmp_path / "r.safetensors", "--resize-rank", "3")
    assert code == 0 and "rank 8 -> 3" in out and "rank 2, copied" in out and "energy kept: mean" in out
    before, _ = load_kohya(src)
    after, meta = load_kohya(tmp_path / "r.safetensors")
    conv, attn = after[("unet", CONV)], after[("unet", ATTN)]
    assert torch.equal(conv.down, before[("unet", CONV)].down) and torch.equal(conv.up, before[("unet", CONV)].up)
    assert conv.alpha == 1.0 and attn.rank == 3 and attn.alpha == 4.0
    assert torch.equal(attn.dora_scale, before[("unet", ATTN)].dora_scale)  # DoRA: the magnitude is kept
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "4"
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 3")


def test_resize_settings_are_checked_in_one_line(tmp_path, run_cli, assert_one_line_error):
    src = lora(tmp_path / "k.safetensors")
    for args, needle in ((["--resize-rank", "0"], "--resize-rank must be at least 1"),
                         (["--energy", "1.5"], "--energy must be in (0, 1]")):
        code, _, err = run_cli("convert", src, tmp_path / "o.safetensors", *args)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o.safetensors").exists()


def test_flux_energy_resize_keeps_fused_layers_at_one_rank(tmp_path):
    g = torch.Generator().manual_seed(1)
    weights = {}
    for i, x in enumerate("qkv"):  # q keeps most of its energy in 1 value, v needs all 4
        q, _ = torch.linalg.qr(torch.randn(16, 4, generator=g))
        spectrum = torch.tensor([[10.0, 0.1, 0.1, 0.1], [10.0, 5.0, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0]][i])
        weights[("transformer", f"transformer_blocks.0.attn.to_{x}")] = LoraModule(
            torch.linalg.qr(torch.randn(16, 4, generator=g))[0].T, q * spectrum, alpha=2.0)
    src = save_kohya(tmp_path / "k.safetensors", weights, {}, "flux")
    done = convert(src, tmp_path / "r.safetensors", ConvertOptions(energy=0.95))
    assert sorted(r.new_rank for r in done.resized) == [1, 2, 4]
    fused, _ = read(done.path)
    assert fused["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 16)
    back, _ = load_kohya(done.path)
    for key, m in back.items():  # padded with zeros to one rank: each part's update is its resized one
        assert m.alpha == 2.0
        kept = resize_module("", weights[key], None, 0.95)[0]
        torch.testing.assert_close(m.up @ m.down * m.scale, kept.up @ kept.down * kept.scale)


def embedding(path, family="sd1", n=2):
    g = torch.Generator().manual_seed(5)
    widths = {"sd1": {"emb_params": 768}, "sd2": {"emb_params": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
    tensors = {key: torch.randn(n, width, generator=g) for key, width in widths[family].items()}
    save_embedding(path, tensors, {})
    return path, tensors


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_then_split_bundle_is_tensor_equal(tmp_path, run_cli, family):
    if family == "sd1":
        src = lora(tmp_path / "k.safetensors")
    else:
        src = save_kohya(tmp_path / "k.safetensors", {("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"):
                         LoraModule(torch.ones(2, 1280), torch.ones(5120, 2), 2.0)}, META, "sdxl")
    emb, tensors = embedding(tmp_path / "my-style.safetensors", family)
    code, _, _ = run_cli("convert", src, tmp_path / "b.safetensors", "--merge-embedding", emb)
    bundled, meta = read(tmp_path / "b.safetensors")
    parts = {"sd1": ["string_to_param.*"], "sdxl": ["clip_l", "clip_g"]}[family]
    assert code == 0 and {k for k in bundled if k.startswith("bundle_emb.")} == {
        f"bundle_emb.my-style.{p}" for p in parts}

    (tmp_path / "out").mkdir()
    code, out, _ = run_cli("convert", tmp_path / "b.safetensors", tmp_path / "out" / "l.safetensors", "--split-bundle")
    assert code == 0 and "type my-style in the prompt" in out
    original, original_meta = read(src)
    split, split_meta = read(tmp_path / "out" / "l.safetensors")
    assert split_meta == original_meta == meta and set(split) == set(original)
    assert all(torch.equal(v, original[k]) for k, v in split.items())
    alone, _ = read(tmp_path / "out" / "my-style.safetensors")
    assert set(alone) == set(tensors) and all(torch.equal(alone[k], v) for k, v in tensors.items())


def test_bundle_refusals_are_one_line(tmp_path, run_cli, assert_one_line_error):
    src = lora(tmp_path / "k.safetensors")
    out = tmp_path / "o.safetensors"
    for family, needles in (("sdxl", ["clip_l [2, 768]", "clip_g [2, 1280]"]), ("sd2", ["emb_params [2, 1024]"])):
        emb, _ = embedding(tmp_path / f"{family}.safetensors", family)
        code, _, err = run_cli("convert", src, out, "--merge-embedding", emb)
        assert_one_line_error(code, err, "is not a sd1 embedding (emb_params [n, 768]", *needles)
    emb, _ = embedding(tmp_path / "style.safetensors")
    code, _, err = run_cli("convert", src, out, "--merge-embedding", emb, "--to", "peft")
    assert_one_line_error(code, err, "diffusers/PEFT format cannot carry")
    code, _, err = run_cli("convert", src, out, "--split-bundle")
    assert_one_line_error(code, err, "bundles no embedding")
    run_cli("convert", src, tmp_path / "b.safetensors", "--merge-embedding", emb)
    code, _, err = run_cli("convert", tmp_path / "b.safetensors", out, "--merge-embedding", emb)
    assert_one_line_error(code, err, "already bundles an embedding named 'style'")
    code, _, err = run_cli("convert", tmp_path / "b.safetensors", out, "--split-bundle")
    assert_one_line_error(code, err, "style.safetensors exists", "--force")
    assert not out.exists()

    # a tiny model's LoRA: the embedding's width is the one its UNet cross-attends to, not the real model's
    tiny = save_kohya(tmp_path / "tiny.safetensors", {("unet", ATTN): LoraModule(torch.ones(2, 64), torch.ones(32, 2),
                      1.0)}, {}, "sd1")
    save_embedding(tmp_path / "tiny-emb.safetensors", {"emb_params": torch.ones(1, 64)}, {})
    assert run_cli("convert", tiny, out, "--merge-embedding", tmp_path / "tiny-emb.safetensors")[0] == 0
    code, _, err = run_cli("convert", tiny, out, "--force", "--merge-embedding", emb)
    assert_one_line_error(code, err, "widths adding up to the LoRA's text width 64", "emb_params [2, 768]")


def test_truncated_files_and_lycoris_loha_lokr_are_refused_in_one_line(tmp_path, run_cli, assert_one_line_error):
    src = lora(tmp_path / "k.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[:-100])
    code, _, err = run_cli("convert", cut, tmp_path / "o.safetensors", "--to", "peft")
    assert_one_line_error(code, err, "cannot read", "cut.safetensors")
    emb, _ = embedding(tmp_path / "e.safetensors")
    cut.write_bytes(emb.read_bytes()[:-10])
    code, _, err = run_cli("convert", src, tmp_path / "o.safetensors", "--merge-embedding", cut)
    assert_one_line_error(code, err, "cannot read embedding file")

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loha = {f"{name}.hada_w{i}_{ab}": torch.ones(2, 2) for i in (1, 2) for ab in "ab"}
    lokr = {f"{name}.lokr_w1": torch.ones(2, 2), f"{name}.lokr_w2": torch.ones(160, 384)}
    for tensors, needle in ((loha, "LoHa"), (lokr, "LoKr")):
        save_file({**tensors, f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "ly.safetensors"))
        code, _, err = run_cli("convert", tmp_path / "ly.safetensors", tmp_path / "o.safetensors", "--to", "peft")
        assert_one_line_error(code, err, "is a LyCORIS file, not a LoRA", needle, "no exact LoRA form")


def test_lycoris_locon_converts_exactly(tmp_path, run_cli):
    """LyCORIS LoCon (algo=locon): kohya names and lora_down/lora_up/alpha on linear and conv layers."""
    g = torch.Generator().manual_seed(2)
    tensors = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(4, 320, 3, 3, generator=g),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight": torch.randn(4, 320, 3, 3, generator=g),
        "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g),
        "lora_unet_down_blocks_0_downsamplers_0_conv.alpha": torch.tensor(1.0),
        f"lora_unet_{ATTN.replace('.', '_')}.lora_down.weight": torch.randn(8, 768, generator=g),
        f"lora_unet_{ATTN.replace('.', '_')}.lora_up.weight": torch.randn(320, 8, generator=g),
        f"lora_unet_{ATTN.replace('.', '_')}.alpha": torch.tensor(4.0),
    }
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon", "conv_dim": "4"}',
            "ss_base_model_version": "sd_v1"}
    save_file(tensors, str(tmp_path / "locon.safetensors"), meta)
    assert run_cli("convert", tmp_path / "locon.safetensors", tmp_path / "p.safetensors", "--to", "peft")[0] == 0
    assert run_cli("convert", tmp_path / "p.safetensors", tmp_path / "k.safetensors", "--to", "kohya")[0] == 0
    back, back_meta = read(tmp_path / "k.safetensors")
    assert back_meta == meta and set(back) == set(tensors)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
