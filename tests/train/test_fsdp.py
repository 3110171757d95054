"""`advanced.distributed: fsdp` (issue 19): a full fine-tune sharded over 2 processes (torch's FSDP2, gloo on the
CPU) resumes a checkpoint into its shards, trains what one process with the same global batch trains and writes
once (main process) the same checkpoint and model files as a one-process run; gradients accumulate unreduced
until the last micro-batch; what cannot shard is refused in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conjure.config import ConfigError, parse_config
from conjure.train.loop import train

# As tests/train/test_distributed.py's ATOL: the runs differ in where the global batch's gradient is summed (FSDP
# reduce-scatters two per-process sums where one process sums four; float32 addition is not associative):
# ~1e-7 relative per step, carried by 2 AdamW steps to at most ~1e-6 of the weights' scale. A wrong shard, a lost
# micro-batch or a stale optimizer state moves weights by lr-sized amounts (1e-3).
ATOL = 1e-5


def settings(tiny_models, images, tmp_path, name, batch):
    return {
        "type": "finetune",
        "basic": {"base_model": str(tiny_models("sd1")), "output_dir": str(tmp_path / name), "run_name": "run",
                  "max_train_steps": 4, "save_every_n_steps": 2, "validate_every_n_steps": None, "seed": 3},
        "data": {"source": str(images), "resolution": 64, "batch_size": batch, "random_flip": True},
        "finetune": {"save_dtype": "fp32"},
        "optimizer": {"learning_rate": 1e-3, "scheduler": "cosine", "warmup_steps": 1},
        "validation": {"at_start": True, "seeds": [0], "num_inference_steps": 1},
        "advanced": {"cpu": True, "gradient_accumulation_steps": 2},
    }


def state(checkpoint):
    return torch.load(checkpoint / "training_state.pt", weights_only=False)


@pytest.mark.slow  # ~20 s: one 2-process run, each process importing torch, diffusers and transformers
def test_a_sharded_full_finetune_trains_and_saves_what_one_process_does(tiny_models, tmp_path):
    """2 processes x 1 image x 2 micro-batches (FSDP reduces only at the second) against 1 x 2 x 2: each
    micro-batch is the same 2 images in both runs, with the same noise rows. The main process alone validates
    (at the start and the end, on the gathered model) and writes the checkpoints, gathered whole: the weights,
    Adam's moments and the model files of the one-process run. (Resuming into the shards: the next test.)"""
    images = tmp_path / "data"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):  # 2 global batches of 4 per epoch: the 4 steps cross an epoch boundary
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a picture, item {i}")
    config = settings(tiny_models, images, tmp_path, "two", batch=1)
    config["advanced"]["distributed"] = "fsdp"
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "conjure", "train", str(path), "--num-processes", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 4 steps") == 1 and "global batch 4" in proc.stderr

    one = train(parse_config(settings(tiny_models, images, tmp_path, "one", batch=2)))
    (run,) = (tmp_path / "two").iterdir()  # one run folder, written by the main process only
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1 and events[0]["processes"] == 2
    assert [e["event"] for e in events].count("end") == 1
    assert [e["step"] for e in events if e["event"] == "validation"] == [0, 4]
    ones = [json.loads(line) for line in (one.run_dir / "events.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert losses == pytest.approx([e["loss"] for e in ones if e["event"] == "step"], abs=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    got, ref = run / "checkpoints" / "step-000004", one.run_dir / "checkpoints" / "step-000004"
    # the same files as the one-process run's (diffusers folder, single file): the model's own class, whole tensors
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*")) == sorted(
        str(p.relative_to(ref)) for p in ref.rglob("*"))
    assert json.loads((got / "run" / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert json.loads((got / "run" / "model_index.json").read_text()) == json.loads(
        (ref / "run" / "model_index.json").read_text())
    for file in ("run/unet/diffusion_pytorch_model.safetensors", "run.safetensors"):
        two, want = load_file(got / file), load_file(ref / file)
        assert two.keys() == want.keys(), file
        for key, tensor in want.items():
            torch.testing.assert_close(two[key], tensor, atol=ATOL, rtol=0, msg=f"{file}: {key}")
    two, want, before = state(got), state(ref), state(ref.parent / "step-000002")
    for name, tensor in want["method"].items():
        torch.testing.assert_close(two["method"][name], tensor, atol=ATOL, rtol=0, msg=name)
    assert any((t - before["method"][n]).abs().max() > 1e-4 for n, t in want["method"].items())  # they moved
    for index, moments in want["optimizer"]["state"].items():  # Adam's moments, gathered whole
        for key, tensor in moments.items():
            torch.testing.assert_close(two["optimizer"]["state"][index][key], tensor, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(("method", "sections", "field", "words"), [
    ("lora", {"advanced": {"distributed": "fsdp"}}, "advanced.distributed", "sharding would not shrink: use ddp"),
    ("finetune", {"advanced": {"distributed": "deepspeed"}}, "advanced.distributed", "use fsdp"),
    ("finetune", {"advanced": {"distributed": "fsdp"}, "finetune": {"ema": {"enabled": True}}},
     "finetune.ema.enabled", "set it to false or use ddp"),
    ("finetune", {"advanced": {"distributed": "fsdp"}, "finetune": {"text_encoder_learning_rate": 1e-6}},
     "finetune.text_encoder_learning_rate", "shards the UNet only"),
])
def test_what_cannot_shard_is_refused_in_one_line(tiny_models, image_folder, method, sections, field, words):
    raw = {"type": method, "basic": {"base_model": str(tiny_models("sd1"))}, "data": {"source": str(image_folder)},
           **({"lora": {"rank": 2}} if method == "lora" else {})}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    (line,) = str(error.value).splitlines()[1:]  # under "config is not valid:"
    assert line.strip().startswith(f"{field}: ") and words in line


def test_a_resume_may_switch_between_ddp_and_fsdp(tiny_models, image_folder, tmp_path):
    """A DDP run short of memory continues sharded (or back): both checkpoints hold the full tensors."""
    from conjure.config import dump_config
    from conjure.runs.folder import resume_changes

    raw = {"type": "finetune", "basic": {"base_model": str(tiny_models("sd1"))}, "data": {"source": str(image_folder)}}
    (tmp_path / "config.yaml").write_text(dump_config(parse_config(raw)), encoding="utf-8")
    raw["advanced"] = {"distributed": "fsdp"}
    assert resume_changes(tmp_path / "config.yaml", parse_config(raw)) == {"advanced.distributed": ("ddp", "fsdp")}


# Two processes of torch alone (torchrun, ~5 s): each step of the sharding's life on a 2-layer net, against the
# same net unsharded in every process.
SHARDS = '''
import copy
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from conjure.train.sharding import (
    copy_into, full_optimizer_state, gathered, shard, shard_optimizer_state, sync_gradients, whole_weights)

class Block(nn.Sequential):
    pass

class Net(nn.Sequential):
    _no_split_modules = ["Block"]

def make():
    torch.manual_seed(0)
    return Net(Block(nn.Linear(4, 5), nn.Tanh()), nn.Linear(5, 3))  # 5 rows: uneven shards of 3 and 2

dist.init_process_group("gloo")
rank = dist.get_rank()
net, plain = make(), make()
shard([net], torch.device("cpu"))
assert isinstance(net[0], FSDPModule) and isinstance(net, FSDPModule) and not isinstance(net[1], FSDPModule)
batches = [[torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * m + r)) for r in range(2)] for m in range(2)]
for m, xs in enumerate(batches):  # 2 micro-batches, reduced once; each process holds its own rows
    sync_gradients([net], m == 1)
    net(xs[rank]).sum().backward()
    (sum(plain(x).sum() for x in xs) / 2).backward()  # what the processes' mean gradient is
    held = [p.grad is None for p in net.parameters()]
    assert all(held) if m == 0 else not any(held), (m, held)  # the first micro-batch's stays unreduced
for p, q in zip(net.parameters(), plain.parameters()):
    torch.testing.assert_close(p.grad.full_tensor(), q.grad)
opt = torch.optim.AdamW(net.parameters(), lr=0.1)
opt.step()
opt.zero_grad()
with whole_weights([net], keep=rank == 0):  # what a checkpoint saves (collective; kept by rank 0)
    saved = {k: v.clone() for k, v in net.state_dict().items()} if rank == 0 else None
    moments = full_optimizer_state(opt, keep=rank == 0)
    if rank == 0:
        assert type(net) is Net and all(type(v) is torch.Tensor for v in saved.values())
assert isinstance(net, FSDPModule) and moments is None if rank else moments["state"][0]["exp_avg"].shape == (5, 4)
x = torch.randn(2, 4)
with gathered([net]):  # the main process alone runs a forward (validation): no collective
    if rank == 0:
        alone = net(x)
box = [saved, moments]
dist.broadcast_object_list(box)  # every process reads the checkpoint file (a copy: Adam's step counts in place)
saved, moments = copy.deepcopy(box)
if rank == 0:
    torch.testing.assert_close(alone, torch.func.functional_call(make(), saved, (x,)))
again = make()
shard([again], torch.device("cpu"))
for name, p in again.named_parameters():
    copy_into(p, saved[name])
opt2 = torch.optim.AdamW(again.parameters(), lr=0.1)
opt2.load_state_dict(moments)
shard_optimizer_state(opt2)
for model, optimizer in ((net, opt), (again, opt2)):  # one more step each: the resumed one moves the same
    model(batches[0][rank]).sum().backward()
    optimizer.step()
for p, q in zip(net.parameters(), again.parameters()):
    assert torch.equal(p.to_local(), q.to_local())
print("ok")
# torch's documented shutdown: without it a process can exit while gloo's threads are still up ("terminate called
# without an active exception", SIGABRT: seen once in CI)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow  # ~6-9 s: torchrun and two processes importing torch
def test_sharded_gradients_accumulate_checkpoints_gather_and_resume_into_the_shards(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARDS, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("ok") == 2, proc.stderr[-3000:]  # both, in any interleaving
