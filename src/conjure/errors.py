"""The one exception type that the CLI turns into a single clear line on stderr.

Raise `ConjureError` for anything the user can fix (bad config, missing data, a path that is not a
model). Everything else is a bug and keeps its traceback.
"""


class ConjureError(Exception):
    """A problem the user can fix; its message is shown as-is, without a traceback."""
