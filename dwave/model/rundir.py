"""The run directory: a format with rules, owned here (as dwave.store.track_store owns the store).

    RUN_DIR/config.json          {"model": ModelConfig, "train": TrainConfig, "world_size",
                                 "step", "written_by"}: written_by is the software of the
                                 last writer (dwave.versions); `step` is that of the newest
                                 complete checkpoint, written only after it (a failed save
                                 leaves the one before);
                                 `dwave generate` reads the architecture from it
    RUN_DIR/checkpoints/         ckpt-STEP.{index,data-*} and TF's `checkpoint` state file,
                                 which is replaced atomically after the files are complete;
                                 each checkpoint holds `dwave_model`, the JSON of the
                                 ModelConfig it was saved from: weights are restored only
                                 into that model (a checkpoint of another run is refused)
    RUN_DIR/validation.json      {"windows": how the validation windows are drawn (window,
                                 batch_size, seed, val_batches: the run's first, kept on every
                                 resume so the losses stay comparable), "baselines": the
                                 store's, "history": every validation loss so far}
    RUN_DIR/samples/             step-N.wav + .png: listening samples (dwave.train.listen)
    RUN_DIR/tensorboard/         train/ and validation/ event files
    RUN_DIR/lock                 held by rank 0 of the training job (dwave.files.DirectoryLock)

`dwave train` writes it, `dwave generate` and `dwave status` (and through it
slurm/train.sbatch) read it; TensorFlow is imported only by the functions that need it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import NamedTuple

from ..errors import DwaveError, describe
from ..files import atomic_write_json
from ..versions import software_versions
from .config import ModelConfig

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "ckpt"
VALIDATION_LOG = "validation.json"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"


# -- config.json and progress -----------------------------------------------------------------


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
        raise DwaveError(f"{path} is not a dwave run config ({describe(exc)[:100]})") \
            from None
    if step < 0 or steps < 1:
        raise DwaveError(f"{path} is not a dwave run config (step {step} of {steps})")
    return step, steps


def write_run_config(run_dir: str, model: ModelConfig, train: dict, world_size: int,
                     step: int) -> None:
    atomic_write_json(os.path.join(run_dir, CONFIG), {
        "model": model.to_dict(), "train": train, "world_size": world_size, "step": step,
        "written_by": software_versions()})


# -- checkpoints ------------------------------------------------------------------------------


#: The checkpoint entry that records the model a checkpoint holds.
MODEL_RECORD = "dwave_model"
_MODEL_RECORD_KEY = f"{MODEL_RECORD}/.ATTRIBUTES/VARIABLE_VALUE"


def model_record(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def checkpoint_manager(run_dir: str, keep: int, config: ModelConfig, **objects):
    """(tf.train.Checkpoint of `objects`, a CheckpointManager over RUN_DIR/checkpoints).

    The manager saves `objects` and the record of `config`; the checkpoint returned restores
    `objects` alone (checkpoints written before the record existed have none to match)."""
    import tensorflow as tf

    record = tf.Variable(model_record(config), trainable=False, dtype=tf.string)
    directory = os.path.join(run_dir, CHECKPOINTS)
    try:
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(**objects, **{MODEL_RECORD: record}), directory,
            max_to_keep=keep, checkpoint_name=CHECKPOINT_PREFIX)
    except (ValueError, tf.errors.OpError):
        raise DwaveError(_damaged_state_message(directory)) from None
    return tf.train.Checkpoint(**objects), manager


_CHECKPOINT_FILE = re.compile(rf"checkpoint|{CHECKPOINT_PREFIX}-\d+\.(index|data-\d+-of-\d+)"
                              r"|.*\.tmp[0-9a-f]*|.*_temp(_[0-9a-f]+)?(/.*)?")


def check_checkpoints_folder(run_dir: str) -> None:
    """A new run (no config.json) writes into RUN_DIR/checkpoints only if it holds nothing but
    dwave's checkpoint files (a first start killed before config.json was written): another
    tool's checkpoints there are the user's, not a run to resume or to mix with."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DwaveError(f"{folder}: {exc.strerror}: {run_dir} cannot hold a run here; use "
                         "another --run-dir") from None
    foreign = sorted(n for n in names if not _CHECKPOINT_FILE.fullmatch(n))
    if foreign:
        raise DwaveError(
            f"{folder} holds files dwave did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}) and {run_dir} has no config.json: it is "
            "not a dwave run dir; use a new --run-dir (dwave leaves those files alone)")


def _if_damaged(path: str) -> str:
    """What to do about a checkpoint whose data cannot be read: resume from the one before."""
    directory, name = os.path.split(path)
    step = re.fullmatch(rf"{CHECKPOINT_PREFIX}-(\d+)", name)
    steps = checkpoint_steps(directory) if step and os.path.isdir(directory) else []
    before = [s for s in steps if s < int(step.group(1))]
    if not before:
        return "If it is damaged, the run can only start again in a new --run-dir"
    return (f"If it is damaged (a disk that filled up as it was written), move its files aside "
            f"and write `model_checkpoint_path: \"{CHECKPOINT_PREFIX}-{before[-1]}\"` into "
            f"{os.path.join(directory, 'checkpoint')} to resume from the one before")


def check_checkpoint_model(path: str, config: ModelConfig, run_dir: str,
                           legacy_ok: bool = True) -> None:
    """Refuse a checkpoint saved from another model than `run_dir`'s (`config`), naming the
    difference. One without a record (written by a dwave before checkpoints had one) is
    accepted only from the run's own checkpoints/ folder, and only when `legacy_ok` (the run
    has its config.json): elsewhere nothing says whose it is."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        raise DwaveError(f"cannot read checkpoint {path}: {reason}") from None
    if not reader.has_tensor(_MODEL_RECORD_KEY):
        own = os.path.join(os.path.realpath(run_dir), CHECKPOINTS)
        if legacy_ok and os.path.realpath(os.path.dirname(path)) == own:
            return
        raise DwaveError(
            f"checkpoint {path} does not record which model it holds (not written by dwave, or "
            f"by a dwave older than this one), so nothing says it belongs to {run_dir}: use "
            "the run dir it was trained in")
    try:
        saved = json.loads(reader.get_tensor(_MODEL_RECORD_KEY))
    except (tf.errors.OpError, IndexError, ValueError, TypeError) as exc:
        raise DwaveError(f"cannot restore checkpoint {path}: its data is damaged "
                         f"({describe(exc)[:80]}). {_if_damaged(path)}") \
            from None
    try:  # a record from before a field existed reads as ModelConfig reads it (its default)
        saved = ModelConfig.from_dict(saved).to_dict()
    except DwaveError:
        pass  # unknown fields: compared as they are, below
    have = config.to_dict()
    differences = [f"{key} {saved.get(key)!r} (the run's: {have.get(key)!r})"
                   for key in sorted(set(saved) | set(have)) if saved.get(key) != have.get(key)]
    if differences:
        raise DwaveError(f"checkpoint {path} holds another model than {run_dir}: "
                         f"{'; '.join(differences)}; use a checkpoint of this run, or the run "
                         "dir the checkpoint belongs to")


# The checkpoint's name for the moving average of the weights (train --ema): a list of
# variables in the order of the model's trainable variables.
AVERAGE = "average"


def holds_average(path: str) -> bool:
    """Whether the checkpoint at `path` holds a moving average of the weights."""
    import tensorflow as tf

    return any(name.startswith(AVERAGE + "/") for name, _ in tf.train.list_variables(path))


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


def restore_latest(checkpoint, manager, config: ModelConfig, run_dir: str,
                   resuming: bool) -> str | None:
    """Restore the latest checkpoint, if any; an unreadable or foreign one is a clear error."""
    import tensorflow as tf

    path = manager.latest_checkpoint
    if path is None:
        return None
    check_checkpoint_model(path, config, run_dir, legacy_ok=resuming)
    try:
        # expect_partial: the record is checked above, not restored
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise DwaveError(f"cannot restore checkpoint {path}: {reason}. {_if_damaged(path)}") \
            from None
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


VALIDATION_WINDOW_FIELDS = ("window", "batch_size", "seed", "val_batches")


def validation_windows(run_dir: str, resuming: bool, flags: dict) -> dict:
    """How this run's validation windows are drawn: a resumed run's recorded choice (a resume
    with another --window, --batch-size or --seed keeps scoring the same windows), else
    `flags`' (read by every rank: the run dir is on a shared file system)."""
    saved = read_validation_log(run_dir) if resuming else None
    windows = saved.get("windows") if isinstance(saved, dict) else None
    if isinstance(windows, dict) and all(isinstance(windows.get(k), int) and windows[k] >= 0
                                         for k in VALIDATION_WINDOW_FIELDS):
        return {k: windows[k] for k in VALIDATION_WINDOW_FIELDS}
    return {k: flags[k] for k in VALIDATION_WINDOW_FIELDS}


def versus_baselines(bits: float, baselines: dict | None) -> str:
    """A validation loss set against the run's baselines (validation.json's "baselines"), as
    every report of one words it: " (bigram B: +-D; code histogram U)"; "" without them."""
    if not baselines:
        return ""
    bigram = baselines["bigram_bits"]
    return (f" (bigram {bigram:.3f}: {bits - bigram:+.3f}; code histogram "
            f"{baselines['unigram_bits']:.3f})")


class ValidationLog:
    """RUN_DIR/validation.json: how the validation windows are drawn, the store's baselines
    (computed anew at each start) and every validation loss of the run (kept across resumes),
    rewritten whole after each validation."""

    def __init__(self, run_dir: str, resuming: bool, windows: dict):
        self.path = os.path.join(run_dir, VALIDATION_LOG)
        self.windows, self.baselines, self.history = windows, None, []
        saved = read_validation_log(run_dir) if resuming else None
        if isinstance(saved, dict) and isinstance(saved.get("history"), list):
            self.history = saved["history"]  # a damaged log is only history: start it again

    def versus_baselines(self, bits: float) -> str:
        return versus_baselines(bits, self.baselines)

    def add(self, step: int, bits: float, seconds: float) -> None:
        """`seconds`: since this process started training (a resumed run starts again at 0)."""
        self.history = [h for h in self.history if h["step"] < step]  # a resume redoes steps
        self.history.append({"step": step, "bits": bits, "seconds": round(seconds, 2)})
        try:
            atomic_write_json(self.path, {"windows": self.windows, "baselines": self.baselines,
                                          "history": self.history})
        except OSError as exc:  # a report, not state: a full disk must not stop training here
            print(f"warning: cannot write {self.path} ({exc.strerror})", file=sys.stderr)


# -- a run's model, for generation ------------------------------------------------------------


class LoadedModel(NamedTuple):
    model: object  # a WaveNet (dwave.model.network) holding the checkpoint's weights
    config: ModelConfig
    checkpoint: str  # the checkpoint's path
    averaged: bool  # the weights are the run's moving average of them (--ema)


def load_model(run_dir: str, checkpoint: str | None = None) -> LoadedModel:
    """A training run's model for generation, from `checkpoint` or the run's latest; clear
    errors for what is missing."""
    if not os.path.isdir(run_dir):
        raise DwaveError(f"run dir {run_dir} does not exist")
    saved = read_run_config(run_dir)
    if saved is None:
        raise DwaveError(f"{run_dir} has no config.json: is it a `dwave train` run dir?")
    config = saved[0]
    path = checkpoint or latest_checkpoint(run_dir)
    if path is None:
        raise DwaveError(f"{run_dir} has no checkpoint yet: train first (or pass --checkpoint)")
    check_checkpoint_model(path, config, run_dir)
    import tensorflow as tf

    from .network import WaveNet

    model = WaveNet(config)
    # A run trained with --ema generates from the moving average of its weights: the weights
    # its validation scored.
    average = ([tf.Variable(tf.zeros_like(v)) for v in model.trainable_variables]
               if holds_average(path) else [])
    try:
        tf.train.Checkpoint(model=model, **({AVERAGE: average} if average else {})) \
            .restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise DwaveError(f"cannot restore checkpoint {path}: {reason}") from None
    for value, v in zip(average, model.trainable_variables):
        v.assign(value)
    return LoadedModel(model, config, path, bool(average))
