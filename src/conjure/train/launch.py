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

from conjure.errors import ConjureError

DISTRIBUTED_ENV = "LOCAL_RANK"  # set by torch.distributed.run in every process it starts


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


def launch_train(args: argparse.Namespace) -> int:
    """`conjure train` with the command line's config, resume and overrides, in args.num_processes processes."""
    launch(args.num_processes, [args.config, *(["--resume", args.resume] if args.resume else []),
                                *(f"--set={item}" for item in args.set)])
    return 0


def launch(processes: int, train_args: list[str]) -> None:
    """Run `conjure train TRAIN_ARGS` in `processes` processes; a failed rank becomes one ConjureError naming it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, multi_gpu_launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no",  # the config's advanced.mixed_precision decides (train/setup.make_accelerator)
        "--dynamo_backend", "no", "-m", "conjure", "train", *train_args,
    ])
    args, _, _ = _validate_launch_command(args)
    try:
        multi_gpu_launcher(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the earliest: the others were stopped because of it
        # the error file's {"message": "Type: text", "extraInfo": ...}, or torch's words for a signal or exit code
        why = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        raise ConjureError(f"rank {rank} of {processes} failed: {why}; the other ranks were stopped") from None


def record_failure(exc: BaseException) -> None:
    """In a launched process, leave `exc` where the launcher reads a failed rank's error: torchelastic's error
    file (TORCHELASTIC_ERROR_FILE, which torch.distributed.run sets for each process; torch's own `@record` writes
    it so: torch/distributed/elastic/multiprocessing/errors/error_handler.py, torch 2.13). Without it the launcher
    knows only an exit code."""
    if launched():
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
