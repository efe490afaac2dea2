"""The run directory: a format with rules, owned here (as dwave.store owns the store).

    RUN_DIR/config.json          {"model": ModelConfig, "train": TrainConfig, "world_size",
                                 "step"}: `step` is that of the newest complete checkpoint,
                                 written only after it (a failed save leaves the one before);
                                 `dwave generate` reads the architecture from it
    RUN_DIR/checkpoints/         ckpt-STEP.{index,data-*} and TF's `checkpoint` state file,
                                 which is replaced atomically after the files are complete
    RUN_DIR/validation.json      the store's baselines and every validation loss so far
    RUN_DIR/samples/             step-N.wav + .png: listening samples (dwave.listen)
    RUN_DIR/tensorboard/         train/ and validation/ event files
    RUN_DIR/lock                 held by rank 0 of the training job (see RunDirLock)

`dwave train` writes it, `dwave generate` and `dwave status` (and through it
slurm/train.sbatch) read it; TensorFlow is imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time

from .config import ModelConfig
from .errors import DwaveError

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "ckpt"
VALIDATION_LOG = "validation.json"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"
LOCK = "lock"


# -- config.json and progress -----------------------------------------------------------------


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


def read_run_config(run_dir: str) -> tuple[ModelConfig, dict] | None:
    """(model config, training flags) of a run, or None where there is no config.json yet."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        return ModelConfig.from_dict(data["model"]), data.get("train", {})
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DwaveError(f"{path} is not a dwave run config ({exc})") from None


def read_progress(run_dir: str) -> tuple[int, int]:
    """(step of the last checkpoint, steps asked for) of a run, from its config.json (no
    TensorFlow). A missing or foreign run dir is a DwaveError."""
    if not os.path.isdir(run_dir):
        raise DwaveError(f"run dir {run_dir} does not exist")
    path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(path):
        raise DwaveError(f"{run_dir} has no config.json: is it a `dwave train` run dir?")
    try:
        with open(path) as f:
            data = json.load(f)
        step, steps = int(data["step"]), int(data["train"]["steps"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            OverflowError) as exc:
        raise DwaveError(f"{path} is not a dwave run config ({type(exc).__name__}: "
                         f"{str(exc)[:100]})") from None
    if step < 0 or steps < 1:
        raise DwaveError(f"{path} is not a dwave run config (step {step} of {steps})")
    return step, steps


def write_run_config(run_dir: str, model: ModelConfig, train: dict, world_size: int,
                     step: int) -> None:
    atomic_write_json(os.path.join(run_dir, CONFIG), {
        "model": model.to_dict(), "train": train, "world_size": world_size, "step": step})


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_manager(run_dir: str, keep: int, **objects):
    """(tf.train.Checkpoint of `objects`, its CheckpointManager over RUN_DIR/checkpoints)."""
    import tensorflow as tf

    checkpoint = tf.train.Checkpoint(**objects)
    directory = os.path.join(run_dir, CHECKPOINTS)
    try:
        manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep,
                                             checkpoint_name=CHECKPOINT_PREFIX)
    except (ValueError, tf.errors.OpError):
        raise DwaveError(_damaged_state_message(directory)) from None
    return checkpoint, manager


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the checkpoints whose index file is in `directory`, ascending."""
    pattern = re.compile(rf"{CHECKPOINT_PREFIX}-(\d+)\.index")
    return sorted(int(m.group(1)) for name in os.listdir(directory)
                  if (m := pattern.fullmatch(name)))


def _damaged_state_message(directory: str) -> str:
    """What to do about an empty or damaged checkpoints/checkpoint state file (a full disk, a
    crash of the file system): name the newest checkpoint whose files are there."""
    steps = checkpoint_steps(directory)
    state = os.path.join(directory, "checkpoint")
    if not steps:
        return f"{state} is empty or damaged and no ckpt-N.index is beside it"
    return (f"{state} is empty or damaged; the newest checkpoint beside it is ckpt-{steps[-1]}: "
            f"write `model_checkpoint_path: \"ckpt-{steps[-1]}\"` into it and rerun to resume "
            "from there (removing it would start the run again from step 0)")


def restore_latest(checkpoint, manager) -> str | None:
    """Restore the latest checkpoint, if any; an unreadable one is a clear error."""
    import tensorflow as tf

    path = manager.latest_checkpoint
    if path is None:
        return None
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise DwaveError(f"cannot restore checkpoint {path}: {reason}. Remove it (and its "
                         "line in checkpoints/checkpoint) to resume from the one before") from None
    return path


def latest_checkpoint(run_dir: str) -> str | None:
    import tensorflow as tf

    directory = os.path.join(run_dir, CHECKPOINTS)
    try:
        return tf.train.latest_checkpoint(directory)
    except (ValueError, tf.errors.OpError):
        raise DwaveError(_damaged_state_message(directory)) from None


# -- the validation log -----------------------------------------------------------------------


def read_validation_log(run_dir: str) -> dict | None:
    """RUN_DIR/validation.json ({"baselines": ..., "history": [...]}), or None if absent or
    unreadable (it is a report, not state the run needs)."""
    try:
        with open(os.path.join(run_dir, VALIDATION_LOG)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class ValidationLog:
    """RUN_DIR/validation.json: the store's baselines (computed anew at each start) and every
    validation loss of the run (kept across resumes), rewritten whole after each validation."""

    def __init__(self, run_dir: str, resuming: bool):
        self.path = os.path.join(run_dir, VALIDATION_LOG)
        self.baselines, self.history = None, []
        saved = read_validation_log(run_dir) if resuming else None
        if isinstance(saved, dict) and isinstance(saved.get("history"), list):
            self.history = saved["history"]  # a damaged log is only history: start it again

    def versus_baselines(self, bits: float) -> str:
        if not self.baselines:
            return ""
        bigram = self.baselines["bigram_bits"]
        return (f" (bigram {bigram:.3f}: {bits - bigram:+.3f}; code histogram "
                f"{self.baselines['unigram_bits']:.3f})")

    def add(self, step: int, bits: float, seconds: float) -> None:
        """`seconds`: since this process started training (a resumed run starts again at 0)."""
        self.history = [h for h in self.history if h["step"] < step]  # a resume redoes steps
        self.history.append({"step": step, "bits": bits, "seconds": round(seconds, 2)})
        try:
            atomic_write_json(self.path, {"baselines": self.baselines, "history": self.history})
        except OSError as exc:  # a report, not state: a full disk must not stop training here
            print(f"warning: cannot write {self.path} ({exc.strerror})", file=sys.stderr)


# -- the lock ---------------------------------------------------------------------------------
# One training job per run directory: RUN_DIR/lock, held by rank 0 for the whole run.
#
# Two jobs on one run directory would both write checkpoints and config.json, and one run's
# checkpoint would end up holding the other's weights. The lock is a POSIX record lock
# (fcntl.lockf) on RUN_DIR/lock: local file systems, NFS (v4, or v3 with lockd) and the parallel
# file systems of clusters (Lustre mounted with flock/localflock, GPFS, BeeGFS) honour it
# between machines, and it goes away with the process that holds it, however that process dies
# (the kernel, or the NFS server's lease, releases it): no stale lock to clean up by hand.
#
# Only rank 0 takes it: all ranks of one job share the run directory. The file's text names the
# holder (host, pid, SLURM job), for the error the next job prints.


class RunDirLock:
    """RUN_DIR/lock, held from acquire() until release() or the holder's death."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
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
                    f"run dir {self.run_dir} is in use by another training job "
                    f"({holder or 'holder unknown'}): wait for it to end, stop it, or use "
                    "another --run-dir") from None
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
