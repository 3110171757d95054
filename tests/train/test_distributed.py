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


# Rank 0 waits at its third step (the checkpoint of step 2 is written) with a marker file for the test to see:
# the test then SIGKILLs the launcher and every rank.
PAUSE_RANK_0 = '''
import os, pathlib, time
if os.environ.get("RANK") == "0":
    import conjure.train.loop as loop
    real = loop.TrainingSession.step
    def step(self, batch):
        if self.global_step == 2:
            pathlib.Path(os.environ["CONJURE_TEST_MARKER"]).write_text("at step 3")
            time.sleep(600)
        return real(self, batch)
    loop.TrainingSession.step = step
'''


def two_processes(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "conjure", "train", *args, "--num-processes", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow  # ~60 s: three 2-process runs, each process importing torch, diffusers and transformers
def test_a_two_process_run_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny_models, tmp_path):
    """Every process's dropout RNG is checkpointed and each resumes its own: with lora.dropout the ranks draw
    different masks (their RNGs are seeded per rank), so resuming rank 1 with rank 0's state trains other weights."""
    import time

    import psutil

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 80, 120)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a picture {i}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = {}
    for name in ("whole", "killed"):
        config = settings(tiny_models, data, tmp_path, name, batch=1)
        config["type"] = "lora"
        del config["textual_inversion"]
        config["lora"]["dropout"] = 0.5
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config), encoding="utf-8")

    whole = two_processes([str(paths["whole"])], env)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_RANK_0)
    marker = tmp_path / "marker"
    killed = two_processes([str(paths["killed"])], {**env, "CONJURE_TEST_MARKER": str(marker), "PYTHONPATH": os.pathsep.join(
        [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])})
    deadline = time.monotonic() + 240
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), killed.communicate()[1][-3000:]
    for proc in [psutil.Process(killed.pid), *psutil.Process(killed.pid).children(recursive=True)]:
        proc.kill()
    killed.communicate()
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]

    resumed = two_processes(["--resume", str(run_dir)], env)
    for proc in (whole, resumed):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    assert f"resuming {run_dir} from step 2" in err

    def weights(run):
        return torch.load(run / "checkpoints" / "step-000004" / "training_state.pt", weights_only=False)["method"]

    (whole_dir,) = (tmp_path / "whole").iterdir()
    ref, got = weights(whole_dir), weights(run_dir)
    assert any(name.endswith("lora_B.default.weight") and tensor.abs().max() > 0 for name, tensor in ref.items())
    for name, tensor in ref.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(got[name], tensor), name


def test_a_short_bucket_batch_trains_in_two_processes_what_it_trains_in_one():
    """The rule for a bucket whose image count is not a multiple of the global batch: its last batch is short
    (here 3 of 4, and 1 of 4); every process draws that batch's noise whole (the shared generator stays in step
    with one process's) and weights its loss by its share (0 for a process holding only a stand-in), so the mean
    of the processes' gradients (what DDP all-reduces) is one process's gradient over the same rows."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from conjure.data.dataset import MicroBatchSampler
    from conjure.train.loss import BatchGenerator, denoising_loss

    sizes = [(64, 64)] * 7 + [(64, 96)] * 5  # buckets of 7 and 5 at a global batch of 4: short batches 3 and 1
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(len(sizes), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    weight = torch.nn.Parameter(torch.tensor(0.5))

    def unet(noisy, timesteps):
        return SimpleNamespace(sample=noisy * weight)

    def grad(keys, generator):
        weight.grad = None
        loss = denoising_loss(unet, scheduler, latents[[i for _, i in keys]], {}, generator) * generator.share()
        loss.backward()
        return weight.grad.clone()

    one = BatchGenerator("cpu").manual_seed(5)
    ranks = [BatchGenerator("cpu").manual_seed(5) for _ in range(2)]
    for rank, generator in enumerate(ranks):
        generator.rank, generator.world = rank, 2
    samplers = [MicroBatchSampler(sizes, 2, 1, 0, 4, rank, 2) for rank in range(2)]
    whole = MicroBatchSampler(sizes, 4, 1, 0, 4, 0, 1)
    seen = set()
    for m, (batch, *shares) in enumerate(zip(whole, *samplers)):
        one.rows = whole.rows(m)
        seen.add(len(batch))
        for generator, sampler in zip(ranks, samplers):
            generator.rows = sampler.rows(m)
        ddp = sum(grad(keys, generator) for keys, generator in zip(shares, ranks)) / 2
        torch.testing.assert_close(ddp, grad(batch, one), rtol=1e-6, atol=0)
        assert all(torch.equal(generator.get_state(), one.get_state()) for generator in ranks)
    assert seen == {4, 3, 1}


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                            ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_a_run_accelerate_was_told_to_shard_is_refused_in_one_line(monkeypatch, variable, name):
    """What `accelerate launch --use_fsdp` (or --use_deepspeed, or an accelerate config's distributed_type) sets in
    every process: the run stops before it builds anything, instead of training on parameters that sharding
    replaced, and names the config's own `advanced.distributed: fsdp`."""
    from conjure.config.sections import AdvancedConfig
    from conjure.errors import ConjureError
    from conjure.train.setup import make_accelerator

    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConjureError, match=f"accelerate is set to shard the model with {name}, which conjure") as err:
        make_accelerator(AdvancedConfig(cpu=True))
    assert "\n" not in str(err.value) and "distributed_type: MULTI_GPU" in str(err.value)
    assert "advanced.distributed: fsdp" in str(err.value)  # where conjure's own sharding is asked for


def test_each_process_resumes_its_own_rng_and_another_process_count_is_warned_about(capsys):
    from types import SimpleNamespace

    from conjure.train.launch import own_rng

    first, second = {"cpu": torch.tensor([1], dtype=torch.uint8)}, {"cpu": torch.tensor([2], dtype=torch.uint8)}
    state = {"rng": first, "rank_rngs": [first, second], "processes": 2}
    assert own_rng(state, SimpleNamespace(num_processes=2, process_index=1)) == second
    assert capsys.readouterr().err == ""
    assert own_rng(state, SimpleNamespace(num_processes=1, process_index=0)) == first
    assert "saved by 2 process(es) and resumes in 1" in capsys.readouterr().err
    assert own_rng({"rng": first}, SimpleNamespace(num_processes=1, process_index=0)) == first  # a 1-process run's
    assert capsys.readouterr().err == ""
