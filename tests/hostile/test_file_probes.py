"""Probes of the files conjure writes, as an unlucky or careless user meets them (reliability review D4, D12, D13,
D14): a full disk during an export, `--force` over an existing file, export names that climb out of `--to`, `--to`
naming a file, the mode of written files under the user's umask, `tiny-model` into a folder that is not empty.
Each ends in one clear line (exit 2) and leaves the user's files as they were."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conjure.cli import main
from conjure.files import save_safetensors_atomically
from conjure.runs.checkpoints import write_checkpoint


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err and "Errno" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def fake_run(root: Path, files: dict[str, bytes], steps=(2, 4)) -> Path:
    """A run folder whose checkpoints hold `files` (the step number appended to each file's bytes)."""
    run = root / "run"
    for step in steps:
        def write(folder, step=step):
            for name, data in files.items():
                (folder / name).write_bytes(data + b" %d" % step)
            return []
        write_checkpoint(run, step, {"step": step}, write)
    return run


ONE_FILE = {"tok.safetensors": b"x" * 5000}
PIVOTAL = {"lora.safetensors": b"l" * 5000, "tok.safetensors": b"t" * 5000}


@pytest.fixture
def full_disk(monkeypatch):
    """Every copy writes part of the file, then the disk is full (ENOSPC), as a small tmpfs did in the review.
    `after`: how many copies succeed first."""
    state = {"after": 0}

    def fill(write_part):
        if state["after"] > 0:
            state["after"] -= 1
            return False
        write_part()
        raise OSError(errno.ENOSPC, "No space left on device")

    real_copyfileobj = shutil.copyfileobj

    def copyfileobj(fsrc, fdst, length=0):
        if not fill(lambda: fdst.write(fsrc.read(1000))):
            real_copyfileobj(fsrc, fdst)

    real_copy2 = shutil.copy2

    def copy2(src, dst, **kwargs):
        if not fill(lambda: Path(dst).write_bytes(Path(src).read_bytes()[:1000])):
            return real_copy2(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfileobj", copyfileobj)
    monkeypatch.setattr(shutil, "copy2", copy2)
    return state


def test_export_on_a_full_disk_leaves_no_partial_file_and_names_the_destination(capsys, tmp_path, full_disk):
    run, out = fake_run(tmp_path, ONE_FILE), tmp_path / "out"
    line = one_line_error(*run_cli(capsys, "export", run, "--step", 4, "--to", out)[::2])
    assert str(out / "tok.safetensors") in line and "disk full" in line
    assert "checkpoints" not in line and "last complete checkpoint" not in line
    assert list(out.iterdir()) == []  # no truncated file (the retry would refuse it as existing), no temporary


def test_export_force_on_a_full_disk_keeps_the_old_file(capsys, tmp_path, full_disk):
    run, out = fake_run(tmp_path, ONE_FILE), tmp_path / "out"
    out.mkdir()
    (out / "tok.safetensors").write_bytes(b"the user's old file")
    one_line_error(*run_cli(capsys, "export", run, "--step", 4, "--to", out, "--force")[::2])
    assert [p.name for p in out.iterdir()] == ["tok.safetensors"]
    assert (out / "tok.safetensors").read_bytes() == b"the user's old file"


def test_export_of_several_files_on_a_full_disk_writes_none_of_them(capsys, tmp_path, full_disk):
    run, out = fake_run(tmp_path, PIVOTAL), tmp_path / "out"
    out.mkdir()
    (out / "tok.safetensors").write_bytes(b"old embedding")
    full_disk["after"] = 1  # the LoRA copies, the embedding does not fit
    one_line_error(*run_cli(capsys, "export", run, "--step", 2, "--to", out, "--force")[::2])
    assert [p.name for p in out.iterdir()] == ["tok.safetensors"]  # no new LoRA without its embedding
    assert (out / "tok.safetensors").read_bytes() == b"old embedding"


def test_export_force_replaces_every_file_and_plain_export_refuses_before_writing_any(capsys, tmp_path):
    run, out = fake_run(tmp_path, PIVOTAL), tmp_path / "out"
    out.mkdir()
    (out / "tok.safetensors").write_bytes(b"old embedding")
    line = one_line_error(*run_cli(capsys, "export", run, "--step", 2, "--to", out)[::2])
    assert "tok.safetensors exists" in line
    assert [p.name for p in out.iterdir()] == ["tok.safetensors"]  # the LoRA was not copied before the refusal
    assert run_cli(capsys, "export", run, "--step", 4, "--to", out, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors", "tok.safetensors"]
    assert (out / "tok.safetensors").read_bytes() == PIVOTAL["tok.safetensors"] + b" 4"
    assert (out / "lora.safetensors").read_bytes() == PIVOTAL["lora.safetensors"] + b" 4"


@pytest.mark.parametrize("name", ["../evil", "..", "ABSOLUTE/evil", "sub/evil", "..\\evil", ".hidden", ""])
def test_export_name_stays_inside_to(capsys, tmp_path, name):
    run, out = fake_run(tmp_path, ONE_FILE), tmp_path / "box" / "out"
    name = name.replace("ABSOLUTE", str(tmp_path / "box"))
    line = one_line_error(*run_cli(capsys, "export", run, "--step", 4, "--to", out, "--name", name)[::2])
    assert "--name" in line
    assert not (tmp_path / "box" / "evil.safetensors").exists()
    assert not out.exists() or list(out.iterdir()) == []


def test_export_to_an_existing_file_says_not_a_folder(capsys, tmp_path):
    run, target = fake_run(tmp_path, ONE_FILE), tmp_path / "outfile"
    target.write_bytes(b"keep me")
    line = one_line_error(*run_cli(capsys, "export", run, "--step", 4, "--to", target)[::2])
    assert "not a folder" in line and str(target) in line
    assert target.read_bytes() == b"keep me"


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_respect_the_umask(capsys, tmp_path, umask):
    expected = 0o666 & ~umask  # 0644 under umask 022, 0600 under 077: what any program's new file gets
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert mode(plain) == expected
    # the atomic writer: checkpoints' app files, embeddings, LoRA files, latent caches
    written = tmp_path / "w.safetensors"
    save_safetensors_atomically({"emb_params": torch.zeros(1, 4)}, written, {})
    assert mode(written) == expected
    # export: a new file's mode, not the checkpoint file's (copy2 carried the source's 0600 over)
    run = fake_run(tmp_path, ONE_FILE)
    (run / "checkpoints" / "step-000004" / "tok.safetensors").chmod(0o600)
    assert run_cli(capsys, "export", run, "--step", 4, "--to", tmp_path / "out")[0] == 0
    assert mode(tmp_path / "out" / "tok.safetensors") == expected


def test_conversions_respect_the_umask(capsys, tmp_path, umask):
    from conjure.export.kohya import save_kohya
    from conjure.adapters import LoraModule
    from conjure.families import SD1

    src = tmp_path / "in.safetensors"
    module = LoraModule(down=torch.randn(2, 8), up=torch.randn(8, 2), alpha=2.0)
    weights = {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): module}
    save_kohya(src, weights, {}, SD1, {"layers_per_block": 2})
    for to in ("peft", "kohya"):
        out = tmp_path / f"{to}.safetensors"
        assert run_cli(capsys, "convert", src if to == "peft" else tmp_path / "peft.safetensors", out, "--to", to,
                       "--family", "sd1")[0] == 0, capsys.readouterr()
        assert mode(out) == 0o666 & ~umask


def test_tiny_model_refuses_a_folder_that_is_not_empty(capsys, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text("my own model")
    line = one_line_error(*run_cli(capsys, "tiny-model", "sd1", folder)[::2])
    assert "not empty" in line and "--force" in line
    assert (folder / "model_index.json").read_text() == "my own model"
    assert [p.name for p in folder.iterdir()] == ["model_index.json"]


def test_tiny_model_writes_into_an_empty_folder_or_with_force(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert run_cli(capsys, "tiny-model", "sd1", tmp_path / "empty")[0] == 0
    assert run_cli(capsys, "tiny-model", "sd1", tmp_path / "empty", "--force")[0] == 0
    assert (tmp_path / "empty" / "model_index.json").read_text() != ""
