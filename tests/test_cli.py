"""The command line: every kind of bad input ends in one clear line on stderr and a non-zero exit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conjure.cli import main
from conjure.runs.events import read_events


def write_config(tmp_path, raw) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "conjure" in capsys.readouterr().out


def test_config_new_check_and_schema(tmp_path, run_cli, assert_one_line_error):
    out_file = tmp_path / "new.yaml"
    assert run_cli("config", "new", "textual_inversion", "-o", out_file)[0] == 0
    code, out, _ = run_cli("config", "check", out_file)
    assert code == 0 and "valid textual_inversion" in out
    code, _, err = run_cli("config", "new", "textual_inversion", "-o", out_file)
    assert_one_line_error(code, err, "exists")
    code, out, _ = run_cli("config", "schema", "textual_inversion")
    assert code == 0 and '"textual_inversion"' in out
    code, out, _ = run_cli("config", "check", out_file, "--set", "basic.seed=5", "--show")
    assert code == 0 and "seed: 5" in out


@pytest.mark.parametrize(
    "text, needle",
    [
        ("type: textual_inversion\nbasic: [unclosed\n", "invalid YAML"),
        ("type: textual_inversion\nbasic:\n  base_model: m\n  seed: abc\n", "basic.seed"),
        ("type: textual_inversion\nbasic:\n  base_modle: m\n", "did you mean 'base_model'"),
    ],
)
def test_bad_yaml_types_and_keys(tmp_path, text, needle, run_cli, assert_one_line_error):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert_one_line_error(*run_cli("train", path)[::2], needle)


def test_missing_data_folder(tmp_path, ti_config, run_cli, assert_one_line_error):
    raw = ti_config(data={"source": str(tmp_path / "nowhere")})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "not found")


def test_empty_data_folder(tmp_path, ti_config, run_cli, assert_one_line_error):
    (tmp_path / "empty").mkdir()
    raw = ti_config(data={"source": str(tmp_path / "empty")})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "no images")


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, ti_config, image_folder, run_cli):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (image_folder / "zero.jpg").write_bytes(b"")
    raw = ti_config(basic={"max_train_steps": 2, "validate_every_n_steps": None}, validation={"at_start": False})
    code, out, err = run_cli("train", write_config(tmp_path, raw))
    assert code == 0, err
    assert "warning: skipping" in err and "broken.png" in err and "zero.jpg" in err
    assert "done: 2 steps" in out


def test_only_corrupt_images(tmp_path, ti_config, run_cli, assert_one_line_error):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    raw = ti_config(data={"source": str(folder)})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "unreadable")


def test_placeholder_already_in_vocabulary(tmp_path, ti_config, run_cli, assert_one_line_error):
    raw = ti_config(textual_inversion={"placeholder_token": "cat"})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "already a token")


def test_initializer_without_tokens(tmp_path, ti_config, run_cli, assert_one_line_error):
    raw = ti_config(textual_inversion={"initializer": "   "})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "initializer")


def test_model_path_that_is_not_a_model(tmp_path, ti_config, image_folder, run_cli, assert_one_line_error):
    raw = ti_config(basic={"base_model": str(image_folder)})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "not a diffusers model")
    raw = ti_config(basic={"base_model": str(tmp_path / "no" / "such" / "model")})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "base model not found")
    raw = ti_config(basic={"base_model": str(image_folder / "0.png")})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "not a .safetensors")


def test_hub_id_offline_is_one_line(tmp_path, ti_config, run_cli, assert_one_line_error):
    raw = ti_config(basic={"base_model": "nobody-here/no-such-model"})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "cannot load base model")


def test_output_folder_not_writable(tmp_path, ti_config, run_cli, assert_one_line_error):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    raw = ti_config(basic={"output_dir": str(blocker / "runs")})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "not writable")


def test_captions_without_the_placeholder(tmp_path, ti_config, image_folder, run_cli, assert_one_line_error):
    for image in image_folder.glob("*.png"):
        image.with_suffix(".txt").write_text("a yellow square")
    # The token goes in front of captions that lack it ...
    raw = ti_config(basic={"max_train_steps": 1})
    assert run_cli("train", write_config(tmp_path, raw))[0] == 0
    # ... unless it is to replace a word, and no caption has that word.
    raw = ti_config(textual_inversion={"replace_word": "sks"}, basic={"max_train_steps": 1})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "replace_word 'sks'")


def test_sdxl_model_is_refused_when_basic_family_names_another(tmp_path, ti_config, run_cli, assert_one_line_error):
    raw = ti_config("sdxl", basic={"family": "sd1"})
    assert_one_line_error(*run_cli("train", write_config(tmp_path, raw))[::2], "sdxl")


def test_a_run_whose_config_has_a_version_1_type_resumes(tmp_path, ti_config, run_cli):
    raw = ti_config(basic={"max_train_steps": 3, "validate_every_n_steps": None}, validation={"at_start": False})
    assert run_cli("train", write_config(tmp_path, raw))[0] == 0
    run_dir = tmp_path / "runs" / "run"

    def as_version_1() -> None:  # the run folder as conjure wrote it before version 2
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (written.pop("type"), written.pop("version")) == ("textual_inversion", 2)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"type": "sd_textual_inversion", **written}))

    as_version_1()
    code, out, err = run_cli("train", "--resume", run_dir, "--set", "basic.max_train_steps=5")
    assert code == 0, err
    assert "done: 5 steps" in out
    assert "warning: type: sd_textual_inversion is now type: textual_inversion with basic.family: auto" in err
    start = [e for e in read_events(run_dir / "events.jsonl").events if e["event"] == "start"][-1]
    assert start["type"] == "textual_inversion" and start["start_step"] == 3
    assert start["migrated"][0].startswith("type: sd_textual_inversion is now")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["version"] == 2
    # `--resume latest` finds the newest run of the config's type, also one whose config.yaml has the old name.
    as_version_1()
    old = {**raw, "type": "sd_textual_inversion", "basic": {**raw["basic"], "run_name": None, "max_train_steps": 6}}
    code, out, err = run_cli("train", write_config(tmp_path, old), "--resume", "latest")
    assert code == 0 and "done: 6 steps" in out, err


def test_export_picks_a_step(tmp_path, ti_config, run_cli, assert_one_line_error):
    raw = ti_config(basic={"validate_every_n_steps": None}, validation={"at_start": False})
    assert run_cli("train", write_config(tmp_path, raw))[0] == 0
    run_dir = tmp_path / "runs" / "run"
    code, out, _ = run_cli("export", run_dir, "--step", 3, "--to", tmp_path / "app")
    assert code == 0 and (tmp_path / "app" / "zq-thing.safetensors").is_file()
    code, _, err = run_cli("export", run_dir, "--step", 3, "--to", tmp_path / "app")
    assert_one_line_error(code, err, "exists")
    code, _, _ = run_cli("export", run_dir, "--step", "latest", "--to", tmp_path / "app", "--name", "mine")
    assert code == 0 and (tmp_path / "app" / "mine.safetensors").is_file()
    code, _, err = run_cli("export", run_dir, "--step", 4, "--to", tmp_path / "app")
    assert_one_line_error(code, err, "no checkpoint at step 4", "3, 6")


def test_tiny_model_command(tmp_path, run_cli):
    code, out, _ = run_cli("tiny-model", "sd2", tmp_path / "m")
    assert code == 0 and (tmp_path / "m" / "model_index.json").is_file()


def _conjure(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "conjure", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs,
    )


def test_subprocess_error_has_no_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("type: nope\n")
    proc = _conjure("train", path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().startswith("error: type: unknown config type") and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, ti_config):
    raw = ti_config(
        basic={"max_train_steps": 400, "save_every_n_steps": 1000, "validate_every_n_steps": None},
        validation={"at_start": False},
    )
    config = write_config(tmp_path, raw)
    proc = _conjure("train", config)
    events = tmp_path / "runs" / "run" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if events.exists() and sum(e["event"] == "step" for e in read_events(events).events) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: conjure train --resume" in err and "Traceback" not in err
    stopped = [e for e in read_events(events).events if e["event"] == "stopped"]
    assert stopped and (tmp_path / "runs" / "run" / "checkpoints" / f"step-{stopped[0]['step']:06d}").is_dir()
    proc = _conjure("train", "--resume", tmp_path / "runs" / "run", "--set", "basic.max_train_steps=" + str(stopped[0]["step"] + 2))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"done: {stopped[0]['step'] + 2} steps" in out


def test_closing_the_terminal_saves_a_checkpoint_and_stops_like_sigterm(tmp_path, ti_config):
    # Issue 21, D15: SIGHUP (the terminal closed) killed the run at once, losing the steps since its last
    # checkpoint. And writes to a closed terminal fail (EIO): the progress bar's next redraw would end the
    # run as failed, so output that went to the terminal now goes nowhere.
    import pty
    import threading

    raw = ti_config(
        basic={"max_train_steps": 400, "save_every_n_steps": 1000, "validate_every_n_steps": None},
        validation={"at_start": False},
    )
    master, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conjure", "train", str(write_config(tmp_path, raw))],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    os.close(terminal)

    def drain():  # what a terminal does with the output; ends when the terminal is closed
        try:
            while os.read(master, 4096):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    events = tmp_path / "runs" / "run" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if events.exists() and sum(e["event"] == "step" for e in read_events(events).events) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGHUP)
    os.close(master)  # the terminal is gone
    assert proc.wait(timeout=120) == 130
    ends = [e for e in read_events(events).events if e["event"] in ("stopped", "end")]
    assert [e["event"] for e in ends] == ["stopped", "end"] and ends[-1]["status"] == "interrupted"
    assert ends[0]["reason"] == "SIGHUP"
    assert (tmp_path / "runs" / "run" / "checkpoints" / f"step-{ends[0]['step']:06d}").is_dir()


def test_long_captions_are_warned_about(tmp_path, ti_config, image_folder, run_cli):
    for i, image in enumerate(sorted(image_folder.glob("*.png"))):
        image.with_suffix(".txt").write_text("<zq-thing> " + ("very " * 100 if i == 0 else "short"))
    raw = ti_config(basic={"max_train_steps": 1, "validate_every_n_steps": None}, validation={"at_start": False})
    code, _, err = run_cli("train", write_config(tmp_path, raw))
    assert code == 0 and "warning: 1 caption(s) are longer than the text encoder's limit" in err


def test_demo_with_a_tiny_model(tmp_path, run_cli):
    code, out, err = run_cli("demo", "--model", "tiny", "--out", tmp_path, "--steps", 6)
    assert code == 0, err
    assert "demo finished" in out and "yellow-star.safetensors" in out
    assert (tmp_path / "runs" / "demo" / "validation" / "step-000006" / "grid.png").is_file()


def test_demo_ti_on_sdxl_with_a_tiny_model(tmp_path, run_cli):
    code, out, err = run_cli("demo", "--family", "sdxl", "--model", "tiny", "--out", tmp_path, "--steps", 1)
    assert code == 0, err
    last = tmp_path / "runs" / "demo" / "checkpoints" / "step-000001"
    assert f"embedding:        {last / 'yellow-star.safetensors'}" in out
    assert (tmp_path / "runs" / "demo" / "validation" / "step-000001" / "grid.png").is_file()
    written = yaml.safe_load((tmp_path / "runs" / "demo" / "config.yaml").read_text())
    assert (written["type"], written["version"], written["basic"]["family"]) == ("textual_inversion", 2, "sdxl")


@pytest.mark.parametrize("method, family", [("dora", "sdxl"), ("lora", "sd2"), ("dora", "flux")])
def test_lora_demos_with_a_tiny_model(tmp_path, method, family, run_cli):
    code, out, err = run_cli("demo", "--method", method, "--family", family, "--model", "tiny", "--out",
                             tmp_path, "--steps", 3)
    assert code == 0, err
    assert f"{method.upper()} (kohya):" in out and "demo.safetensors" in out
    assert len(list((tmp_path / "data-lora").glob("*.png"))) == 32
    assert (tmp_path / "runs" / "demo" / "validation" / "step-000003" / "grid.png").is_file()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_demo_pivotal_with_a_tiny_model(tmp_path, family, run_cli):
    code, out, err = run_cli("demo", "--method", "pivotal", "--family", family, "--model", "tiny", "--out",
                             tmp_path, "--steps", 1)
    assert code == 0, err
    last = tmp_path / "runs" / "demo" / "checkpoints" / "step-000001"
    assert f"LoRA (kohya):     {last / 'demo.safetensors'}" in out
    assert f"embedding:        {last / 'yellow-star.safetensors'}" in out
    assert (last / "demo.safetensors").is_file() and (last / "yellow-star.safetensors").is_file()
    assert len(list((tmp_path / "data-lora").glob("*.png"))) == 32
    assert (tmp_path / "runs" / "demo" / "validation" / "step-000001" / "grid.png").is_file()
    config = (tmp_path / "runs" / "demo" / "config.yaml").read_text()
    assert "replace_word: zwx" in config and "type: pivotal" in config


def test_demo_refuses_what_is_not_there_yet(tmp_path, run_cli, assert_one_line_error):
    assert_one_line_error(*run_cli("demo", "--method", "loha", "--out", tmp_path)[::2], "not available yet")
    assert_one_line_error(*run_cli("demo", "--family", "sd3", "--method", "lora", "--out", tmp_path)[::2],
                          "sd1, sd2, sdxl or flux")
    assert_one_line_error(*run_cli("demo", "--family", "flux", "--method", "ti", "--out", tmp_path)[::2],
                          "for flux use --method lora or dora")
