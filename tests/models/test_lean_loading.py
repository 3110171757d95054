"""Lean, offline loading (issue 23): every part loads straight in the run's frozen dtype, which changes nothing
trained, and a single file of each SD family loads with conjure's own configs, with no hub access."""

import json
from pathlib import Path
import os
import re
import subprocess
import sys

import pytest
import torch

from conjure.config import parse_config
from conjure.models.loading import load_base_model
from conjure.runs.events import read_events
from conjure.train.loop import train

FAMILIES = ("sd1", "sd2", "sdxl")


def _fp16_file(ldm, single_file_model, family, path):
    from safetensors.torch import save_file

    folder, parts = single_file_model(family)
    save_file({k: v.to(torch.float16) for k, v in ldm.state_dict(family, parts).items()}, str(path))
    return path, folder


def _ti(base_model, image_folder, out, **basic):
    return {
        "type": "textual_inversion",
        "basic": {"base_model": str(base_model), "output_dir": str(out), "max_train_steps": 2, "seed": 1,
                  "validate_every_n_steps": None, **basic},
        "data": {"source": str(image_folder), "resolution": 64, "batch_size": 2},
        "textual_inversion": {"placeholder_token": "<zq-thing>", "initializer": "dog"},
        # the end's validation as cheap as it gets: one image, one denoising step
        "validation": {"at_start": False, "prompts": ["<zq-thing>"], "seeds": [0], "num_inference_steps": 1,
                       "image_scores": "off"},
        "advanced": {"cpu": True, "mixed_precision": "bf16"},
    }


def _losses(run_dir):
    return [e["loss"] for e in read_events(run_dir / "events.jsonl").events if e["event"] == "step"]


def test_parts_load_in_the_frozen_dtype_as_a_cast_after_loading_would_leave_them(ldm, single_file_model, tmp_path):
    """An fp16 file (and a diffusers folder) read straight into bf16 holds the very weights that float32 loading
    then place_model's cast held; the VAE stays float32."""
    path, folder = _fp16_file(ldm, single_file_model, "sd2", tmp_path / "model.safetensors")
    for source in (path, folder):
        lean = load_base_model(str(source), base_model_config=str(folder), frozen_dtype=torch.bfloat16)
        full = load_base_model(str(source), base_model_config=str(folder))
        for name in ("unet", "text_encoder"):
            lean_state, full_state = lean.components[name].state_dict(), full.components[name].state_dict()
            assert lean_state.keys() == full_state.keys()
            for key, tensor in full_state.items():
                expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
                assert lean_state[key].dtype == expected.dtype and torch.equal(lean_state[key], expected), key
        assert all(p.dtype == torch.float32 for p in lean.vae.parameters())
    # the folder's UNet, read tensor by tensor into a meta-built model (loading._diffusers_part), is diffusers' own
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict()
    assert reference.keys() == full.unet.state_dict().keys()
    assert all(torch.equal(tensor, full.unet.state_dict()[key]) for key, tensor in reference.items())


def test_a_lean_loaded_run_trains_the_same_losses(ldm, single_file_model, image_folder, tmp_path, monkeypatch):
    """The same bf16 run from an fp16 file, loaded lean and loaded as before (float32, then cast by
    place_model): the same losses, bit for bit."""
    import conjure.models.loading as loading

    path, folder = _fp16_file(ldm, single_file_model, "sd1", tmp_path / "model.safetensors")
    config = _ti(path, image_folder, tmp_path / "runs", base_model_config=str(folder))
    lean = _losses(train(parse_config({**config, "basic": {**config["basic"], "run_name": "lean"}})).run_dir)
    load = loading.load_base_model
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **kw: load(*a, **{**kw, "frozen_dtype": None}))
    before = _losses(train(parse_config({**config, "basic": {**config["basic"], "run_name": "before"}})).run_dir)
    assert len(lean) == 2 and lean == before


def test_start_and_end_events_say_the_peak_memory(ti_config, tmp_path):
    """Peak RAM (ru_maxrss) in the start and end events, and no accelerator figure off CUDA."""
    events = read_events(train(parse_config(ti_config(basic={"max_train_steps": 1}))).run_dir / "events.jsonl").events
    start, end = events[0], events[-1]
    assert (start["event"], end["event"]) == ("start", "end")
    assert 100 * 2**20 < start["peak_ram_bytes"] <= end["peak_ram_bytes"]
    assert start["peak_accelerator_bytes"] is None and end["peak_accelerator_bytes"] is None


def test_the_estimate_counts_each_part_in_the_dtype_it_loads_in(lora_config):
    from conjure.estimate.peaks import estimate

    ram = estimate(parse_config(lora_config("sd1", advanced={"cpu": True, "mixed_precision": "bf16"}))).ram
    loaded = {t.name for t in ram if " as loaded (" in t.name}
    assert {"unet as loaded (bfloat16)", "text_encoder as loaded (bfloat16)", "vae as loaded (float32)"} <= loaded


def test_the_shipped_configs_are_the_published_architectures(tmp_path):
    """conjure's configs of the SD families (what a single file loads with offline) are those the full-size
    reference builds from the published configs (`python -m conjure.models.reference` writes them)."""
    from conjure.models.reference import build_reference_components, save_configs
    from conjure.models.single_file import CONFIGS

    versions = ("_diffusers_version", "transformers_version")
    for family in FAMILIES:
        fresh = save_configs(family, build_reference_components(family, device="meta"), tmp_path / family)
        files = sorted(p.relative_to(fresh) for p in fresh.rglob("*.json"))
        assert files == sorted(p.relative_to(CONFIGS / family) for p in (CONFIGS / family).rglob("*.json"))
        for name in files:
            shipped, expected = (json.loads((root / name).read_text()) for root in (CONFIGS / family, fresh))
            assert {k: v for k, v in shipped.items() if k not in versions} == {
                k: v for k, v in expected.items() if k not in versions}, f"{family}/{name}"


# A fresh process: HF_HUB_OFFLINE and HF_HOME are read when huggingface_hub is imported. The configs conjure ships
# are the full-size ones; the tiny files here need theirs, written the same way, in place of them.
OFFLINE_RUNS = """
import json, sys
from pathlib import Path
import conjure.models.single_file as single_file
from conjure.config import parse_config
from conjure.runs.events import read_events
from conjure.train.loop import train
single_file.CONFIGS = Path(sys.argv[1])
for raw in json.loads(Path(sys.argv[2]).read_text()):
    start = read_events(train(parse_config(raw)).run_dir / "events.jsonl").events[0]
    print(json.dumps([start["family"], start["chosen"]["prediction_type"]["from"]]))
"""


def test_a_single_file_of_each_family_trains_offline_with_an_empty_hub_cache(
        write_single_file, single_file_model, image_folder, tmp_path):
    from conjure.models.reference import save_configs
    from tests.models.conftest import train_offline

    configs, runs = tmp_path / "configs", []
    for family in FAMILIES:
        _, parts = single_file_model(family)
        save_configs(family, {k: v for k, v in parts.items() if "tokenizer" not in k}, configs / family)
        path, _ = write_single_file(family, name=family, markers=("v_pred",) if family == "sd2" else ())
        runs.append(_ti(path, image_folder, tmp_path / "runs", run_name=family, max_train_steps=1))
    printed, hf_home = train_offline(OFFLINE_RUNS, configs, runs, tmp_path)
    assert printed == [
        ["sd1", "no 'v_pred' marker in the file"], ["sd2", "file marker 'v_pred'"],
        ["sdxl", "no 'v_pred' marker in the file"]]
    assert not any(hf_home.iterdir())  # nothing fetched or cached


@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_comes_from_the_files_key_names(write_single_file, family):
    from conjure.models.single_file import file_family, file_keys

    path, _ = write_single_file(family, sgm=family == "sd2")
    assert file_family(file_keys(path, None)[0]).name == family


@pytest.mark.parametrize("cut", ["header", "weights"])
def test_a_truncated_single_file_is_one_line(write_single_file, cut):
    """The tensor-by-tensor reader meets the end of a cut file: a ConjureError naming it, no traceback."""
    from conjure.errors import ConjureError

    path, _ = write_single_file("sd1")
    data = path.read_bytes()
    path.write_bytes(data[:100] if cut == "header" else data[: len(data) - 1000])
    why = "header is cut short" if cut == "header" else "the file ends inside tensor"
    with pytest.raises(ConjureError, match=f"checkpoint {re.escape(repr(str(path)))}: .*{why}"):
        load_base_model(str(path))


def test_a_cached_hub_id_loads_lean_as_its_snapshot_folder(tiny_models, tmp_path, monkeypatch):
    """A hub id in the Hugging Face cache (laid out as huggingface_hub lays it out) reads its UNet and VAE from
    the snapshot folder tensor by tensor, as that folder would load, and holds the folder's weights."""
    import shutil

    from huggingface_hub import constants

    from conjure.models.single_file import CheckpointTensors

    folder, commit = tiny_models("sd1"), "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--conjure-test--tiny-sd1"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at each call, not at import
    read = []
    original = CheckpointTensors.read
    monkeypatch.setattr(CheckpointTensors, "read", lambda self, *a, **kw: read.append(self) or original(self, *a, **kw))
    hub = load_base_model("conjure-test/tiny-sd1", frozen_dtype=torch.bfloat16)
    assert [Path(t.path).parent.name for t in read] == ["unet", "vae"]
    assert all(Path(t.path).is_relative_to(repo / "snapshots" / commit) for t in read)
    local = load_base_model(str(folder), frozen_dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        hub_state, local_state = hub.components[name].state_dict(), local.components[name].state_dict()
        assert hub_state.keys() == local_state.keys()
        assert all(torch.equal(t, local_state[k]) and t.dtype == local_state[k].dtype for k, t in hub_state.items())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_parts_read_later_give_the_memory_they_free_back(tmp_path):
    """While LoadedModel.load_pending reads (a transformer streamed in and converted a block at a time), an
    allocation of 128 KiB or more is its own mapping, unmapped when freed, even after glibc raised its mmap
    threshold (here by freeing a 20 MiB block): the freed bf16 blocks no longer stay resident between the float8
    ones (docs/benchmarks.md, FLUX.1-dev full size). Counted by mallinfo2's mapped blocks, in a fresh process."""
    script = """
import ctypes, torch
from conjure import families
from conjure.models.loading import LoadedModel
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mapped_by(size):
    before = libc.mallinfo2().hblks
    kept.append(torch.empty(size, dtype=torch.uint8))
    return libc.mallinfo2().hblks - before
kept = []
big = torch.empty(20 * 2**20, dtype=torch.uint8)
del big  # glibc's dynamic threshold rises past 4 MiB
outside = mapped_by(4 * 2**20)
during = []
model = LoadedModel(families.get("flux"), "x", pending={"transformer": lambda: during.append(mapped_by(4 * 2**20))})
model.load_pending()
print(outside, during)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["0", "[1]"], out.stderr[-2000:]
