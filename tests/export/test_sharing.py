"""Shared files' headers (issue 24): the file's own hashes recomputed as each reader computes them, the base
file's hashes and their cache, `export.metadata`'s levels and models named without their folders."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conjure.errors import ConjureError
from conjure.export import sharing
from conjure.export.sharing import base_file_hashes, finish_shared_file, model_name, shareable


def _read(path: Path) -> tuple[dict, bytes]:
    """The header and the bytes after it, as the model spec's reference code reads them (struct "Q" length)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _addnet_legacy(path: Path) -> str:
    """kohya-ss/sd-webui-additional-networks scripts/safetensors_hack.py legacy_hash_file (commit 272029d5): the
    tensors (read straight from the file's bytes) written again with the ss_* keys only, bytes 0x100000..0x110000."""
    header, data = _read(path)
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    tensors = {
        name: torch.frombuffer(bytearray(data[info["data_offsets"][0]:info["data_offsets"][1]]),
                               dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        for name, info in header.items()
    }
    again = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    return hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]


def _lora_file(path: Path, meta: dict[str, str], values: int = 400_000) -> Path:
    tensors = {"lora_unet_a.lora_down.weight": torch.arange(values, dtype=torch.float32).reshape(-1, 8) / values,
               "lora_unet_a.alpha": torch.tensor(4.0)}
    safetensors.torch.save_file(tensors, str(path), meta)
    return path


def test_the_hashes_are_what_each_reader_computes_of_the_final_file(tmp_path):
    path = _lora_file(tmp_path / "a.safetensors", {"ss_network_module": "networks.lora", "ss_network_dim": "8"})
    before = safetensors.torch.load_file(str(path))
    meta = finish_shared_file(path, {"modelspec.description": "x" * 5000, "ss_seed": "3"})
    header, data = _read(path)
    assert header["__metadata__"] == meta and meta["ss_seed"] == "3"
    digest = hashlib.sha256(data).hexdigest()  # additional-networks hash_file: the bytes after the header
    assert meta["sshs_model_hash"] == digest and meta["modelspec.hash_sha256"] == f"0x{digest}"
    assert meta["sshs_legacy_hash"] == _addnet_legacy(path)
    after = safetensors.torch.load_file(str(path))  # the longer header left every tensor where readers find it
    assert all(torch.equal(after[k], v) for k, v in before.items())
    again = finish_shared_file(path)  # a second pass (a converted file) drops the old hashes and finds the same
    assert {k: again[k] for k in sharing.HASH_KEYS} == {k: meta[k] for k in sharing.HASH_KEYS}


def test_an_embedding_gets_the_model_spec_hash_and_no_ss_keys(tmp_path):
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"emb_params": torch.ones(2, 8)}, str(path), {"modelspec.title": "e"})
    meta = finish_shared_file(path, {"ss_seed": "3", "modelspec.trigger_phrase": "<e>"})
    assert meta["modelspec.trigger_phrase"] == "<e>" and not any(k.startswith(("ss_", "sshs_")) for k in meta)
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(_read(path)[1]).hexdigest()
    assert finish_shared_file(path, level="none") == {"modelspec.title": "e"}  # none: apps hash it themselves


def test_no_legacy_hash_where_its_range_reaches_into_the_header(tmp_path):
    path = _lora_file(tmp_path / "a.safetensors", {"ss_network_module": "networks.lora",
                                                   "ss_tag_frequency": "y" * 0x100000})
    meta = finish_shared_file(path)
    assert "sshs_legacy_hash" not in meta and "sshs_model_hash" in meta


def test_base_file_hashes_are_kohyas_and_read_once_per_file(tmp_path, monkeypatch):
    model = tmp_path / "models" / "base.safetensors"
    model.parent.mkdir()
    model.write_bytes(os.urandom(0x120000))
    raw = model.read_bytes()
    expected = {"ss_sd_model_hash": hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8],  # A1111 model_hash
                "ss_new_sd_model_hash": hashlib.sha256(raw).hexdigest()}  # kohya calculate_sha256
    assert base_file_hashes(str(model)) == expected
    monkeypatch.setattr(sharing, "_sha256", lambda *a, **k: pytest.fail("hashed again"))
    assert base_file_hashes(str(model)) == expected
    os.utime(model, ns=(1, 1))  # another modification time: hashed again
    with pytest.raises(pytest.fail.Exception):
        base_file_hashes(str(model))
    assert base_file_hashes(str(tmp_path)) == {} and base_file_hashes("runwayml/stable-diffusion-v1-5") == {}


def test_models_are_named_without_their_folders(tmp_path):
    (tmp_path / "sd15").mkdir()
    assert model_name("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert model_name(f"{tmp_path}/sd15/") == "sd15"
    assert model_name("~/models/v1-5.safetensors") == "v1-5.safetensors"
    assert shareable({"conjure.base_model": str(tmp_path / "sd15"), "x": "/home/someone/data"}) == {
        "conjure.base_model": "sd15", "x": "data"}


def test_the_levels_keep_what_they_say():
    meta = {"ss_network_module": "networks.lora", "ss_network_args": "{}", "ss_seed": "3", "ss_output_name": "o",
            "ss_tag_frequency": "{}", "modelspec.architecture": "a", "modelspec.title": "t",
            "modelspec.description": "d", "modelspec.trigger_phrase": "zwx", "conjure.base_model": "b",
            "conjure.rank": "4", "conjure.unet_layers_per_block": "1", "lora_adapter_metadata": "{}"}
    assert shareable(meta, "full") == meta
    assert set(shareable(meta, "minimal")) == {"ss_network_module", "ss_network_args", "ss_output_name",
                                               "modelspec.architecture", "modelspec.title", "modelspec.description",
                                               "modelspec.trigger_phrase", "conjure.rank",
                                               "conjure.unet_layers_per_block", "lora_adapter_metadata"}
    assert set(shareable(meta, "none")) == {"ss_network_module", "ss_network_args", "modelspec.architecture",
                                            "modelspec.title", "conjure.unet_layers_per_block",
                                            "lora_adapter_metadata"}
    with pytest.raises(ConjureError, match="export.metadata"):
        shareable(meta, "some")


def test_a_converted_file_names_no_folder_and_states_its_own_hashes(tmp_path):
    from conjure.adapters import LoraModule
    from conjure.export.convert import ConvertOptions, convert
    from conjure.export.kohya import save_kohya

    g = torch.Generator().manual_seed(0)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    weights = {("unet", path): LoraModule(torch.randn(4, 768, generator=g), torch.randn(320, 4, generator=g), alpha=4.0)}
    old = {"ss_network_module": "networks.lora", "conjure.base_model": "/home/someone/models/v1-5.safetensors"}
    src = save_kohya(tmp_path / "old.safetensors", weights, old, "sd1")
    finish_shared_file(src)  # hashes of the fp32 file
    convert(src, tmp_path / "half.safetensors", ConvertOptions(dtype="fp16"))
    header, data = _read(tmp_path / "half.safetensors")
    meta = header["__metadata__"]
    assert meta["conjure.base_model"] == "v1-5.safetensors"  # a file of an older conjure, named as it is shared
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # its own bytes', not the source's
