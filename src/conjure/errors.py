"""The one exception type that the CLI turns into a single clear line on stderr.

Raise `ConjureError` for anything the user can fix (bad config, missing data, a path that is not a
model). Everything else is a bug and keeps its traceback.

The `conjure` command's exit codes live here too, beside the error they report, so that the web app
reads a finished job's code without importing the CLI.
"""

from __future__ import annotations

from pathlib import Path

EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
EXIT_DATASET_ERRORS = 1  # `conjure dataset check` found errors (a report, not a failure of the command)


class ConjureError(Exception):
    """A problem the user can fix; its message is shown as-is, without a traceback."""


def refuse_overwrite(path: Path, force: bool) -> Path:
    """`path`, unless it exists and the command was not given --force (the one wording every command uses)."""
    if path.exists() and not force:
        raise ConjureError(f"{path} exists; use --force to overwrite")
    return path
