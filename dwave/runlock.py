"""One training job per run directory: RUN_DIR/lock, held by rank 0 for the whole run.

Two jobs on one run directory would both write checkpoints and config.json, and one run's
checkpoint would end up holding the other's weights. The lock is a POSIX record lock
(fcntl.lockf) on RUN_DIR/lock: local file systems, NFS (v4, or v3 with lockd) and the parallel
file systems of clusters (Lustre mounted with flock/localflock, GPFS, BeeGFS) honour it
between machines, and it goes away with the process that holds it, however that process dies
(the kernel, or the NFS server's lease, releases it): no stale lock to clean up by hand.

Only rank 0 takes it: all ranks of one job share the run directory. The file's text names the
holder (host, pid, SLURM job), for the error the next job prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

from .errors import DwaveError

LOCK_NAME = "lock"


class RunDirLock:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise a one-line DwaveError naming the holder."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DwaveError(f"cannot create {self.path} ({exc.strerror}): check that the run "
                             "dir is writable") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise DwaveError(
                    f"run dir {self.run_dir} is in use by another training job ({holder or 'holder unknown'}): "
                    "wait for it to end, stop it, or use another --run-dir") from None
            raise DwaveError(f"cannot lock {self.path} ({exc.strerror}): the file system may "
                             "not support locks; use a run dir on one that does") from None
        job = os.environ.get("SLURM_JOB_ID")
        text = (f"host {socket.gethostname()} pid {os.getpid()}"
                + (f" SLURM job {job}" if job else "")
                + f" since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the record lock
            self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        return ""
