"""The CLI probes of issue 21's reliability review (its section A), kept as a corpus: bad input and unlucky
faults end in exit code 2 and one line naming the problem, with no traceback and no "unexpected" (the CLI's
word for a bug). Cases run in-process on the tiny SD1 model; the ones that train stop within 2 steps.

A full disk is simulated by making the writers raise OSError(ENOSPC), as a full disk makes them."""

import errno
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from conjure.cli import main

def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")  # as a failed write() raises it: no file name


@dataclass
class Probe:
    tmp: Path
    config: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def run(self) -> Path:
        return self.tmp / "runs" / "run"

    def train(self, *sets: str) -> list[str]:
        return ["train", str(self.config), *[a for s in sets for a in ("--set", s)]]


def _events_fill_the_disk(probe: Probe, *, at: str, also_checkpoints: bool = False) -> None:
    """Every write to events.jsonl fails from the first one holding `at` on (and checkpoints too)."""
    from conjure.runs import events

    real_init = events.EventLog.__init__

    class FullDisk:
        def __init__(self, file):
            self.file, self.full = file, False

        def write(self, text):
            self.full = self.full or at in text
            if self.full:
                raise enospc()
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = FullDisk(self._file)

    probe.monkeypatch.setattr(events.EventLog, "__init__", init)
    if also_checkpoints:
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step", 0) >= 2:
                raise enospc()
            return real_save(obj, path, *args, **kwargs)

        probe.monkeypatch.setattr(torch, "save", save)


def full_disk_mid_run(probe: Probe) -> list[str]:
    _events_fill_the_disk(probe, at='"step": 2,', also_checkpoints=True)
    return probe.train()


def full_disk_at_start(probe: Probe) -> list[str]:
    _events_fill_the_disk(probe, at='"event": "start"')
    return probe.train()


def full_disk_under_tensorboard(probe: Probe) -> list[str]:
    from tensorboard.summary.writer.record_writer import RecordWriter

    real_write, calls = RecordWriter.write, []

    def write(self, data):
        calls.append(data)
        if len(calls) > 1:  # the file's header event goes through, the first scalar does not
            raise enospc()
        return real_write(self, data)

    probe.monkeypatch.setattr(RecordWriter, "write", write)
    # The interpreter's own hook (pytest installs a recording one): it prints a thread's traceback to stderr.
    probe.monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    return probe.train("basic.max_train_steps=3")


def _safetensors_fill_the_disk(probe: Probe) -> None:
    from safetensors import SafetensorError

    from conjure import files

    def save_file(*args, **kwargs):  # how safetensors reports ENOSPC: its own error, no errno
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    probe.monkeypatch.setattr(files, "save_file", save_file)


def full_disk_in_latent_cache(probe: Probe) -> list[str]:
    _safetensors_fill_the_disk(probe)
    return probe.train("data.cache_latents=disk")


def full_disk_under_a_checkpoint_file(probe: Probe) -> list[str]:
    _safetensors_fill_the_disk(probe)
    return probe.train()


def loss_becomes_nan(probe: Probe) -> list[str]:
    from conjure.train import loss

    real, calls = loss.denoising_loss, []

    def denoising_loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 2 else value

    probe.monkeypatch.setattr(loss, "denoising_loss", denoising_loss)
    # A non-finite step is skipped (tests/train/test_loop.py); the run stops when this many come in a row.
    return probe.train("advanced.max_consecutive_skipped_steps=1")


def fp16_on_the_cpu(probe: Probe) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on this machine's GPU")
    return probe.train("advanced.mixed_precision=fp16")


def python_tag(probe: Probe) -> list[str]:
    probe.config.write_text(probe.config.read_text() + "x: !!python/object/apply:os.system ['true']\n")
    return probe.train()


def output_dir_is_a_file(probe: Probe) -> list[str]:
    (probe.tmp / "a-file").write_text("x")
    return probe.train(f"basic.output_dir={probe.tmp / 'a-file' / 'runs'}")


def existing_config(probe: Probe) -> list[str]:
    return ["config", "new", "textual_inversion", "-o", str(probe.config)]


CASES = {
    # fixed for issue 21 (each failed before its fix)
    "seed-huge": (lambda p: p.train(f"basic.seed={2**70}"), "basic.seed: Input should be less than or equal to"),
    "lr-inf": (lambda p: p.train("optimizer.learning_rate=.inf"), "optimizer.learning_rate: Input should be a finite"),
    "weight-decay-inf": (lambda p: p.train("optimizer.weight_decay=.inf"), "optimizer.weight_decay: Input should be a"),
    "runname-traversal": (lambda p: p.train("basic.run_name=../../escape"), "basic.run_name: a plain folder name"),
    "runname-absolute": (lambda p: p.train(f"basic.run_name={p.tmp / 'abs'}"), "basic.run_name: a plain folder name"),
    "demo-steps-zero": (lambda p: ["demo", "--steps", "0", "--model", "tiny", "--out", str(p.tmp / "demo")],
                        "demo --steps must be at least 1, not 0"),
    "fp16-cpu": (fp16_on_the_cpu, "advanced.mixed_precision: fp16 needs a GPU, and this run is on the CPU"),
    "cache-disk-full": (full_disk_in_latent_cache, "data.cache_latents: cannot write the latent cache in"),
    "disk-full-checkpoint-file": (full_disk_under_a_checkpoint_file,
                                  "could not write checkpoint {run}/checkpoints/step-000001: Error while serializing: "
                                  "I/O error: No space left on device (os error 28); no checkpoint was written"),
    "disk-full-mid-run": (full_disk_mid_run, "events.jsonl; the last complete checkpoint is {run}/checkpoints/step-000001"),
    "disk-full-at-start": (full_disk_at_start, "disk full while writing {run}/events.jsonl; no checkpoint was written"),
    "disk-full-tensorboard": (full_disk_under_tensorboard, "disk full while writing {run}/logs;"),
    "loss-nan": (loss_becomes_nan, "loss became nan at step 2 (1 step(s) in a row skipped, advanced.max_consecutive_"
                 "skipped_steps: 1); lower optimizer.learning_rate or use advanced.mixed_precision: bf16/no (the last "
                 "complete checkpoint is {run}/checkpoints/step-000001)"),
    "hub-model-unreachable": (lambda p: p.train("basic.base_model=nobody-here/no-such-model"),
                              "the Hub could not be reached"),
    # held before (a sample)
    "yaml-python-tag": (python_tag, "could not determine a constructor"),
    "key-typo": (lambda p: p.train("basic.max_train_step=3"), "did you mean 'max_train_steps'"),
    "steps-zero": (lambda p: p.train("basic.max_train_steps=0"), "basic.max_train_steps: Input should be greater"),
    "lr-nan": (lambda p: p.train("optimizer.learning_rate=.nan"), "optimizer.learning_rate"),
    "set-without-equals": (lambda p: p.train("basic.seed"), "expected dotted.key=value"),
    "resolution-63": (lambda p: p.train("data.resolution=63"), "data.resolution: Input should be a multiple of 64"),
    "data-missing": (lambda p: p.train(f"data.source={p.tmp / 'nosuch'}"), "data source not found"),
    "model-missing": (lambda p: p.train(f"basic.base_model={p.tmp / 'nosuch'}"), "base model not found"),
    "output-dir-is-a-file": (output_dir_is_a_file, "not writable"),
    "resume-without-checkpoints": (lambda p: ["train", "--resume", str(p.tmp)], "config file not found"),
    "config-new-exists": (existing_config, "exists; use --force to overwrite"),
    "convert-missing": (lambda p: ["convert", str(p.tmp / "no.safetensors"), str(p.tmp / "o"), "--to", "kohya"],
                        "no such file"),
    "export-missing-run": (lambda p: ["export", str(p.tmp / "nosuch"), "--step", "latest", "--to", str(p.tmp)],
                           "no checkpoints in"),
    "dataset-check-resolution-zero": (lambda p: ["dataset", "check", str(p.tmp), "--resolution", "0"], "resolution 0"),
    "demo-bad-method": (lambda p: ["demo", "--method", "bogus"], "is not available yet"),
}


@pytest.fixture
def probe(tmp_path, ti_config, monkeypatch):
    raw = ti_config(basic={"max_train_steps": 2, "save_every_n_steps": 1, "validate_every_n_steps": None},
                    validation={"at_start": False})
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Probe(tmp_path, config, monkeypatch)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_clear_line(case, probe, capsys):
    prepare, needle = CASES[case]
    code = main(prepare(probe))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert needle.format(run=probe.run) in err[err.index("error:"):], err  # a config's problems: one line each
    assert "Traceback" not in err and "unexpected" not in err


def test_a_nan_step_is_not_saved_as_a_checkpoint(probe):
    # The rescue that saves steps since the last checkpoint saved the nan step's weights as the newest one.
    main(loss_becomes_nan(probe))
    assert sorted(p.name for p in (probe.run / "checkpoints").iterdir()) == ["step-000001"]


def test_images_over_pils_bomb_warning_size_load_quietly(tmp_path, image_folder, monkeypatch, capsys):
    # PIL warns above MAX_IMAGE_PIXELS (89 Mpx) and refuses above twice that; between, conjure loads the image
    # shrunk (conjure.data.images). The review's 12000 x 12000 PNG, scaled down: 80 x 72 px over a 64 x 64 limit.
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["dataset", "check", str(image_folder), "--resolution", "64"])
    assert code == 0, capsys.readouterr()
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_hub_retries_are_not_logged(tmp_path):
    # huggingface_hub logs each retry of an unreachable Hub (10-13 lines over ~30 s); it reads its log level
    # from the environment when first imported, which the CLI does after setting it. A fresh process shows it.
    script = (
        "import sys; from conjure.cli import main; code = main(sys.argv[1:]); "
        "from huggingface_hub.utils import logging; "
        "logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].'); sys.exit(code)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_VERBOSITY"}
    done = subprocess.run([sys.executable, "-c", script, "config", "new", "sd_lora"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "Retrying" not in done.stderr, done.stderr
