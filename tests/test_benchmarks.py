"""The benchmark scripts run end to end at their smallest size, so they cannot rot between the rare runs on a GPU."""

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch):
    """Import a script of benchmarks/ (which imports bench_common from its own folder); the scripts pin torch's
    threads for CPU figures, which must not leak into the tests after this one."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield importlib.import_module
    torch.set_num_threads(threads)


def test_flux_memory_runs_on_the_tiny_flux(benchmark, tmp_path):
    flux_memory = benchmark("flux_memory")
    out = tmp_path / "bench.md"
    assert flux_memory.main(["--size", "tiny", "--steps", "2", "--write", str(out)]) == 0
    text = out.read_text()
    assert "### FLUX.1 LoRA memory and speed, tiny transformer" in text
    assert "The text encoders and the VAE are not on the GPU" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["bf16"].endswith("| yes |"), rows["bf16"]  # trained, with a finite loss
    assert "in 34 layers" in rows["bf16"]  # attention_mlp on 2 double + 2 single blocks: 2 x 12 + 2 x 5
    if not torch.cuda.is_available():
        assert rows["float8"].endswith("| yes |"), rows["float8"]  # float8 trains on the CPU too (upcast per matmul)
        assert "| nf4 | not run: needs a CUDA GPU | <= 12 GiB (full size) |" in rows["nf4"]


def test_versus_diffusers_times_a_conjure_run_through_the_optimizer_hook(benchmark, tiny_models, tmp_path):
    """The side-by-side's conjure half (the diffusers scripts are fetched only for a benchmark run): its config
    trains, and the runner's global optimizer hook sees every step."""
    versus = benchmark("versus_diffusers")
    folders = versus.make_images(tmp_path / "images")
    out = tmp_path / "out"
    out.mkdir()
    config = versus.conjure_config("lora", tiny_models("sd1"), folders["lora"], out, steps=30, cached=True)
    result = versus.timed(["conjure", "train", str(config)], None, out / "log.txt", pieces=True)
    assert set(result) == {"startup_s", "steps_s", "cpu_steps_s", "wall_s", "pieces_ms"}, result
    assert 0 < result["startup_s"] < result["wall_s"] and result["steps_s"] > 0 and result["cpu_steps_s"] > 0
    assert len(json.loads((out / "log.json").read_text())["steps"]) == 30
    pieces = result["pieces_ms"]  # cached text: its one caption was encoded at the first step, before the window
    assert set(pieces) == {"step", *versus.PIECES}
    assert 0 < pieces["UNet forward"] < pieces["step"] and pieces["backward"] > 0 and pieces["optimizer step"] > 0
    assert pieces["text encoder forward"] == 0


def test_startup_times_each_import_stage_in_a_fresh_process(benchmark):
    """benchmarks/startup.py's import floor (its real stages import torch, transformers and diffusers: seconds;
    two light ones here) and its table."""
    startup = benchmark("startup")
    stages = (("json", "import json"), ("a second stage", "import fractions"))
    floor = startup.import_floor(2, stages)
    assert len(floor) == 2 and all(len(run) == 3 and all(0 <= s < 30 for s in run) for run in floor)
    text = startup.report(floor, {"this version": [(3.0, 2.5), (2.0, 1.5), (4.0, 3.5)]}, 2, stages)
    assert "| this version | 3.00 / 2.00 / 4.00 | 3.00 | 2.50 / 1.50 / 3.50 | 2.50 |" in text
    assert "| a second stage | " in text
    assert "| all of it | " in text


def test_load_memory_streams_a_readable_checkpoint_of_the_given_shapes(benchmark, tmp_path, monkeypatch):
    """benchmarks/load_memory.py writes its full-size file tensor by tensor in the safetensors layout (here with
    two small shapes in place of a model's): safetensors reads it back, fp16, of those shapes."""
    from safetensors.torch import load_file

    script = benchmark("load_memory")
    shapes = {"model.diffusion_model.out.2.weight": (4, 320, 3, 3), "first_stage_model.decoder.conv_out.bias": (3,)}
    monkeypatch.setattr(script, "checkpoint_shapes", lambda family: shapes)
    path = tmp_path / "model.safetensors"
    assert script.write_checkpoint("sd1", path) == path.stat().st_size
    state = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert all(v.dtype == torch.float16 and 0 < float(v.float().std()) < 0.1 for v in state.values() if v.numel() > 3)


def test_flux_load_memory_writes_bfl_names_that_diffusers_converts(benchmark, monkeypatch):
    """benchmarks/flux_load_memory.py --size full writes the transformer as BFL's flux1-dev.safetensors: FLUX.1-dev's
    780 tensors and 11.9B weights, and diffusers' own converter (what from_single_file runs) turns those names and
    shapes into exactly FluxTransformer2DModel's state dict (checked on the meta device, two blocks of each kind)."""
    import math

    from conjure import families
    from conjure.models.reference import transformer_config

    script = benchmark("flux_load_memory")
    config = {**transformer_config(families.get("flux").reference, guidance=True), "patch_size": 1}
    shapes = script.bfl_shapes(config)
    assert len(shapes) == 780 and sum(math.prod(s) for s in shapes.values()) == 11_901_408_320
    assert shapes["double_blocks.18.img_attn.qkv.weight"] == (9216, 3072)
    assert shapes["single_blocks.37.linear1.weight"] == (21504, 3072)
    two = {**config, "num_layers": 2, "num_single_layers": 2}
    script.check_bfl_shapes(two)
    right = script.bfl_shapes
    monkeypatch.setattr(script, "bfl_shapes", lambda c: {**right(c), "single_blocks.1.linear2.weight": (3072, 12288)})
    with pytest.raises(SystemExit, match="does not convert"):  # a wrong shape is caught
        script.check_bfl_shapes(two)


def test_flux_load_memory_writes_t5_once_and_kills_a_run_past_its_cap(benchmark):
    """The T5 file holds `shared` once (transformers ties encoder.embed_tokens to it), CLIP-L's names carry the
    `text_model.` prefix of real folders; and a run whose resident set passes the cap is killed, not left to
    take the shared machine's memory."""
    import subprocess
    import sys

    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    script = benchmark("flux_load_memory")
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4, vocab_size=10))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=10))
    t5_names = script.stored_shapes(t5)
    assert t5_names["shared.weight"] == (10, 8) and "encoder.embed_tokens.weight" not in t5_names
    assert all(k.startswith("text_model.") for k in script.stored_shapes(clip, "text_model."))
    hog = subprocess.Popen([sys.executable, "-c", "import time; a = bytearray(300 * 2**20); time.sleep(60)"])
    assert script.watch(hog, 100 * 2**20, 30).startswith("killed at 0.")
    assert hog.returncode is not None
