"""The software that wrote a run dir or a store: `dwave --version` and the `written_by` record.

Read from the installed distributions' metadata, so asking costs no TensorFlow import (a
second on a laptop, more on a cluster's shared file system). A package that is not installed
reads as None: a store written on a preprocessing node without TensorFlow says so.
"""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__

# Each engine under the names its wheels go by (the first installed one is reported).
_DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos"),
    "horovod": ("horovod",),
    "zarr": ("zarr",),
    "numpy": ("numpy",),
}


def _installed(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def software_versions() -> dict[str, str | None]:
    """{"dwave", "python", "tensorflow", "horovod", "zarr", "numpy"} -> version or None."""
    return {"dwave": __version__, "python": platform.python_version(),
            **{key: _installed(names) for key, names in _DISTRIBUTIONS.items()}}


def version_line() -> str:
    """What `dwave --version` prints: one line, every engine named."""
    versions = software_versions()
    return "dwave " + versions.pop("dwave") + " (" + ", ".join(
        f"{name} {version or 'not installed'}" for name, version in versions.items()) + ")"
