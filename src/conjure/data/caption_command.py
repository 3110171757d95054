"""`conjure caption FOLDER`: .txt captions for a folder's images from an image-to-text model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_caption(args: argparse.Namespace) -> int:
    from conjure.cli import quiet_loading_bars
    from conjure.data.autocaption import caption_images, folder_images, load_captioner

    settings = _settings(args)
    images = folder_images(Path(args.folder))
    quiet_loading_bars(args)
    report = caption_images(images, load_captioner(settings), settings)
    for image, reason in report.skipped:
        print(f"skipped {image}: {reason}", file=sys.stderr)
    print(f"{args.folder}: {report.summary()}")
    return 0


def _settings(args: argparse.Namespace):  # noqa: ANN202 - CaptionSettings, imported lazily
    from conjure.data.caption_settings import CaptionSettings

    return CaptionSettings(**{name: getattr(args, name) for name in CaptionSettings.model_fields})


def add_caption(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from conjure.data.caption_settings import CaptionSettings

    p = sub.add_parser(
        "caption", help="write .txt captions for a folder's images with an image-to-text model",
        description="Caption every image of FOLDER (subfolders too) that has no caption yet, writing <name>.txt "
        "beside it. Run it again after a stop: it goes on with the images still without a caption.",
    )
    p.add_argument("folder", metavar="FOLDER", help="a folder of images")
    for name, setting in CaptionSettings.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--trigger"] if name == "prefix" else [])
        if setting.annotation is bool:
            p.add_argument(*flags, dest=name, action="store_true", help=setting.description)
            continue
        choices = getattr(setting.annotation, "__args__", None) if name in ("style", "device") else None
        kind = int if setting.annotation is int else str
        shown = f" (default: {setting.default})" if setting.default not in (None, "") else ""
        p.add_argument(*flags, dest=name, type=kind, choices=choices, default=setting.default,
                       help=setting.description + shown)
    p.set_defaults(func=cmd_caption)
