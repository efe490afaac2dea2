"""The one exception type the CLI turns into a one-line error instead of a traceback."""


class DwaveError(Exception):
    """A user-facing error: bad flag, bad config, missing input. The message says what to do."""


#: Packages a lean install may lack (`pip install wavenet-dwave` without an extra; a
#: preprocessing node without TensorFlow; a laptop without Horovod), and how to get each.
OPTIONAL_PACKAGES = {
    "tensorflow": "TensorFlow, which is not installed: pip install 'wavenet-dwave[cpu]' (or "
                  "[gpu]), or run `bash scripts/setup.sh` in dwave's checkout",
    "horovod": "Horovod, which is not installed (one process trains without it; several ranks "
               "need it): `bash scripts/install-horovod.sh .venv/bin/python cpu` in dwave's "
               "checkout builds it against this TensorFlow and MPI",
    "mpi4py": "mpi4py, which is not installed: pip install mpi4py (it needs an MPI library, "
              "e.g. apt-get install libopenmpi-dev)",
}


def missing_package(exc: ModuleNotFoundError) -> str | None:
    """What to say for an import that failed because one of OPTIONAL_PACKAGES is missing."""
    root = (exc.name or "").split(".")[0]
    return OPTIONAL_PACKAGES.get(root)


def describe(exc: BaseException) -> str:
    """An exception in words for a one-line error: its message, or what its kind means where
    the message is empty or only a class name would say it (a user reads no Python)."""
    kinds = ((FileNotFoundError, "nothing there"), (PermissionError, "permission denied"),
             (ConnectionRefusedError, "connection refused"), (TimeoutError, "timed out"),
             (KeyError, "an entry is missing"))
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for kind, words in kinds:
        if isinstance(exc, kind):
            return words if not text or isinstance(exc, KeyError) else f"{words}: {text}"
    if "NotFound" in type(exc).__name__:  # zarr's GroupNotFoundError, botocore's NoSuchKey
        return "nothing there"
    return text or "an unexpected error"


def printable(text: str) -> str:
    """`text` with control and format characters escaped (\\x1b, \\n, \\u202e, ...): names from
    archives and file systems are printed as they are, and a file named with an escape sequence
    must not rewrite the user's terminal or forge a line of output."""
    import unicodedata

    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        if unicodedata.category(c) in ("Cc", "Cf") else c
        for c in str(text))
