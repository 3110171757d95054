"""`conjure train --num-processes N`: N training processes on this machine, started by accelerate's own launcher.

Not a launcher of conjure's own: the command line is `accelerate launch`'s (accelerate.commands.launch,
accelerate 1.16.0: `launch_command_parser`, `multi_gpu_launcher`), so what runs is what
`accelerate launch --multi_gpu --num_processes N -m conjure train CONFIG` runs: torch.distributed.run's elastic
agent with accelerate's environment, a free port for the rendezvous. `multi_gpu_launcher` is called directly
rather than `launch_command`, whose choice for a CPU run (`simple_launcher`) starts several CPU processes only
through MPI; accelerate's PartialState then picks the backend from the device in each process: gloo on the CPU
(advanced.cpu, or no GPU), nccl on GPUs. Several machines use `accelerate launch` itself (README, "More than one
GPU"): conjure adds nothing there.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from conjure.errors import ConjureError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from conjure.train.control import TrainControl

DISTRIBUTED_ENV = "LOCAL_RANK"  # set by torch.distributed.run in every process it starts


# What `accelerate launch --use_fsdp / --use_deepspeed / --use_megatron_lm` (or an accelerate config's
# distributed_type: FSDP, DEEPSPEED, MEGATRON_LM) sets for each process, and what accelerate's state then reads
# (accelerate/utils/launch.py, accelerate/state.py, accelerate 1.16.0).
SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def refuse_sharding() -> None:
    """A run that accelerate was told to shard is refused in one line: accelerate's sharding prepares one model
    with its optimizer (and on the CPU its FSDP plugin is ignored: conjure.train.sharding), where conjure prepares
    each trained module and shards a full fine-tune itself when the config says `advanced.distributed: fsdp`."""
    asked = [name for var, name in SHARDING_ENV.items() if os.environ.get(var, "").lower() == "true"]
    if asked:
        raise ConjureError(f"accelerate is set to shard the model with {asked[0]}, which conjure does not take "
                           "from accelerate: use distributed_type: MULTI_GPU in the accelerate config and set "
                           "advanced.distributed: fsdp in the run's config (README, 'More than one GPU')")


def launched() -> bool:
    """Whether this process is one of a distributed run's (started by torchrun or `accelerate launch`)."""
    return DISTRIBUTED_ENV in os.environ


def main_process() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0 of a distributed run (the others'
    summaries would repeat its own)."""
    return os.environ.get("RANK", "0") == "0"


def global_batch(batch_size: int, processes: int, accumulation: int) -> dict[str, int]:
    """The batch an optimizer step averages over, and its factors (the start event's fields)."""
    return {"batch_size": batch_size, "processes": processes, "gradient_accumulation_steps": accumulation,
            "global_batch_size": batch_size * processes * accumulation}


def batch_line(batch: dict[str, int]) -> str:
    """`global_batch` in words, for the run's start."""
    return (f"batch: {batch['batch_size']} per process x {batch['processes']} process(es) x "
            f"{batch['gradient_accumulation_steps']} accumulated = global batch {batch['global_batch_size']}")


def launch_train(args: argparse.Namespace, stop_timeout_s: int) -> int:
    """`conjure train` with the command line's config, resume and overrides, in args.num_processes processes."""
    return launch(args.num_processes, [args.config, *(["--resume", args.resume] if args.resume else []),
                                       *(f"--set={item}" for item in args.set)], stop_timeout_s)


def launch(processes: int, train_args: list[str], stop_timeout_s: int) -> int:
    """Run `conjure train TRAIN_ARGS` in `processes` processes: 0 when it completed, EXIT_INTERRUPTED when a
    signal stopped it; a failed rank becomes one ConjureError naming it.

    A stop: the launcher's Ctrl-C, SIGTERM or SIGHUP (the processes run in sessions of their own, so only the
    launcher gets them) is forwarded by torch's elastic agent to every process (`_shutdown(death_sig)`,
    torch/distributed/elastic/agent/server/api.py, torch 2.13), which then finish their step and save one
    checkpoint together (`agree_stop`); the agent kills them only after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch's
    default 30 s), set here to `stop_timeout_s` (advanced.distributed_timeout_s) unless set already, so that a
    long step and checkpoint of a large model still complete. accelerate's `_run_torchrun` (accelerate 1.16.0)
    then exits 128 + the signal."""
    import signal

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, multi_gpu_launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from conjure.errors import EXIT_INTERRUPTED

    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no",  # the config's advanced.mixed_precision decides (train/setup.make_accelerator)
        "--dynamo_backend", "no", "-m", "conjure", "train", *train_args,
    ])
    args, _, _ = _validate_launch_command(args)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(stop_timeout_s))  # unless set by hand
    stops = {128 + sig for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))}
    try:
        multi_gpu_launcher(args)
    except SystemExit as exc:
        if exc.code in stops:  # the processes stopped as asked; the main one said where it saved
            return EXIT_INTERRUPTED
        raise
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the earliest: the others were stopped because of it
        # the error file's {"message": "Type: text", "extraInfo": ...}, or torch's words for a signal or exit code
        why = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        raise ConjureError(f"rank {rank} of {processes} failed: {why}; the other ranks were stopped") from None
    return 0


def record_failure(exc: BaseException) -> None:
    """In a launched process, leave `exc` where the launcher reads a failed rank's error: torchelastic's error
    file (TORCHELASTIC_ERROR_FILE, which torch.distributed.run sets for each process; torch's own `@record` writes
    it so: torch/distributed/elastic/multiprocessing/errors/error_handler.py, torch 2.13). Without it the launcher
    knows only an exit code."""
    if launched():
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def agree_stop(accelerator: Accelerator, control: TrainControl) -> bool:
    """Whether every process stops after this step: a stop asked of any process (a signal, the web app's Cancel)
    is every process's, so they save one checkpoint together (`every_rank` is a collective) and stop at the same
    step, where a process stopping on its own would leave the others waiting for its gradients. The loop acts on
    this answer, never on `control.stop_reason` read later: a signal landing after the all-reduce sets the flag on
    one process only, which would then save (a collective) and stop while the others step on, all of them waiting
    for ever (a cancelled 2-process job hung so under load); such a stop is agreed at the next step. One small
    all-reduce per step, with several processes only."""
    if accelerator.num_processes == 1:
        return control.stop_reason is not None
    import torch

    asked = torch.tensor([1.0 if control.stop_reason else 0.0], device=accelerator.device)
    if not accelerator.reduce(asked, "sum").item():
        return False
    if not control.stop_reason:
        control.request_stop("another process was stopped")
    return True


def every_rank(accelerator: Accelerator, state: dict[str, Any]) -> list[dict[str, Any]]:
    """`state` of every process, in rank order (a collective: every process calls it at the same step)."""
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return list(gather_object([state]))


def own_rng(state: dict[str, Any], accelerator: Accelerator) -> dict[str, Any] | None:
    """This process's global RNG state in a checkpoint: its own where every process's was saved by as many
    processes as now run (dropout masks then continue exactly), else the main process's (one process; a
    checkpoint from before, a rescue save, or another process count: those continue, not exactly, and another
    process count is warned about)."""
    from conjure.train.control import say

    saved, now = int(state.get("processes", 1)), accelerator.num_processes
    if saved != now:
        say(f"warning: this checkpoint was saved by {saved} process(es) and resumes in {now}: the run continues "
            "with another global batch and other dropout draws, not as it would have; resume with "
            f"--num-processes {saved} to continue it exactly")
    rngs = state.get("rank_rngs")
    if rngs and len(rngs) == accelerator.num_processes:
        return dict(rngs[accelerator.process_index])
    return state.get("rng")
