"""Files every stage writes the same careful way: a directory proved writable before long work,
JSON replaced atomically, and a directory's lock that names its holder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from .errors import DwaveError

LOCK = "lock"


def ensure_writable(directory: str) -> None:
    """Make `directory` and prove it writable now (an OSError if not): TensorFlow's writers and
    a long generation would otherwise fail minutes later."""
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".dwave-write-test-{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)


def atomic_write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # ours, half-written
        raise


# One job per directory (a training job's run dir, a generation job's --out): DIRECTORY/lock,
# held by rank 0 for the whole job.
#
# Two training jobs on one run directory would both write checkpoints and config.json, and one
# run's checkpoint would end up holding the other's weights. The lock is a POSIX record lock
# (fcntl.lockf) on DIRECTORY/lock: local file systems, NFS (v4, or v3 with lockd) and the parallel
# file systems of clusters (Lustre mounted with flock/localflock, GPFS, BeeGFS) honour it
# between machines, and it goes away with the process that holds it, however that process dies
# (the kernel, or the NFS server's lease, releases it): no stale lock to clean up by hand.
#
# Only rank 0 takes it: all ranks of one job share the directory. The file's text names the
# holder (host, pid, SLURM job), for the error the next job prints.


class DirectoryLock:
    """DIRECTORY/lock, held from acquire() until release() or the holder's death: one job at a
    time writes the directory. `what` names the directory and `job` the holder in the error
    (`flag`: the option that chooses another)."""

    def __init__(self, directory: str, what: str = "run dir", job: str = "training job",
                 flag: str = "--run-dir"):
        self.run_dir = directory
        self.path = os.path.join(directory, LOCK)
        self.what, self.job, self.flag = what, job, flag
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise a one-line DwaveError naming the holder."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            # O_NOFOLLOW: a symlink at RUN_DIR/lock is not ours to truncate the target of.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DwaveError(f"{self.path} is a symlink; dwave does not follow it (it would "
                                 "write over its target): move it away and rerun") from None
            raise DwaveError(f"cannot create {self.path} ({exc.strerror}): check that the "
                             f"{self.what} is writable") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise DwaveError(
                    f"{self.what} {self.run_dir} is in use by another {self.job} "
                    f"({holder or 'holder unknown'}): wait for it to end, stop it, or use "
                    f"another {self.flag}") from None
            raise DwaveError(f"cannot lock {self.path} ({exc.strerror}): the file system may "
                             f"not support locks; use a {self.what} on one that does") from None
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
