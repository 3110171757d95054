"""What `conjure train` imports before its first step: only what training needs. The web app, data-set
libraries, TensorBoard and the validation pipelines would add seconds to every start (docs/benchmarks.md has the
figures); this checks the modules, not the time, so it cannot fail on a busy machine."""

import json
import subprocess
import sys

import yaml

# Imported by the run later (TensorBoard at the first scalar, a pipeline class at the first validation) or never
# (the web app's server, Hugging Face data sets unless a source is one, the screenshot browser, the tiny models'
# writer). DiffusionPipeline itself is not here: diffusers' model loading imports it, and conjure reads
# model_index.json through it.
NOT_BEFORE_FIRST_STEP = (
    "fastapi", "uvicorn", "starlette", "datasets", "tensorboard", "torch.utils.tensorboard", "playwright",
    "diffusers.pipelines.stable_diffusion", "diffusers.pipelines.stable_diffusion_xl", "diffusers.pipelines.flux",
    "conjure.train.validation", "conjure.ui", "conjure.models.tiny",
)

# Runs `conjure train CONFIG` as the command does, and records sys.modules after parsing the command line and
# when the first "step" line is written to the events log.
PROBE = """
import json, sys
from conjure import cli
args = cli.build_parser().parse_args(["train", sys.argv[1]])
seen = {"parsed": sorted(sys.modules)}
from conjure.runs import events
emit = events.EventLog.emit
def first_step_seen(self, event, **fields):
    if event == events.Event.STEP and "first_step" not in seen:
        seen["first_step"] = sorted(sys.modules)
    return emit(self, event, **fields)
events.EventLog.emit = first_step_seen
assert args.func(args) == 0
print(json.dumps(seen))
"""


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in NOT_BEFORE_FIRST_STEP or m in NOT_BEFORE_FIRST_STEP
            or any(m.startswith(name + ".") for name in NOT_BEFORE_FIRST_STEP)]


def test_train_imports_nothing_heavy_before_its_first_step(lora_config, tmp_path):
    raw = lora_config(basic={"max_train_steps": 2, "validate_every_n_steps": None},
                      validation={"at_start": False})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "torch" not in seen["parsed"]  # parsing the command line loads no library
    assert heavy(seen["parsed"]) == []
    assert "torch" in seen["first_step"] and heavy(seen["first_step"]) == []
    # The run still writes TensorBoard's scalars (its writer is made at the first one).
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "runs" / "run" / "logs").iterdir())
