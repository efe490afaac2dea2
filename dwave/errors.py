"""The one exception type the CLI turns into a one-line error instead of a traceback."""


class DwaveError(Exception):
    """A user-facing error: bad flag, bad config, missing input. The message says what to do."""


def printable(text: str) -> str:
    """`text` with control and format characters escaped (\\x1b, \\n, \\u202e, ...): names from
    archives and file systems are printed as they are, and a file named with an escape sequence
    must not rewrite the user's terminal or forge a line of output."""
    import unicodedata

    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        if unicodedata.category(c) in ("Cc", "Cf") else c
        for c in str(text))
