"""Several processes (issue 19): `conjure train --num-processes 2` (gloo on the CPU, through accelerate's launcher)
trains what one process with the same global batch trains (a pivotal run: a LoRA and new embedding rows), only
the main process writes the run, and a failing rank ends the run in one line naming it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conjure.config import parse_config
from conjure.train.loop import train

# The two runs differ only in where the global batch's gradient is summed: DDP all-reduces two per-process means
# (each over 2 samples) where one process averages 4, and float32 addition is not associative. One step of that
# is ~1e-7 relative; 4 Adam steps (whose update divides by sqrt(v)) carry it to at most ~1e-6 of the weights'
# scale. A wrong sharding or noise draw moves the weights by lr-sized amounts (1e-3), far above this.
ATOL = 1e-5


def settings(tiny_models, data, tmp_path, name, batch):
    return {
        # pivotal tuning: a LoRA and a textual inversion's new embedding rows (the only rows DDP synchronises:
        # the rest of the embedding does not train), in one run
        "type": "pivotal",
        "basic": {"base_model": str(tiny_models("sd1")), "output_dir": str(tmp_path / name), "run_name": "run",
                  "max_train_steps": 4, "save_every_n_steps": 2, "validate_every_n_steps": None, "seed": 3},
        "data": {"source": str(data), "resolution": 64, "batch_size": batch, "random_flip": True},
        "textual_inversion": {"placeholder_token": "<zq>", "initializer": "dog", "learning_rate": 0.05},
        "lora": {"rank": 2, "save_dtype": "fp32"},
        "optimizer": {"learning_rate": 1e-3, "scheduler": "cosine", "warmup_steps": 2},
        "validation": {"at_start": False, "seeds": [0], "num_inference_steps": 1},
        "advanced": {"cpu": True},
    }


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~25 s: two processes each import torch, diffusers and transformers
def test_two_processes_train_what_one_process_with_the_same_global_batch_trains(tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):  # 2 global batches of 4 per epoch: the 4 steps cross an epoch boundary
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"<zq> picture, item {i}")
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(settings(tiny_models, data, tmp_path, "two", batch=2)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "conjure", "train", str(path), "--num-processes", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1  # the other process's own summary is the same run's
    assert "global batch 4" in proc.stderr

    one = train(parse_config(settings(tiny_models, data, tmp_path, "one", batch=4)))
    (two_dir,) = (tmp_path / "two").iterdir()  # one run folder: the main process named it for both
    two_events, one_events = events(two_dir), events(one.run_dir)
    (start,) = [e for e in two_events if e["event"] == "start"]  # every line written once
    assert (start["processes"], start["batch_size"], start["global_batch_size"]) == (2, 2, 4)
    assert [e["event"] for e in two_events].count("end") == 1
    steps = [(e["step"], e["lr"]) for e in two_events if e["event"] == "step"]
    assert steps == [(e["step"], e["lr"]) for e in one_events if e["event"] == "step"]
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    losses = [e["loss"] for e in two_events if e["event"] == "step"]  # averaged over the processes
    assert losses == pytest.approx([e["loss"] for e in one_events if e["event"] == "step"], abs=1e-5)
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert len(list((two_dir / "validation").rglob("*.png"))) == len(list(one.run_dir.joinpath("validation").rglob("*.png")))

    def weights(run_dir):
        return torch.load(run_dir / "checkpoints" / "step-000004" / "training_state.pt", weights_only=False)["method"]

    two, ref = weights(two_dir), weights(one.run_dir)
    assert "ti.new_rows.0" in ref  # the embedding's new rows are compared with the LoRA's weights
    for name, tensor in ref.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            torch.testing.assert_close(two[name], tensor, atol=ATOL, rtol=0, msg=name)
    assert any(name.endswith("lora_B.default.weight") and tensor.abs().max() > 0 for name, tensor in ref.items())


# Imported at start-up by every Python process that has its folder on PYTHONPATH: rank 1 (and only it) fails at
# its second step, with no hook in conjure itself.
BREAK_RANK_1 = '''
import os
if os.environ.get("RANK") == "1":
    import conjure.train.loop as loop
    real = loop.TrainingSession.step
    def step(self, batch):
        if self.global_step == 1:
            raise RuntimeError("rank 1 broke at step 2")
        return real(self, batch)
    loop.TrainingSession.step = step
'''


@pytest.mark.slow  # ~20 s: two processes each import torch, diffusers and transformers
def test_a_failing_rank_ends_the_run_naming_it_and_its_error(tiny_models, tmp_path):
    import time

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("<zq> picture")
    config = settings(tiny_models, data, tmp_path, "runs", batch=1)
    config["advanced"]["distributed_timeout_s"] = 30  # had rank 0 waited for rank 1's gradients: not 30 min
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BREAK_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "conjure", "train", str(path), "--num-processes", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("error: rank 1 of 2 failed: RuntimeError: rank 1 broke at step 2; the other ranks were stopped")
    assert time.monotonic() - started < 120
