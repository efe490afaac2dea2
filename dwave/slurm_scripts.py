"""`dwave slurm-scripts DIR`: the sbatch scripts (slurm/ in a checkout; installed with the
package under PREFIX/share/wavenet-dwave/slurm) copied where a user submits them from."""

from __future__ import annotations

import filecmp
import os
import shutil
import sys

from .errors import DwaveError

#: Where pip puts slurm/ (setup.cfg's data_files), below the environment's prefix.
INSTALLED = os.path.join("share", "wavenet-dwave", "slurm")
SCRIPTS = ("env.sh", "preprocess.sbatch", "train.sbatch", "generate.sbatch")


def scripts_directory() -> str:
    """The checkout's slurm/ when dwave runs from one, else the installed copy."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm")
    for folder in (checkout, os.path.join(sys.prefix, INSTALLED)):
        if all(os.path.isfile(os.path.join(folder, name)) for name in SCRIPTS):
            return folder
    raise DwaveError(f"the SLURM scripts are neither in {checkout} nor in "
                     f"{os.path.join(sys.prefix, INSTALLED)}: reinstall wavenet-dwave")


def copy_scripts(destination: str) -> list[str]:
    """Copy the scripts into `destination` (made if absent). A file already there with other
    contents (the user's edits) is never overwritten: a one-line error names it. Returns the
    names copied (identical files already there are left as they are)."""
    source = scripts_directory()
    try:
        os.makedirs(destination, exist_ok=True)
    except OSError as exc:
        raise DwaveError(f"{destination}: cannot create it ({exc.strerror})") from None
    clashing = [name for name in SCRIPTS if os.path.exists(os.path.join(destination, name))
                and not filecmp.cmp(os.path.join(source, name),
                                    os.path.join(destination, name), shallow=False)]
    if clashing:
        raise DwaveError(f"{os.path.join(destination, clashing[0])} exists and differs from "
                         "dwave's: keep your edits by choosing another DIR, or move it away")
    copied = []
    for name in SCRIPTS:
        target = os.path.join(destination, name)
        if not os.path.exists(target):
            shutil.copy2(os.path.join(source, name), target)
            copied.append(name)
    return copied
