"""The one exception type that the CLI turns into a single clear line on stderr.

Raise `ConjureError` for anything the user can fix (bad config, missing data, a path that is not a
model). Everything else is a bug and keeps its traceback.

The `conjure` command's exit codes live here too, beside the error they report, so that the web app
reads a finished job's code without importing the CLI.
"""

EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
EXIT_DATASET_ERRORS = 1  # `conjure dataset check` found errors (a report, not a failure of the command)


class ConjureError(Exception):
    """A problem the user can fix; its message is shown as-is, without a traceback."""
