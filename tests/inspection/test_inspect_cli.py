"""`conjure inspect` as users meet it: the table, --json, and every bad file ending in one clear line (exit 2)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from conjure.cli import main

KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def run(capsys, *args):
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err and "unexpected" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({f"{KOHYA}.lora_down.weight": torch.zeros(4, 768), f"{KOHYA}.lora_up.weight": torch.zeros(320, 4),
               f"{KOHYA}.alpha": torch.tensor(2.0)},
              str(path), {"ss_tag_frequency": json.dumps({"1_img": {"zq": 9, "photo": 3}}), "ss_steps": "500"})
    return path


def test_table_and_json(capsys, lora):
    code, out, _ = run(capsys, lora)
    assert code == 0
    for line in ("kind      LoRA", "family    Stable Diffusion 1.x (sd1)", "rank      4", "alpha     2",
                 "unet: 1 modules (kohya names): down_blocks 0 (1)", "trigger   zq, photo", "ss_steps: 500",
                 "InvokeAI             ok: 3 of 3 tensors applied"):
        assert line in out, out
    code, out, _ = run(capsys, lora, "--json")
    report = json.loads(out)
    assert code == 0 and report["family"] == "sd1" and report["trigger_words"] == ["zq", "photo"]
    assert report["modules"][0]["targets"] == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert [a["complete"] for a in report["apps"]] == [True] * 4


def _truncated(tmp_path, lora):
    data = lora.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    return tmp_path / "t.safetensors"


def _pickle_with_code(tmp_path, lora):
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "extra": argparse.Namespace(a=1)}, tmp_path / "e.pt")
    return tmp_path / "e.pt"


def _file(name, data: bytes):
    def make(tmp, lora):
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


CASES = {
    "missing": (lambda tmp, lora: tmp / "nope.safetensors", "no such file"),
    "folder": (lambda tmp, lora: tmp, "is a folder"),
    "truncated": (_truncated, "cannot read"),
    "empty": (_file("e.safetensors", b""), "cannot read"),
    "text": (_file("x.safetensors", b"hello there"), "cannot read"),
    "huge-header": (_file("h.safetensors", (10**12).to_bytes(8, "little") + b"{}"), "cannot read"),
    "zip-garbage": (_file("x.pt", b"PK\x03\x04junk"), "cannot read"),
    "pickle-with-code": (_pickle_with_code, "--allow-pickle"),
    "not-an-adapter": (lambda tmp, lora: save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp / "m.safetensors"))
                       or tmp / "m.safetensors", "holds no LoRA"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_files_end_in_one_clear_line(capsys, tmp_path, lora, case):
    prepare, needle = CASES[case]
    code, _, err = run(capsys, prepare(tmp_path, lora))
    assert needle in one_line_error(code, err)


def test_allow_pickle_opens_a_trusted_pickle_and_plain_pt_embeddings_need_no_permission(capsys, tmp_path, lora):
    path = _pickle_with_code(tmp_path, lora)
    code, out, _ = run(capsys, path, "--allow-pickle")
    assert code == 0 and "kind      embedding" in out and "Stable Diffusion 1.x" in out
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "zq", "step": 100}, tmp_path / "a.pt")
    code, out, _ = run(capsys, tmp_path / "a.pt")
    assert code == 0 and "embedding (file name): 2 vectors; emb_params [2, 768]" in out, out
    torch.save({"string_to_param": {"*": torch.zeros(1, 1024)}}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    code, out, _ = run(capsys, tmp_path / "old.pt")  # the pre-1.6 pickle, which cannot be memory-mapped
    assert code == 0 and "Stable Diffusion 2.x" in out, out
