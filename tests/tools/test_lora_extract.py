"""`conjure lora extract`: a known low-rank difference (Linear, 1x1 and 3x3 convs, a text-encoder layer) comes back
exactly, in the kohya layout, untouched modules skipped; the energy report against a hand SVD; --energy / --conv-rank
pick the ranks; refusals."""

import pytest
import torch
from safetensors import safe_open

from conjure.export.convert import apply_lora
from conjure.export.kohya import load_kohya
from conjure.export.kohya_names import resolve_module_path
from conjure.models.loading import load_base_model
from conjure.models.tiny import save_model_folder
from conjure.tools.extract import extract

CHANGED = {  # component, module -> rank of the difference added
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"): 3,
    ("unet", "down_blocks.0.resnets.0.conv1"): 2,  # 3x3
    ("unet", "down_blocks.0.attentions.0.proj_in"): 3,
    ("unet", "conv_in"): 1,
    ("text_encoder", "text_model.encoder.layers.0.mlp.fc1"): 2,
}


def low_rank(weight, rank, g):
    up = torch.randn(weight.shape[0], rank, generator=g)
    down = torch.randn(rank, weight[0].numel(), generator=g)
    return 0.05 * (up @ down).reshape(weight.shape)


@pytest.fixture(scope="module")
def tuned(tiny_models, tmp_path_factory):
    """(base folder, tuned folder, {key: tuned weight}) with CHANGED's differences added to the tiny SD1 model."""
    base = tiny_models("sd1")
    model = load_base_model(str(base))
    g = torch.Generator().manual_seed(0)
    weights = {}
    for (component, path), rank in CHANGED.items():
        module = model.components[component].get_submodule(resolve_module_path(path, model.components[component]))
        with torch.no_grad():
            module.weight += low_rank(module.weight, rank, g)
        weights[(component, path)] = module.weight.detach().clone()
    folder = tmp_path_factory.mktemp("tuned")
    parts = {**model.components, "safety_checker": None, "feature_extractor": None, "image_encoder": None}
    return base, save_model_folder("sd1", parts, folder), weights


def test_a_known_low_rank_difference_comes_back_exactly(tuned, tmp_path):
    base, folder, expected = tuned
    out = tmp_path / "x.safetensors"
    done = extract(str(base), str(folder), out, rank=4, save_dtype="fp32")
    assert len(done.modules) == len(CHANGED) and done.skipped > 50
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1") for k in keys)
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"][2:] == (3, 3)  # LoCon layout
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"][2:] == (1, 1)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_training_comment"].endswith(f"{folder.name} minus {base.name}")
    weights, _ = load_kohya(out)
    assert len(weights) == len(CHANGED) and all(m.rank == 4 and m.alpha == 4 for m in weights.values())
    model = load_base_model(str(base))
    apply_lora(model.components, weights)
    for (component, path), tuned_weight in expected.items():
        module = model.components[component].get_submodule(resolve_module_path(path, model.components[component]))
        torch.testing.assert_close(module.weight, tuned_weight, atol=1e-5, rtol=1e-5)
    assert all(r.energy == pytest.approx(1.0) for r in done.modules)


def test_energy_report_matches_a_hand_svd_and_energy_picks_the_rank(tuned, tmp_path):
    base, folder, expected = tuned
    key = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    base_weight = load_base_model(str(base)).components["unet"].get_submodule(key[1]).weight.detach()
    s = torch.linalg.svdvals(expected[key] - base_weight)
    energy = (s * s).cumsum(0) / (s * s).sum()

    done = extract(str(base), str(folder), tmp_path / "r1.safetensors", rank=1, conv_rank=2, save_dtype="fp32")
    report = {r.module: r for r in done.modules}
    assert report["unet." + key[1]].energy == pytest.approx(float(energy[0]), rel=1e-5)
    assert report["unet." + key[1]].new_rank == 1 and report["unet." + key[1]].old_rank == min(base_weight.shape)
    assert report["unet.down_blocks.0.resnets.0.conv1"].new_rank == 2  # --conv-rank for the 3x3 conv
    assert done.mean_energy == pytest.approx(sum(r.energy for r in done.modules) / len(done.modules))
    assert done.min_energy.energy == min(r.energy for r in done.modules) < 1

    wanted = float(energy[1]) - 1e-4  # just under the first two values' energy: rank 2
    done = extract(str(base), str(folder), tmp_path / "e.safetensors", energy=wanted, save_dtype="fp32")
    assert {r.module: r.new_rank for r in done.modules}["unet." + key[1]] == 2
    assert all(r.energy >= wanted for r in done.modules)


def test_cli_prints_the_report_and_refuses_same_models(tuned, tmp_path, run_cli, assert_one_line_error):
    base, folder, _ = tuned
    code, out, err = run_cli("lora", "extract", base, folder, "--rank", "2", "--to", tmp_path / "x.safetensors")
    assert code == 0, err
    assert "unet.conv_in: rank 2 of 32, energy kept 100.00%" in out
    assert "extracted 5 modules; energy kept: mean" in out and "modules with no difference skipped" in out
    code, _, err = run_cli("lora", "extract", base, base, "--rank", "2", "--to", tmp_path / "y.safetensors")
    assert_one_line_error(code, err, "the same weights: nothing to extract")
    code, _, err = run_cli("lora", "extract", base, folder, "--to", tmp_path / "y.safetensors")
    assert_one_line_error(code, err, "--rank R or --energy E")
    import json
    import shutil

    odd = shutil.copytree(base, tmp_path / "odd")  # a component class that cannot be built
    index = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "NoSuchModel"]}))
    code, _, err = run_cli("lora", "extract", odd, folder, "--rank", "2", "--to", tmp_path / "y.safetensors")
    assert_one_line_error(code, err, "unet from its config")


def test_streaming_reads_one_layer_at_a_time_and_writes_what_the_whole_models_give(tuned, tmp_path, monkeypatch):
    """Each layer's two weights are read from the memory-mapped folders when needed and dropped after (never more
    than two read tensors alive at an SVD); the file equals the one from both models loaded whole."""
    import weakref

    import conjure.merging.sources as sources
    import conjure.tools.extract as extract_mod

    base, folder, _ = tuned
    alive, at_svd, reads = weakref.WeakSet(), [], []
    real_tensor, real_module = sources.Source.tensor, extract_mod.extract_module

    def tensor(self, component, key):
        reads.append((self.name, component, key))
        t = real_tensor(self, component, key)
        alive.add(t)
        return t

    def module(diff, rank, energy):
        at_svd.append(len(alive))
        return real_module(diff, rank, energy)

    with monkeypatch.context() as patch:
        patch.setattr(sources.Source, "tensor", tensor)
        patch.setattr(extract_mod, "extract_module", module)
        extract(str(base), str(folder), tmp_path / "streamed.safetensors", rank=4, save_dtype="fp32")
    assert len(at_svd) == len(CHANGED) and max(at_svd) == 2
    assert len(reads) == len(set(reads)) and all(key.endswith(".weight") for _, _, key in reads)

    with monkeypatch.context() as patch:  # the whole-model path: every model loaded whole, as single files are
        patch.setattr(sources, "open_source", lambda name, config=None: sources._loaded_source(name, config))
        extract(str(base), str(folder), tmp_path / "whole.safetensors", rank=4, save_dtype="fp32")
    with safe_open(str(tmp_path / "streamed.safetensors"), "pt") as a, safe_open(str(tmp_path / "whole.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_fixed_rank_far_below_the_layer_uses_svd_lowrank_and_reports_the_energy_exactly(monkeypatch):
    """--rank R alone, R + 10 <= a quarter of the layer: a difference of rank <= R still comes back exactly; of a full-
    rank difference, the energy reported is exactly what the written factors keep (against the Frobenius norm), and
    near the best rank-R energy; the same input gives the same factors."""
    from conjure.tools.extract import extract_module

    calls, real = [], torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    known = torch.randn(256, 5, generator=g) @ torch.randn(5, 320, generator=g)
    module, kept = extract_module(known, 8, None)
    assert module.rank == 8 and kept == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(module.up @ module.down, known, atol=1e-4, rtol=1e-4)

    spectrum = torch.logspace(0, -2, 256)  # a decaying spectrum, as fine-tune differences have
    q1, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(320, 256, generator=g))
    full = (q1 * spectrum) @ q2.T
    module, kept = extract_module(full, 16, None)
    written = module.up @ module.down
    assert kept == pytest.approx(float(written.square().sum() / full.square().sum()), rel=1e-4)
    best = float((spectrum[:16] ** 2).sum() / (spectrum**2).sum())
    assert best * 0.99 <= kept <= best + 1e-6
    again, _ = extract_module(full, 16, None)
    assert torch.equal(again.up, module.up) and torch.equal(again.down, module.down)
    assert len(calls) == 3
    extract_module(full[:96], 16, None)  # 16 + 10 > 96 / 4: the exact SVD
    assert len(calls) == 3
