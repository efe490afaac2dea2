"""Train a WaveNet on a store, synchronously data-parallel with Horovod.

One device:            dwave train STORE --run-dir runs/a
N processes (MPI):     mpirun -np N dwave train STORE --run-dir runs/a
N processes (Horovod): horovodrun -np N dwave train STORE --run-dir runs/a
SLURM:                 srun --mpi=pmix dwave train ...   (see slurm/train.sbatch)

Every rank draws its own windows (seeded by seed, rank and step), computes gradients on them,
and Horovod averages the gradients with a ring allreduce before each identical update, so
N ranks with batch B train exactly like one process with batch N*B (the learning rate is
scaled by N, reached by a warm-up: dwave.train.schedule). Rank 0 alone writes checkpoints,
config, TensorBoard logs and the listening samples. Every collective is in dwave.ranks.

The run directory's layout and rules are dwave.model.rundir's.

Rerunning with the same run directory resumes from the latest checkpoint, optimizer state
included. SIGTERM (SLURM's warning before the time limit, `scancel --signal=TERM`) makes all
ranks stop after the current step, write a checkpoint and exit 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

from ..errors import DwaveError
from ..files import DirectoryLock, ensure_writable
from ..model.config import ModelConfig
from ..model.rundir import (AVERAGE, TENSORBOARD, ValidationLog, check_checkpoints_folder,
                            checkpoint_manager, holds_average, read_run_config, restore_latest,
                            validation_windows, write_run_config)
from ..ranks import Ranks
from ..stop_signal import StopSignal
from .config import TrainConfig, default_learning_rate, resolve_model_config, resume_changes
from .data import UNKNOWN_VALUE

LN2 = math.log(2.0)
# Steps between TensorBoard's training scalars: a curve of hundreds of points for a run of
# thousands of steps (the progress line is timed instead: every 10 s in a log).
TENSORBOARD_EVERY = 10


def run_training(train: TrainConfig, run_dir: str, preset: str | None = None,
                 model_overrides: dict | None = None, storage_options: dict | None = None,
                 log=print) -> dict:
    """Train (or resume) in `run_dir`. Returns a summary dict (rank 0's view)."""
    from ..ranks import start_horovod
    from .trainer import Trainer

    stop = StopSignal()
    # The store and the run dir are checked before TensorFlow loads: a bad one fails in a second.
    run = _resolve_run(train, run_dir, preset, model_overrides or {}, storage_options)
    train, model_config = run.train, run.model
    ranks = start_horovod()
    say = log if ranks.rank == 0 else (lambda *_: None)
    threads = ranks.configure_devices(train.threads)  # before any TensorFlow op runs
    _lock_run_dir(run_dir, ranks)
    # Only once the run dir is ours: a refused second job never looks at the store's tracks.
    data = run.open_data(on_bad_track=train.on_bad_track)
    data.load(say)

    trainer = Trainer(model_config, train.lr, train.warmup_steps, ranks.size, train.precision,
                      ranks, seed=train.seed, decay_steps=train.steps,
                      decay_to=train.decay_to, clip_norm=train.clip_norm, ema=train.ema)
    checkpoints = _Checkpoints(run_dir, train, model_config, trainer)
    restored = checkpoints.restore(run.resuming)
    trainer.broadcast_from_rank0()
    start_step = int(trainer.step.numpy())

    _describe_run(say, run, data, trainer, ranks, threads, restored, start_step)
    history = _validation_log(run_dir, run, data, ranks.rank, say)
    if start_step >= train.steps:
        say(f"run already at step {start_step} >= --steps {train.steps}: nothing to do")
        return {"step": start_step, "stopped": False, "resumed_from": start_step}
    if not run.resuming:
        checkpoints.save(start_step)  # config.json and ckpt-0 on disk from the first second

    report = _Report(run_dir, train, model_config, ranks, data, history, start_step, say)
    # Held here, past the checkpoint: closing a tf.data iterator whose parallel reads are in
    # flight (a stop mid-run) can take seconds, and a launcher's kill comes 5 s after its
    # SIGTERM (horovodrun): the checkpoint is written first.
    batches = data.train.batches(ranks.rank, start_step, train.steps)
    step, loss_bits, val_bits, stopped = _train_steps(trainer, batches, data, train, run.windows,
                                                      ranks, stop, checkpoints, report,
                                                      start_step)
    checkpoints.save(step)
    report.close()
    digests = _check_ranks_in_sync(trainer, ranks)

    summary = {"step": step, "loss_bits": loss_bits, "validation_bits": val_bits,
               "stopped": stopped, "resumed_from": start_step if restored else None,
               "checkpoint": checkpoints.latest if ranks.rank == 0 else None,
               "weights_sha256": digests}
    if stopped:
        say(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}: "
            f"checkpoint written; rerun the same command to resume")
    say(f"done: step {step}, train loss {loss_bits:.3f} bits/sample"
        + (f", validation {val_bits:.3f}" + history.versus_baselines(val_bits)
           if val_bits is not None and history is not None else "")
        + f"; checkpoint {summary['checkpoint']}")
    if stopped:
        # The process leaves without Python's teardown (dwave.cli): Horovod is shut down
        # here, so that MPI is finalized and mpirun sees ranks that ended, not ranks that died.
        ranks.shutdown()
    return summary


def _train_steps(trainer, batches, data, train: TrainConfig, windows: dict, ranks: Ranks, stop,
                 checkpoints, report, start_step: int):
    """The loop: a step, its report, validation and listening when due, a checkpoint when
    due, until --steps or a stop on any rank. Returns (step, train loss, last validation loss
    in bits, stopped)."""
    import tensorflow as tf

    from .watchdog import Watchdog

    watchdog = Watchdog(train.stall_minutes * 60 if ranks.distributed else 0, ranks.rank)
    step, loss_bits, val_bits, stopped = start_step, math.nan, None, False
    while step < train.steps:
        codes, condition = next(batches)
        loss, stop_all = trainer.train_step(codes, condition, tf.constant(stop.requested))
        watchdog.beat()
        step += 1
        loss_bits = float(loss) / LN2
        if not math.isfinite(loss_bits):
            raise DwaveError(f"loss became {loss_bits} at step {step}: lower --lr (now "
                             f"{train.lr:g}) or use --precision fp32")
        report.step(step, loss_bits, trainer, final=step == train.steps or bool(stop_all))
        if data.validation and (step % train.val_every == 0 or step == train.steps):
            started = time.perf_counter()
            with trainer.averaged_weights():
                val_bits = trainer.validation_bits(data.validation, windows["val_batches"])
            watchdog.beat()
            report.validated(step, val_bits, time.perf_counter() - started, trainer,
                             wait=step == train.steps)
        report.listened()
        if bool(stop_all):
            stopped = True
            break
        if step % train.ckpt_every == 0 and step < train.steps:
            checkpoints.save(step)
            watchdog.beat()
    watchdog.stop()
    return step, loss_bits, val_bits, stopped


# -- the run's configuration ------------------------------------------------------------------


@dataclass
class _Run:
    """A run resolved from its flags, its run dir and its store, before TensorFlow loads."""

    train: TrainConfig  # the flags, --lr resolved
    model: ModelConfig
    resuming: bool
    changes: list[str]  # flags changed since the run's last start
    windows: dict  # how the validation windows are drawn (dwave.model.rundir.validation_windows)
    span: int
    open_data: functools.partial  # (on_bad_track) -> dwave.train.data's samplers


def _resolve_run(train: TrainConfig, run_dir: str, preset: str | None, overrides: dict,
                 storage_options: dict | None) -> _Run:
    from .data import open_samplers, scan_store

    saved = read_run_config(run_dir)
    saved_model = saved[0] if saved else None
    train = dataclasses.replace(train, lr=default_learning_rate(train.lr, preset, saved))
    # The condition the run's tracks are labelled by: the saved model's, else the default's.
    scan = scan_store(train.store, storage_options, (saved_model or ModelConfig()).condition)
    values = scan.condition_values
    if train.unlabelled == "skip":  # a new run's classes; a resumed run keeps its own
        values = [v for v in values if v != UNKNOWN_VALUE]
    model_config = resolve_model_config(saved_model, preset, overrides,
                                        train.genre_conditioning, values,
                                        scan.sample_rate, run_dir, scan.quantization_channels)
    resuming = saved_model is not None
    if not resuming:
        check_checkpoints_folder(run_dir)
    changes = resume_changes(saved[1], train) if resuming else []
    span = model_config.span(train.window)
    windows = validation_windows(run_dir, resuming, dataclasses.asdict(train))
    open_data = functools.partial(
        open_samplers, scan, span, train.batch_size, train.seed, train.validation_fraction,
        mode=train.data_mode, values=model_config.condition_values or None, load=False,
        windows_per_read=train.windows_per_read,
        validation_windows=(model_config.span(windows["window"]), windows["batch_size"],
                            windows["seed"]))
    open_data(on_bad_track=None)  # every other check now; the tracks' after the lock
    return _Run(train, model_config, resuming, changes, windows, span, open_data)


def _describe_run(say, run: _Run, data, trainer, ranks: Ranks, threads: int, restored,
                  start_step: int) -> None:
    """The run's first lines: ranks, model, data, optimizer (its rate read back from it),
    precision, resume, and what was left out."""
    import tensorflow as tf

    train, model_config, size = run.train, run.model, ranks.size
    say(f"dwave train: {size} rank{'s' if size > 1 else ''} x {threads} threads, "
        f"{model_config.describe()}, {trainer.model.parameter_count:,} parameters")
    hours = data.train_samples / data.sample_rate / 3600
    say(f"data: {len(data.train.tracks)} training tracks ({hours:.2f} h), "
        f"{len(data.validation.tracks) if data.validation else 0} validation tracks, "
        f"{data.train.mode} mode ({data.train.windows_per_read} window(s) a read); span "
        f"{run.span} = receptive field {model_config.receptive_field} + {train.window}; batch "
        f"{train.batch_size} per rank, {train.batch_size * size} global")
    say("optimizer: Adam, " + (
        f"rate {train.lr:g}" if size == 1 else
        f"rate {train.lr:g} x {size} ranks = {train.lr * size:g}, reached from {train.lr:g} "
        f"over a warm-up of {train.warmup_steps} steps")
        + (f", then a cosine decay to {train.decay_to:g} x at step {train.steps}"
           if train.decay_to < 1 else "")
        + (f", gradients clipped to global norm {train.clip_norm:g}" if train.clip_norm else "")
        + (f", validated on a moving average of the weights ({train.ema:g})" if train.ema else "")
        + f"; now {trainer.learning_rate:.3g} (read from the optimizer)")
    say(_precision_line(trainer.model.product_dtype.name, bool(tf.config.list_logical_devices(
        "GPU")), trainer.model.fused_ops is not None))
    if restored:
        say(f"resuming from {restored} at step {start_step}")
    windows = run.windows
    if run.changes:
        say("flags changed since the run's last start: " + "; ".join(run.changes) + ". "
            f"Validation keeps the run's windows (window {windows['window']}, batch "
            f"{windows['batch_size']}, seed {windows['seed']}, {windows['val_batches']} "
            "batches): its log stays comparable")
    if data.left_out["damaged"]:
        say(f"warning: left out {len(data.left_out['damaged'])} track(s) whose shards are "
            f"missing or cut short (--on-bad-track skip; e.g. {data.left_out['damaged'][0].id} "
            f"in parts/{data.left_out['damaged'][0].part}): `dwave store verify --repair` and "
            "a preprocess rerun bring them back")
    if model_config.conditioned:
        unlabelled = sum(t.condition == UNKNOWN_VALUE for t in data.train.tracks)
        say(f"{model_config.condition} conditioning: {len(model_config.condition_values)} "
            f"classes ({', '.join(model_config.condition_values)})" + (
                f"; {unlabelled} of the {len(data.train.tracks)} training tracks have no "
                f"{model_config.condition} and train as the class '{UNKNOWN_VALUE}' "
                "(--unlabelled skip leaves them out of a new run)" if unlabelled else ""))
    if data.left_out["tracks"]:
        without = UNKNOWN_VALUE in data.left_out["values"]
        say(f"left out {data.left_out['tracks']} track(s) of {model_config.condition}s this run "
            f"was not started with ({', '.join(data.left_out['values'])})" + (
                f": '{UNKNOWN_VALUE}' is the tracks without a {model_config.condition} "
                "(--unlabelled skip)" if without else ": a new --run-dir can condition on them"))


def _precision_line(product_dtype: str, on_gpu: bool, fused: bool) -> str:
    """What the products run in and who runs the gates (read from the model), and whether this
    CPU does the products natively."""
    from ..cores import bf16_products_native

    line = f"precision: matrix products in {product_dtype}, everything else in float32"
    line += ("; gates and conv inputs by dwave's fused CPU kernels" if fused
             else "; gates and conv inputs by TensorFlow's ops")
    if product_dtype == "bfloat16" and not on_gpu and bf16_products_native() is False:
        line += ("; this CPU has neither AVX512-BF16 nor AMX, so TensorFlow emulates them "
                 "(slower than float32): --precision fp32 is faster here")
    return line


# -- the run directory: lock, checkpoints -----------------------------------------------------

_HELD_LOCKS: list = []


def _lock_run_dir(run_dir: str, ranks: Ranks) -> None:
    """Rank 0 takes RUN_DIR/lock for the rest of the process (released when it exits, however
    it exits); every rank learns whether it got it, so a refused job stops on all ranks."""
    refusal = None
    if ranks.rank == 0:
        try:
            lock = DirectoryLock(run_dir)
            lock.acquire()
            _HELD_LOCKS.append(lock)  # never released here: it lives as long as this process
        except DwaveError as exc:
            refusal = str(exc)
    refusal = ranks.from_rank0(refusal)
    if refusal:
        raise DwaveError(refusal)


class _Checkpoints:
    """The run's checkpoints: the model, optimizer, step and (with --ema) the weights' moving
    average, restored on every rank and saved by rank 0."""

    def __init__(self, run_dir: str, train: TrainConfig, model_config: ModelConfig, trainer):
        self.run_dir, self.train, self.model_config = run_dir, train, model_config
        self.trainer, self.rank, self.world_size = trainer, trainer.ranks.rank, trainer.ranks.size
        self.state = dict(model=trainer.model, optimizer=trainer.optimizer, step=trainer.step)
        averages = {AVERAGE: trainer.averages} if trainer.averages else {}
        self.checkpoint, self.manager = checkpoint_manager(
            run_dir, train.keep_checkpoints, model_config, **self.state, **averages)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def restore(self, resuming: bool) -> str | None:
        """The latest checkpoint into the trainer; its path, None for a new run."""
        import tensorflow as tf

        # --ema turned on for a run whose checkpoints have no average: it starts from the weights.
        fresh_average = bool(self.trainer.averages and self.latest
                             and not holds_average(self.latest))
        checkpoint = tf.train.Checkpoint(**self.state) if fresh_average else self.checkpoint
        restored = restore_latest(checkpoint, self.manager, self.model_config, self.run_dir,
                                  resuming)
        if fresh_average:
            self.trainer.start_average()
        return restored

    def save(self, step: int) -> None:
        """Rank 0 writes the step's checkpoint, then the step in config.json that says it
        exists: a failed save (disk full) leaves config.json at the last checkpoint that is
        complete, so `dwave status` never calls a run finished without its final weights."""
        if self.rank != 0:
            return
        import tensorflow as tf

        os.makedirs(self.run_dir, exist_ok=True)
        try:
            self.manager.save(checkpoint_number=step)
            write_run_config(self.run_dir, self.model_config, dataclasses.asdict(self.train),
                             self.world_size, step)
        except (tf.errors.OpError, OSError) as exc:
            reason = (exc.message if isinstance(exc, tf.errors.OpError) else str(exc))
            reason = reason.strip().splitlines()[-1].split("; ")[-1]
            reason = reason.split(" [Op:")[0][:120]  # TF's op name means nothing here
            last = self.latest
            raise DwaveError(
                f"cannot write the step-{step} checkpoint in {self.run_dir} ({reason}): the run "
                f"dir still resumes from {os.path.basename(last) if last else 'its start'}; "
                "free space (or move the run dir somewhere with room) and rerun the same "
                "command") from None


# -- what the run reports ---------------------------------------------------------------------


class _Report:
    """Everything a run tells while it trains: the progress line, TensorBoard's scalars, the
    validation log and its line, and the listening samples. Rank 0 writes; the others only
    count."""

    def __init__(self, run_dir: str, train: TrainConfig, model_config: ModelConfig,
                 ranks: Ranks, data, history, start_step: int, say):
        import tensorflow as tf

        self.say, self.history, self.data = say, history, data
        self.conditioned = model_config.conditioned
        self.writers = None
        if ranks.rank == 0:
            # The baselines as runs of their own, with the validation loss's tag: TensorBoard
            # draws them as flat lines on the loss's chart (the README's "is it learning" test).
            self.writers = {name: tf.summary.create_file_writer(_writable_directory(
                os.path.join(run_dir, TENSORBOARD, name))) for name in
                ("train", "validation", "baseline_bigram", "baseline_code_histogram")}
        self.predicted_per_step = train.batch_size * train.window * ranks.size
        self.progress = _Progress(train.steps, start_step, say)
        self.window_started, self.window_steps = time.perf_counter(), 0
        self.board_started, self.board_steps = time.perf_counter(), 0
        self.loop_started = time.perf_counter()
        self.listener = None
        if ranks.rank == 0 and data.validation and train.listen_seconds > 0:
            from .listen import Listener

            self.listener = Listener(run_dir, train.listen_seconds, model_config.sample_rate,
                                     model_config.quantization_channels,
                                     self.writers["validation"])

    def step(self, step: int, loss_bits: float, trainer, final: bool) -> None:
        """After each step: the progress line and TensorBoard when due, with the rate over the
        steps since the last line and the learning rate read back from the optimizer."""
        import tensorflow as tf

        self.window_steps += 1
        self.board_steps += 1
        now = time.perf_counter()
        if self.writers and (step % TENSORBOARD_EVERY == 0 or final):
            rate = self.predicted_per_step * self.board_steps / (now - self.board_started)
            with self.writers["train"].as_default(step=step):
                tf.summary.scalar("loss_bits_per_sample", loss_bits)
                tf.summary.scalar("samples_per_second", rate)
                tf.summary.scalar("learning_rate", trainer.learning_rate)
            self.board_started, self.board_steps = time.perf_counter(), 0
        if not (self.progress.due(now) or final):
            return
        rate = self.predicted_per_step * self.window_steps / (now - self.window_started)
        self.progress.show(step, loss_bits, rate, trainer.learning_rate)
        self.window_started, self.window_steps = time.perf_counter(), 0

    def validated(self, step: int, bits: float, seconds: float, trainer, wait: bool) -> None:
        """A validation's line, log entry and scalar, and a listening sample from the weights
        it scored."""
        import tensorflow as tf

        if self.history is not None:
            self.say(f"step {step}: validation loss {bits:.3f} bits/sample"
                     + self.history.versus_baselines(bits) + f" ({seconds:.1f} s)")
            self.history.add(step, bits, time.perf_counter() - self.loop_started)
            with self.writers["validation"].as_default(step=step):
                tf.summary.scalar("loss_bits_per_sample", bits)
            baselines = self.history.baselines or {}
            for name, key in (("baseline_bigram", "bigram_bits"),
                              ("baseline_code_histogram", "unigram_bits")):
                if key in baselines:
                    with self.writers[name].as_default(step=step):
                        tf.summary.scalar("loss_bits_per_sample", baselines[key])
            if self.listener:
                codes, condition = self.data.validation.batch(0, 0)
                with trainer.averaged_weights():
                    self.listener.start(trainer.model, codes[0],
                                        int(condition[0]) if self.conditioned else None,
                                        step, wait=wait)
        self.window_started, self.window_steps = time.perf_counter(), 0

    def listened(self) -> None:
        """The lines of listening samples finished since the last call."""
        if self.listener:
            for line in self.listener.finished():
                self.say(line)

    def close(self) -> None:
        self.progress.finish()
        if self.listener:
            for line in self.listener.close():
                self.say(line)
        if self.writers:
            for w in self.writers.values():
                w.flush()


def _writable_directory(path: str) -> str:
    """`path`, made and checked writable now: TensorFlow's writers fail later, in a traceback."""
    try:
        ensure_writable(path)
    except OSError as exc:
        raise DwaveError(f"cannot write TensorBoard logs in {path} ({exc.strerror or exc}): "
                         "make it writable (or move it away) and rerun; the run resumes from "
                         "its checkpoint") from None
    return path


def _validation_log(run_dir: str, run: _Run, data, rank: int, say) -> ValidationLog | None:
    """Rank 0's validation log, with the store's baselines on the run's validation windows
    (said once: what the losses to come are set against)."""
    if rank != 0:
        return None
    history = ValidationLog(run_dir, run.resuming, run.windows)
    if data.validation:
        history.baselines = _baselines(data, run.model, run.windows["val_batches"]).to_dict()
        b = history.baselines
        say(f"baselines on the validation windows: code histogram {b['unigram_bits']:.3f} "
            f"bits/sample, bigram p(x_t | x_t-1) {b['bigram_bits']:.3f}: a WaveNet that learns "
            f"is below the bigram within a few hundred steps")
    return history


def _baselines(data, model_config: ModelConfig, val_batches: int):
    """The store's code histogram and bigram, fitted on the training tracks, scored on the
    validation windows the model is scored on."""
    from ..model.output import for_model
    from .baselines import count_codes, evaluate

    counts = count_codes(data.train.code_chunks(), for_model(model_config).codes)
    windows = (data.validation.batch(0, i)[0] for i in range(val_batches))
    return evaluate(counts, windows, model_config.receptive_field)


def _check_ranks_in_sync(trainer, ranks: Ranks) -> list[str]:
    """Every rank's weight digest; a mismatch would mean the ranks trained different models."""
    digests = trainer.weight_digests()
    if ranks.rank == 0:
        size = ranks.size
        if len(set(digests)) == 1:
            print(f"weights identical on {size} rank{'s' if size > 1 else ''}: sha256 "
                  f"{digests[0][:16]}", file=sys.stderr)
        else:
            print("warning: ranks ended with different weights: "
                  + ", ".join(f"rank {i} {d[:16]}" for i, d in enumerate(digests)),
                  file=sys.stderr)
        for i, d in enumerate(digests):
            print(f"rank {i} weights sha256 {d}", file=sys.stderr)
    return digests


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """One status line: rewritten in place on a terminal, a line every 10 s in a log file."""

    def __init__(self, total: int, start: int, say):
        self.total, self.start, self.say = total, start, say
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else 10.0
        self.started = time.perf_counter()
        self.last = 0.0  # no line shown yet

    def due(self, now: float) -> bool:
        return now - self.last >= self.every

    def show(self, step: int, loss_bits: float, rate: float, lr: float) -> None:
        now = time.perf_counter()
        if not self.last:
            # The first step includes tracing the step function: time the ETA from after it.
            self.started, self.start = now, step
        self.last = now
        done = step - self.start
        eta = format_eta((now - self.started) / done * (self.total - step)) if done else "--"
        line = (f"step {step}/{self.total}  loss {loss_bits:.3f} bits  {rate:,.0f} samples/s  "
                f"lr {lr:.2e}  ETA {eta}")
        if self.tty:
            print("\r" + line.ljust(90), end="", file=sys.stderr, flush=True)
        else:
            self.say(line)

    def finish(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr)
