"""The one exception type the CLI turns into a one-line error instead of a traceback."""


class DwaveError(Exception):
    """A user-facing error: bad flag, bad config, missing input. The message says what to do."""
