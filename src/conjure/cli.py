"""The `conjure` command. Heavy libraries (torch, diffusers) are imported only by the commands that need
them, so `conjure --help` and config commands start instantly.

Errors the user can fix end as one line on stderr and exit code 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from conjure.errors import EXIT_BUG, EXIT_DATASET_ERRORS, EXIT_INTERRUPTED, EXIT_USER_ERROR, ConjureError
from conjure.errors import refuse_overwrite


def _quiet_libraries() -> None:
    # transformers/diffusers log import-time notices (e.g. about torchvision) that are noise for users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # huggingface_hub logs every retry of an unreachable Hub (10-13 lines over ~30 s) before the error that
    # conjure turns into one line; read when the libraries are imported, which is after this.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    # The variables count when a library is imported; one imported already (main() run in-process, as the
    # tests do) gets the level here.
    # torchao (conjure[float8]; diffusers and transformers import it whenever it is installed) warns at import that
    # its CUDA kernels (_C_mxfp8, _C_cutlass_90a: mxfp8 and sm90a matmuls, which weight-only float8 never runs)
    # cannot load beside a CPU torch (no libtorch_cuda), and torch that torchao's enum constants use a deprecated
    # registration (torch.utils._pytree, torch 2.13); diffusers 0.42 warns that torchao 0.18 has no NF4Tensor left
    # to allow in torch.load (torchao checkpoints only, which conjure does not read)
    for library in ("transformers", "diffusers", "huggingface_hub", "datasets", "torchao", "torch.utils._pytree"):
        logging.getLogger(library).setLevel(logging.ERROR)
    # Library warnings are for --debug, e.g. PIL's DecompressionBombWarning for an image over 89 Mpx, which
    # conjure loads shrunk on purpose (conjure.data.images), or deprecation notices between the libraries.
    warnings.filterwarnings(
        "ignore", module=r"(PIL|huggingface_hub|datasets|diffusers|transformers|accelerate|peft|torch)(\.|$)"
    )


def quiet_loading_bars(args: argparse.Namespace) -> None:
    """Per-file "Loading weights" bars of transformers/diffusers hide conjure's own progress bar."""
    if args.debug:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from conjure.config import load_config
    from conjure.train.launch import launch_train, launched, main_process, record_failure
    from conjure.train.loop import train
    from conjure.runs.folder import run_config_path

    if args.config is None:
        if not args.resume:
            raise ConjureError("give a config file, or --resume RUN_DIR to continue a run")
        args.config = str(run_config_path(args.resume))
    config = load_config(args.config, args.set)  # a bad config fails here, before any process starts
    if args.num_processes > 1 and not launched():
        return launch_train(args, config.advanced.distributed_timeout_s)
    quiet_loading_bars(args)
    try:
        result = train(config, resume=args.resume)
    except Exception as exc:
        record_failure(exc)  # for the launcher's line naming the rank (several processes only)
        raise
    if not main_process():  # rank 0 reports the run
        return EXIT_INTERRUPTED if result.status == "interrupted" else 0
    last = result.checkpoints[-1] if result.checkpoints else None
    if result.status == "interrupted":
        print(f"stopped at step {result.step}; checkpoint: {last}", file=sys.stderr)
        several = f" --num-processes {os.environ['WORLD_SIZE']}" if launched() else ""
        print(f"continue with: conjure train --resume {result.run_dir}{several}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: {result.step} steps in {result.run_dir}")
    if last:
        print(f"  last checkpoint: {last}")
    if result.validations:
        print(f"  validation grids: {result.run_dir / 'validation'}")
    print(f"  pick a step, then: conjure export {result.run_dir} --step N --to DIR")
    return 0


def cmd_config_new(args: argparse.Namespace) -> int:
    from conjure.config import migrate, starter_yaml

    text = starter_yaml(args.type)
    for note in migrate({"type": args.type})[1]:  # a version 1 name
        print(f"note: {note}", file=sys.stderr)
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    out = refuse_overwrite(Path(args.out), args.force)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from conjure.config import config_schema

    print(config_schema(args.type))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from conjure.config import dump_config, load_config

    config = load_config(args.config, args.set)
    for note in config.migration_notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.show:
        sys.stdout.write(dump_config(config))
    else:
        print(f"{args.config}: valid {config.type} config")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from conjure.runs.apps import install_lines
    from conjure.runs.export import export_step

    if args.to_app or args.invokeai_url or args.app_dir:
        print("\n".join(install_lines(Path(args.run_dir), args.step, app=args.to_app, app_dir=args.app_dir,
                                      invokeai_url=args.invokeai_url, name=args.name, force=args.force)))
        return 0
    for path in export_step(Path(args.run_dir), args.step, Path(args.to), name=args.name, force=args.force):
        print(f"exported {path}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from conjure.models.tiny import write_tiny_model

    out_dir = Path(args.dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.force:
        raise ConjureError(f"{out_dir} is not empty; use --force to write the model's files over its files")
    quiet_loading_bars(args)
    out = write_tiny_model(args.family, out_dir, real_widths=args.real_widths, seed=args.seed)
    print(f"wrote tiny {args.family} model to {out}")
    return 0


def cmd_dataset_check(args: argparse.Namespace) -> int:
    import json

    from conjure.data.check import check_source

    report = check_source(
        Path(args.source), resolution=args.resolution, bucket_step=args.bucket_step, max_tokens=args.max_tokens
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(report.text())
    return 0 if report.ok else EXIT_DATASET_ERRORS


def cmd_dataset_jsonl(args: argparse.Namespace) -> int:
    from conjure.data.sources import write_jsonl

    count = write_jsonl(Path(args.folder), Path(args.out), force=args.force)
    print(f"wrote {args.out} ({count} images)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from conjure.demo import run_demo

    quiet_loading_bars(args)
    return run_demo(method=args.method, family=args.family, model=args.model, out=Path(args.out), steps=args.steps)


DEFAULT_UI_WORKSPACE = "~/.conjure"


def ui_settings(args: argparse.Namespace) -> tuple[Path, str | None, str]:
    """(workspace, token, address to open) for `conjure ui`. A server reachable from other machines always
    needs a token: one is made up when none is given; one given shorter than MIN_TOKEN_LENGTH (an empty
    `--token "$UNSET"` included) is refused, never taken as "no token"."""
    import secrets

    from conjure.ui.app import LOCAL_HOSTS, check_token

    token = args.token
    if token is None and args.host not in LOCAL_HOSTS:
        token = secrets.token_urlsafe(18)
    check_token(token, args.host)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    address = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    return Path(args.workspace).expanduser(), token, address


def cmd_ui(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from conjure.ui.app import LOCAL_HOSTS, create_app

    workspace, token, address = ui_settings(args)
    # A busy port is the usual failure: say so in one line, before uvicorn logs its own traceback.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise ConjureError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port") from exc
    app = create_app(workspace, host=args.host, port=args.port, token=token)
    print(f"conjure ui: workspace {app.state.workspace.root}", flush=True)
    print(f"open {address}", flush=True)
    if args.host in ("0.0.0.0", "::"):
        print(f"  from other machines: {address.replace('127.0.0.1', socket.gethostname(), 1)}", flush=True)
    if args.host not in LOCAL_HOSTS:
        print("  listening beyond this machine: anyone who has the token can open any of your folders as a data "
              "set, read and change its images and captions, and train", flush=True)
    print("Ctrl-C stops the server (a running job saves a checkpoint first)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set optimizer.learning_rate=1e-3 (repeatable)",
    )


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("config", nargs="?", help="config YAML (optional with --resume: the run's own config)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run (a run or checkpoint folder, or 'latest')")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="train in N processes on this machine, one per GPU, through accelerate's launcher")
    _add_overrides(p)
    p.set_defaults(func=cmd_train)


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cfg = sub.add_parser("config", help="write, check and describe configs")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = cfg_sub.add_parser("new", help="write a commented starter config")
    p.add_argument("type", help="config type: textual_inversion, lora, pivotal or finetune (the model family is basic.family; "
                   "version 1 names such as sdxl_lora still work)")
    p.add_argument("-o", "--out", help="file to write (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_config_new)
    p = cfg_sub.add_parser("schema", help="print the JSON schema of a config type")
    p.add_argument("type")
    p.set_defaults(func=cmd_config_schema)
    p = cfg_sub.add_parser("check", help="validate a config file")
    p.add_argument("config")
    p.add_argument("--show", action="store_true", help="print the config with every default filled in")
    _add_overrides(p)
    p.set_defaults(func=cmd_config_check)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.runs.apps import APPS

    p = sub.add_parser("export", help="copy a checkpoint's files out of a run (pick the best step), or install "
                       "them into your app")
    p.add_argument("run_dir")
    p.add_argument("--step", required=True, help="step number, 'latest', or 'best' (the step "
                   "`conjure runs score` suggests)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", help="folder to copy to (e.g. your app's embeddings folder)")
    where.add_argument("--to-app", choices=list(APPS), help="install into this app's folders under --app-dir, "
                       "each file where the app reads its kind, and print what to type in the app")
    where.add_argument("--invokeai-url", metavar="URL", help="install through a running InvokeAI's model manager "
                       "(e.g. http://127.0.0.1:9090; InvokeAI must run on this machine)")
    p.add_argument("--app-dir", metavar="DIR", help="the app's own folder (ComfyUI's, the one with webui.py, "
                   "InvokeAI's root with invokeai.yaml)")
    p.add_argument("--name", help="file name stem to use instead of the trained token's name")
    p.add_argument("--force", action="store_true", help="overwrite existing files (with --invokeai-url: replace "
                   "InvokeAI's models of the same names)")
    p.set_defaults(func=cmd_export)


def _add_tiny_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.families import FAMILIES  # each has a tiny model; models.tiny loads to write one

    p = sub.add_parser("tiny-model", help="write a small random-weight model (for tests and trying things out)")
    p.add_argument("family", choices=list(FAMILIES))
    p.add_argument("dir")
    p.add_argument("--real-widths", action="store_true", help="real text-encoder and cross-attention widths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty (files of the same "
                   "names are overwritten)")
    p.set_defaults(func=cmd_tiny_model)


def _add_dataset(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.data.check_settings import CheckSettings

    ds = sub.add_parser("dataset", help="check a data set, or list a folder as a .jsonl source")
    ds_sub = ds.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    p = ds_sub.add_parser(
        "check", help="report unreadable images, missing or long captions, small images, duplicates",
        description="Check a data source as training reads it, without changing it. Exit code 0: no errors "
        "(warnings allowed); 1: errors (unreadable images, nothing usable).",
    )
    p.add_argument("source", help="a folder of images (+ same-name .txt captions), a .jsonl file or a Hugging Face "
                   "data set (folder or hf:owner/name)")
    for name, setting in CheckSettings.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=setting.default,
                       help=f"{setting.description} (default: {setting.default})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_dataset_check)
    p = ds_sub.add_parser("jsonl", help="write the .jsonl source listing a folder's images and captions")
    p.add_argument("folder", metavar="FOLDER", help="a folder of images (+ same-name .txt captions)")
    p.add_argument("out", metavar="OUT.jsonl", help="file to write; image paths are relative to its folder")
    p.add_argument("--force", action="store_true", help="overwrite OUT.jsonl")
    p.set_defaults(func=cmd_dataset_jsonl)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.families import FAMILIES

    p = sub.add_parser("demo", help="train a small example end to end on the CPU")
    p.add_argument("--method", default="ti", help="training method: ti, lora, dora or pivotal (default: ti)")
    p.add_argument("--family", default="sd1", help=f"model family: {', '.join(list(FAMILIES)[:-1])} or {list(FAMILIES)[-1]} (default: sd1)")
    p.add_argument("--model", help="a model folder/hub id, or 'tiny' for a random-weight tiny model (default: the toy model)")
    p.add_argument("--out", default="conjure-demo", help="output folder (default: ./conjure-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.set_defaults(func=cmd_demo)


def _add_ui(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ui", help="the web app: edit data sets, configure and queue training runs, watch them",
        description="Serve conjure's web app (one page, no internet needed) and print its address; it opens "
        "nothing by itself. Runs started from it are `conjure train` processes, one at a time.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; any other needs a token)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--workspace", default=DEFAULT_UI_WORKSPACE, metavar="DIR",
                   help=f"folder for the job queue, saved configs, runs and thumbnails (default: {DEFAULT_UI_WORKSPACE})")
    p.add_argument("--token", help="require this token (at least 16 characters) from the browser (default: none "
                   "on 127.0.0.1/localhost; a random one, printed in the address, on any other host)")
    p.set_defaults(func=cmd_ui)


def build_parser() -> argparse.ArgumentParser:
    from conjure import __version__

    parser = argparse.ArgumentParser(prog="conjure", description="Teach Stable Diffusion models new things.")
    parser.add_argument("--version", action="version", version=f"conjure {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_config, _add_export, _add_tiny_model, _add_dataset, _add_demo, _add_ui):
        add(sub)
    from conjure.data.caption_command import add_caption
    from conjure.estimate.command import add_estimate
    from conjure.export.command import add_convert
    from conjure.inspection.command import add_inspect
    from conjure.merging.command import add_merge
    from conjure.runs.score import add_runs
    from conjure.tools.cli import add_lora

    add_convert(sub)
    add_caption(sub)
    add_estimate(sub, _add_overrides)
    add_inspect(sub)
    add_lora(sub)
    add_merge(sub)
    add_runs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args)
    except ConjureError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.debug:
            raise
        if exc.errno == errno.ENOSPC:
            print(f"error: disk full{f' while writing {exc.filename}' if exc.filename else ''}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug, but the user still gets one line and a way to report it
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
