"""`conjure lora combine`: the combined file applied equals the files applied in turn at their weights (exact rank
concatenation, modules in only some files kept, one alpha), --rank resizes by SVD, DoRA and mixed families are
refused."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conjure.adapters import LoraModule
from conjure.export.convert import apply_lora
from conjure.export.embeddings import bundle_tensors
from conjure.export.kohya import load_kohya, save_kohya
from conjure.export.peft import save_peft
from conjure.models.tiny import build_tiny_components
from conjure.tools.combine import combine
from conjure.tools.lora_inputs import LoraInput


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL's UNet and text encoders (default layout: one layer per block, recorded in the files)."""
    parts = build_tiny_components("sdxl")
    return {k: parts[k] for k in ("unet", "text_encoder", "text_encoder_2")}


def random_lora(models, paths, rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for component, path in paths:
        w = models[component].get_submodule(path).weight
        kernel = (1, 1) if w.dim() == 4 else ()
        weights[(component, path)] = LoraModule(down=torch.randn(rank, *w.shape[1:], generator=g),
                                                up=0.1 * torch.randn(w.shape[0], rank, *kernel, generator=g),
                                                alpha=alpha)
    return weights


SHARED = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"), ("unet", "conv_in"),
          ("unet", "down_blocks.0.resnets.0.conv1")]
ONLY_A = [("text_encoder", "encoder.layers.0.self_attn.q_proj")]
ONLY_B = [("unet", "up_blocks.0.resnets.0.conv_shortcut")]


def files(sdxl, tmp_path):
    a = random_lora(sdxl, SHARED + ONLY_A, rank=4, alpha=2.0, seed=0)
    b = random_lora(sdxl, SHARED + ONLY_B, rank=2, alpha=8.0, seed=1)
    save_kohya(tmp_path / "a.safetensors", a, {}, "sdxl", sdxl["unet"].config)
    save_kohya(tmp_path / "b.safetensors", b, {}, "sdxl", sdxl["unet"].config)
    return a, b


def weights_of(models, keys):
    from conjure.export.kohya_names import resolve_module_path

    return {(c, p): models[c].get_submodule(resolve_module_path(p, models[c])).weight.detach().clone()
            for c, p in keys}


def test_combined_file_equals_the_files_applied_in_turn(sdxl, tmp_path):
    a, b = files(sdxl, tmp_path)
    out = tmp_path / "ab.safetensors"
    done = combine([LoraInput(tmp_path / "a.safetensors", 0.7), LoraInput(tmp_path / "b.safetensors", -1.5)], out,
                   save_dtype="fp32")
    assert done.ranks == {**{f"{c}.{p}": 6 for c, p in SHARED}, **{f"{c}.{p}": 4 for c, p in ONLY_A},
                          **{f"{c}.{p}": 2 for c, p in ONLY_B}}
    with safe_open(str(out), "pt") as f:
        alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
        meta = f.metadata()
    assert alphas == {6.0} and meta["conjure.unet_layers_per_block"] == "1"  # one alpha; the tiny layout kept
    # shareable: the inputs by name, not by folder (issue 24), and the file's own hash
    assert meta["ss_training_comment"].endswith(": a.safetensors:0.7, b.safetensors:-1.5")
    assert not any(str(tmp_path) in v for v in meta.values()) and len(meta["sshs_model_hash"]) == 64
    combined, _ = load_kohya(out)
    in_turn, at_once = copy.deepcopy(sdxl), copy.deepcopy(sdxl)
    apply_lora(in_turn, a, 0.7)
    apply_lora(in_turn, b, -1.5)
    apply_lora(at_once, combined)
    keys = SHARED + ONLY_A + ONLY_B
    expected, got, base = weights_of(in_turn, keys), weights_of(at_once, keys), weights_of(sdxl, keys)
    for key in keys:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)
        assert (expected[key] - base[key]).abs().max() > 1e-2


def test_rank_resizes_by_svd_of_the_combined_update(sdxl, tmp_path):
    files(sdxl, tmp_path)
    inputs = [LoraInput(tmp_path / "a.safetensors"), LoraInput(tmp_path / "b.safetensors")]
    combine(inputs, tmp_path / "exact.safetensors", save_dtype="fp32")
    done = combine(inputs, tmp_path / "r3.safetensors", rank=3, save_dtype="fp32")
    assert max(done.ranks.values()) == 3 and done.ranks["unet.up_blocks.0.resnets.0.conv_shortcut"] == 2
    exact, _ = load_kohya(tmp_path / "exact.safetensors")
    resized, _ = load_kohya(tmp_path / "r3.safetensors")
    key = ("unet", SHARED[0][1])
    update = exact[key].scale * exact[key].up.flatten(1) @ exact[key].down.flatten(1)
    u, s, vh = torch.linalg.svd(update)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # the best rank-3 approximation (Eckart-Young)
    torch.testing.assert_close(resized[key].scale * resized[key].up @ resized[key].down, best, atol=1e-5, rtol=1e-4)
    record = {r.module: r for r in done.resized}["unet." + key[1]]
    assert record.energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-4)


def test_refusals(sdxl, tmp_path, run_cli, assert_one_line_error):
    files(sdxl, tmp_path)
    dora = random_lora(sdxl, SHARED, rank=2, alpha=2.0, seed=3)
    for m in dora.values():
        m.magnitude = torch.ones(m.up.shape[0])
    save_peft(tmp_path / "dora.safetensors", dora, {}, "sdxl")
    code, _, err = run_cli("lora", "combine", tmp_path / "a.safetensors", f"{tmp_path / 'dora.safetensors'}:0.5",
                           "--to", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "dora.safetensors is a DoRA file", "do not combine")
    sd1 = build_tiny_components("sd1")
    save_kohya(tmp_path / "sd1.safetensors", random_lora(sd1, [SHARED[1]], 2, 2.0, 0), {}, "sd1")
    code, _, err = run_cli("lora", "combine", tmp_path / "a.safetensors", tmp_path / "sd1.safetensors",
                           "--to", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "different model families", "sd1.safetensors sd1", "a.safetensors sdxl")
    tensors = load_file(tmp_path / "a.safetensors")
    save_file({**tensors, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    code, _, err = run_cli("lora", "combine", tmp_path / "extra.safetensors", tmp_path / "b.safetensors",
                           "--to", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "extra.safetensors: 1 tensors belong to no LoRA module (first: extra.weight)")
    bundle = bundle_tensors("star", {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)})
    save_file({**tensors, **bundle}, tmp_path / "pivotal.safetensors", metadata=safe_open(
        str(tmp_path / "a.safetensors"), "pt").metadata())
    code, out, err = run_cli("lora", "combine", tmp_path / "pivotal.safetensors", tmp_path / "b.safetensors:0.5",
                             "--to", tmp_path / "out.safetensors")
    assert code == 0 and "5 modules, rank 2-6" in out, err
    assert "pivotal.safetensors bundles the embedding(s) star, which this leaves out" in err
    code, _, err = run_cli("lora", "combine", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                           "--to", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "exists; use --force")
