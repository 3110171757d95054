"""`conjure convert` on other trainers' files (named by `conjure inspect`'s reader): each layout converts to the
kohya file apps load with every tensor where it belongs, and what cannot be placed is refused in one line.
Synthetic files of real key names and real shapes at small rank."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conjure.export.kohya import load_kohya
from conjure.export.peft import load_peft

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"


def factors(n_out, n_in, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, n_in, generator=g), torch.randn(n_out, rank, generator=g)


def keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


def test_old_diffusers_attention_processors_convert_to_kohya_exactly(tmp_path, run_cli):
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    (dq, uq), (do, uo) = factors(320, 320), factors(320, 320, seed=1)
    save_file({f"{base}.to_q_lora.down.weight": dq, f"{base}.to_q_lora.up.weight": uq,
               f"{base}.to_out_lora.down.weight": do, f"{base}.to_out_lora.up.weight": uo},
              str(tmp_path / "procs.safetensors"), {"ss_base_model_version": "sd_v1"})
    code, out, _ = run_cli("convert", tmp_path / "procs.safetensors", tmp_path / "k.safetensors")
    assert code == 0 and "kohya format" in out  # the layout every app loads, by default
    weights, meta = load_kohya(tmp_path / "k.safetensors")
    q, o = weights[("unet", Q)], weights[("unet", OUT)]
    assert torch.equal(q.down, dq) and torch.equal(q.up, uq) and torch.equal(o.down, do) and torch.equal(o.up, uo)
    assert q.alpha == o.alpha == 2.0 and meta["ss_base_model_version"] == "sd_v1"  # no alpha: alpha = rank


def test_onetrainer_and_simpletuner_flux_names_convert_to_kohya_and_peft(tmp_path, run_cli):
    dq, uq = factors(3072, 3072)
    save_file({"lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": dq,
               "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight": uq,
               "lora_transformer_single_transformer_blocks_0_attn_to_q.alpha": torch.tensor(1.0)},
              str(tmp_path / "onetrainer.safetensors"))
    assert run_cli("convert", tmp_path / "onetrainer.safetensors", tmp_path / "k.safetensors")[0] == 0
    assert keys(tmp_path / "k.safetensors")[0] == {f"lora_unet_single_blocks_0_linear1.{p}"
                                                    for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    (path, m), = load_kohya(tmp_path / "k.safetensors")[0].items()  # the zero blocks of k, v, mlp are padding
    assert path == ("transformer", "single_transformer_blocks.0.attn.to_q")
    assert torch.equal(m.down, dq) and torch.equal(m.up, uq) and m.alpha == 1.0

    save_file({"lycoris_transformer_blocks_2_ff_net_2.lora_down.weight": factors(3072, 12288)[0],
               "lycoris_transformer_blocks_2_ff_net_2.lora_up.weight": factors(3072, 12288)[1],
               "lycoris_transformer_blocks_2_ff_net_2.alpha": torch.tensor(4.0)},
              str(tmp_path / "simpletuner.safetensors"), {"modelspec.architecture": "flux-1-dev/lora"})
    assert run_cli("convert", tmp_path / "simpletuner.safetensors", tmp_path / "p.safetensors", "--to", "peft")[0] == 0
    ((component, path), m), = load_peft(tmp_path / "p.safetensors")[0].items()
    assert (component, path, m.alpha) == ("transformer", "transformer_blocks.2.ff.net.2", 4.0)
    assert torch.equal(m.down, factors(3072, 12288)[0])


def test_comfyui_bfl_paths_split_a_fused_layer(tmp_path, run_cli):
    down, up = factors(9216, 3072, rank=3)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": down,
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": up},
              str(tmp_path / "bfl.safetensors"))
    assert run_cli("convert", tmp_path / "bfl.safetensors", tmp_path / "p.safetensors", "--to", "peft")[0] == 0
    weights, _ = load_peft(tmp_path / "p.safetensors")
    for i, x in enumerate("qkv"):  # a dense fused layer: each part keeps the whole down and its rows of up
        m = weights[("transformer", f"transformer_blocks.0.attn.to_{x}")]
        assert torch.equal(m.down, down) and torch.equal(m.up, up[3072 * i:3072 * (i + 1)]) and m.alpha == 3.0


@pytest.mark.parametrize("extra, needle", [
    ({"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 2)}, "names no layer of a sd1 model"),
    ({"text_encoder.some_tensor": torch.zeros(3)}, "no part of a LoRA module"),
    ({"diffusion_model.input_blocks.1.1.proj_in.hada_w1_a": torch.zeros(8, 2)}, "is a LyCORIS file, not a LoRA"),
])
def test_what_cannot_be_placed_is_refused_in_one_line(tmp_path, run_cli, assert_one_line_error, extra, needle):
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    dq, uq = factors(320, 320)
    save_file({f"{base}.to_q_lora.down.weight": dq, f"{base}.to_q_lora.up.weight": uq, **extra},
              str(tmp_path / "f.safetensors"), {"ss_base_model_version": "sd_v1"})
    code, _, err = run_cli("convert", tmp_path / "f.safetensors", tmp_path / "o.safetensors")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o.safetensors").exists()


def lycoris_file(path):
    """LoHa (linear; conv without Tucker; conv with Tucker) and LoKr (w2 decomposed; w2 whole) on real SD 1.x layers,
    and the update each applies as ComfyUI computes it (comfy/weight_adapter/loha.py, lokr.py)."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    names = {x: "lora_unet_down_blocks_0_" + x for x in (
        "attentions_0_transformer_blocks_0_attn1_to_q", "resnets_0_conv1", "resnets_0_conv2",
        "attentions_0_transformer_blocks_0_attn1_to_k", "attentions_0_transformer_blocks_0_attn1_to_v")}
    q, c1, c2, k, v = names.values()
    t, delta = {}, {}
    t |= {f"{q}.hada_w1_a": r(320, 2), f"{q}.hada_w1_b": r(2, 320), f"{q}.hada_w2_a": r(320, 2),
          f"{q}.hada_w2_b": r(2, 320), f"{q}.alpha": torch.tensor(1.0)}
    delta[q] = (t[f"{q}.hada_w1_a"] @ t[f"{q}.hada_w1_b"]) * (t[f"{q}.hada_w2_a"] @ t[f"{q}.hada_w2_b"]) * 0.5
    t |= {f"{c1}.hada_w1_a": r(320, 2), f"{c1}.hada_w1_b": r(2, 2880), f"{c1}.hada_w2_a": r(320, 2),
          f"{c1}.hada_w2_b": r(2, 2880)}  # no alpha: scale 1
    delta[c1] = ((t[f"{c1}.hada_w1_a"] @ t[f"{c1}.hada_w1_b"]) * (t[f"{c1}.hada_w2_a"] @ t[f"{c1}.hada_w2_b"]))
    t |= {f"{c2}.hada_t1": r(2, 2, 3, 3), f"{c2}.hada_w1_a": r(2, 320), f"{c2}.hada_w1_b": r(2, 320),
          f"{c2}.hada_t2": r(2, 2, 3, 3), f"{c2}.hada_w2_a": r(2, 320), f"{c2}.hada_w2_b": r(2, 320),
          f"{c2}.alpha": torch.tensor(4.0)}
    m1 = torch.einsum("i j k l, j r, i p -> p r k l", t[f"{c2}.hada_t1"], t[f"{c2}.hada_w1_b"], t[f"{c2}.hada_w1_a"])
    m2 = torch.einsum("i j k l, j r, i p -> p r k l", t[f"{c2}.hada_t2"], t[f"{c2}.hada_w2_b"], t[f"{c2}.hada_w2_a"])
    delta[c2] = (m1 * m2 * 2.0).flatten(1)
    t |= {f"{k}.lokr_w1": r(4, 4), f"{k}.lokr_w2_a": r(80, 2), f"{k}.lokr_w2_b": r(2, 80), f"{k}.alpha": torch.tensor(1.0)}
    delta[k] = torch.kron(t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2_a"] @ t[f"{k}.lokr_w2_b"]) * 0.5
    t |= {f"{v}.lokr_w1": r(8, 4), f"{v}.lokr_w2": r(40, 80)}
    delta[v] = torch.kron(t[f"{v}.lokr_w1"], t[f"{v}.lokr_w2"])
    save_file(t, str(path), {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya",
                             "ss_network_args": '{"algo": "loha"}'})
    paths = {q: Q, c1: "down_blocks.0.resnets.0.conv1", c2: "down_blocks.0.resnets.0.conv2",
             k: Q.replace("to_q", "to_k"), v: Q.replace("to_q", "to_v")}
    return {("unet", paths[n]): d for n, d in delta.items()}


def test_lycoris_loha_lokr_convert_only_with_a_resize_and_exactly_at_their_lora_rank(
        tmp_path, run_cli, assert_one_line_error):
    deltas = lycoris_file(tmp_path / "ly.safetensors")
    code, _, err = run_cli("convert", tmp_path / "ly.safetensors", tmp_path / "o.safetensors")
    assert_one_line_error(code, err, "not a LoRA", "--resize-rank R approximates it")

    code, out, _ = run_cli("convert", tmp_path / "ly.safetensors", tmp_path / "exact.safetensors", "--resize-rank", "320")
    assert code == 0 and "(5 copied as they were)" in out  # LoHa rank 2 -> LoRA rank 4, LoKr -> 4 x 2 and 4 x 40
    weights, meta = load_kohya(tmp_path / "exact.safetensors")
    assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta
    assert weights[("unet", "down_blocks.0.resnets.0.conv1")].down.shape == (4, 320, 3, 3)
    for key, delta in deltas.items():
        m = weights[key]
        torch.testing.assert_close(m.scale * m.up.flatten(1) @ m.down.flatten(1), delta, atol=1e-4, rtol=1e-4)

    done = run_cli("convert", tmp_path / "ly.safetensors", tmp_path / "r2.safetensors", "--resize-rank", "2")[1]
    s = torch.linalg.svdvals(deltas[("unet", Q)].double())
    assert f"{Q}: rank 4 -> 2, energy kept {float((s[:2] ** 2).sum() / (s ** 2).sum()):.2%}" in done
