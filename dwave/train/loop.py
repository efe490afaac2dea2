"""Train a WaveNet on a store, synchronously data-parallel with Horovod.

One device:            dwave train STORE --run-dir runs/a
N processes (MPI):     mpirun -np N dwave train STORE --run-dir runs/a
N processes (Horovod): horovodrun -np N dwave train STORE --run-dir runs/a
SLURM:                 srun --mpi=pmix dwave train ...   (see slurm/train.sbatch)

Every rank draws its own windows (seeded by seed, rank and step), computes gradients on them,
and Horovod averages the gradients with a ring allreduce before each identical update, so
N ranks with batch B train exactly like one process with batch N*B (the learning rate is
scaled by N, reached by a warm-up: dwave.train.schedule). Rank 0 alone writes checkpoints, config,
TensorBoard logs and the listening samples.

The run directory's layout and rules are dwave.model.rundir's.

Rerunning with the same run directory resumes from the latest checkpoint, optimizer state
included. SIGTERM (SLURM's warning before the time limit, `scancel --signal=TERM`) makes all
ranks stop after the current step, write a checkpoint and exit 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass

from ..cores import cores_per_rank
from ..errors import DwaveError
from ..model.config import (DEFAULT_PRESET, MODEL_FLAGS, PRECISIONS, PRESET_LEARNING_RATES,
                            ModelConfig)
from ..model.rundir import (AVERAGE, TENSORBOARD, DirectoryLock, ValidationLog,
                            check_checkpoints_folder, checkpoint_manager, ensure_writable,
                            holds_average, read_run_config, restore_latest, validation_windows,
                            write_run_config)
from ..stop_signal import StopSignal

LN2 = math.log(2.0)


@dataclass
class TrainConfig:
    """How to train (the architecture is ModelConfig). Saved beside the model config."""

    store: str
    steps: int = 1000
    batch_size: int = 4  # per rank
    lr: float | None = None  # Adam's rate for one rank (N ranks: N * lr); None: the preset's
    warmup_steps: int = 100  # N ranks: the rate climbs from lr to N * lr over these updates
    window: int = 4000  # predicted samples per window; the span read is receptive field + this
    genre_conditioning: bool | None = None  # None: as the run dir has it, else off
    val_every: int = 200
    val_batches: int = 8
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    precision: str = "fp32"
    seed: int = 0
    validation_fraction: float = 0.1
    data_mode: str | None = None  # memory | stream; default: memory if it fits
    windows_per_read: int | None = None  # windows sharing one read; default: by the data mode
    on_bad_track: str = "stop"  # a track not all there: stop, or skip it (counted)
    stall_minutes: float = 15.0  # several ranks: end the job when no step completes this long
    threads: int | None = None  # TF threads per rank; default: cores / local ranks
    listen_seconds: float = 1.0  # a sample of this length at each validation; 0: none
    decay_to: float = 1.0  # the rate's cosine decay after the warm-up ends here (x peak); 1: none
    clip_norm: float = 0.0  # the gradients' global norm is clipped to this; 0: not clipped
    # Validate, listen and generate with an exponential moving average of the weights (decay
    # min(ema, (1 + t) / (10 + t)) at update t); 0: off. On the learning benchmark's tuning half
    # it is 0.05 bit better from step 300 on, and lags the weights in the first 200 steps.
    ema: float = 0.999

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise DwaveError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        for name in ("steps", "batch_size", "window", "val_every", "ckpt_every") + (
                ("windows_per_read",) if self.windows_per_read is not None else ()):
            if getattr(self, name) < 1:
                raise DwaveError(f"--{name.replace('_', '-')} must be positive")
        if self.warmup_steps < 0 or (self.lr is not None and not self.lr > 0):
            raise DwaveError("--lr must be positive and --warmup-steps not negative")
        if not (self.stall_minutes >= 0 and math.isfinite(self.stall_minutes)):
            raise DwaveError(f"--stall-minutes must be a number >= 0, got {self.stall_minutes:g}")
        if not 0 < self.decay_to <= 1:
            raise DwaveError(f"--decay-to must be in (0, 1], got {self.decay_to:g}")
        if not (self.clip_norm >= 0 and math.isfinite(self.clip_norm)):
            raise DwaveError(f"--clip-norm must be a number >= 0, got {self.clip_norm:g}")
        if not 0 <= self.ema < 1:
            raise DwaveError(f"--ema must be in [0, 1), got {self.ema:g}")
        if not 0 <= self.listen_seconds <= 60:
            raise DwaveError(f"--listen-seconds must be between 0 and 60, got "
                             f"{self.listen_seconds:g}")


# -- pure pieces ------------------------------------------------------------------------------


def weights_digest(variables) -> str:
    """sha256 of every weight's bytes: equal digests mean bit-identical models."""
    h = hashlib.sha256()
    for v in variables:
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -- the model, the step, the optimizer --------------------------------------------------------


class Trainer:
    """The model, optimizer and compiled steps of one rank. `hvd` is None for plain TF (tests
    that replay a distributed step in one process)."""

    def __init__(self, model_config: ModelConfig, lr: float, warmup_steps: int, world_size: int,
                 precision: str = "fp32", hvd=None, seed: int | None = None,
                 decay_steps: int = 0, decay_to: float = 1.0, clip_norm: float = 0.0,
                 ema: float = 0.0):
        import tensorflow as tf

        from ..model.network import WaveNet
        from .schedule import make_optimizer

        if seed is not None:
            # The same initial weights for the same seed, in any process. tf.random.set_seed
            # alone is not enough: Keras draws the seed of each unseeded initializer from
            # Python's `random`, which this seeds too (with numpy's global state).
            tf.keras.utils.set_random_seed(seed)
        self.config = model_config
        self.hvd = hvd
        self.model = WaveNet(model_config, precision)
        self.mixed = precision == "mixed"
        self.optimizer = make_optimizer(lr, world_size, warmup_steps, self.mixed, decay_steps,
                                        decay_to)
        self.optimizer.build(self.model.trainable_variables)
        self.clip_norm, self.ema = clip_norm, ema
        # The moving average of every weight (Polyak averaging), kept beside them.
        self.averages = [tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "/average")
                         for v in self.model.trainable_variables] if ema > 0 else []
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.train_step = tf.function(self._train_step, reduce_retracing=True)
        self.eval_step = tf.function(self.loss, reduce_retracing=True)

    def loss(self, codes, condition):
        """Mean cross-entropy in nats of predicting codes[:, rf:] from codes[:, :-1]."""
        import tensorflow as tf

        rf = self.config.receptive_field
        logits = self.model(codes[:, :-1],
                            condition=condition if self.config.conditioned else None,
                            training=True)
        targets = tf.cast(codes[:, rf:], tf.int32)
        # -log softmax(logits)[target] = logsumexp(logits) - logits[target]: with its gradient,
        # faster on a CPU than TF's fused sparse_softmax_cross_entropy_with_logits kernel.
        picked = tf.gather(logits, targets, batch_dims=2)
        return tf.reduce_mean(tf.reduce_logsumexp(logits, axis=-1) - picked)

    def _train_step(self, codes, condition, stop_requested):
        """One synchronous update. Returns (loss averaged over ranks, any rank asked to stop).
        One collective per step: the gradients, the loss and the stop flag travel in one group.
        Horovod negotiates each collective in its own cycle (HOROVOD_CYCLE_TIME), so the
        gradients in several fusions plus a loss and a flag apart cost several rounds per step
        (`small`, two ranks of one node under Gloo: 78-85 % of two independent processes, and
        87-93 % as one group; benchmarks/bench_train.py)."""
        import tensorflow as tf

        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.loss(codes, condition)
            scaled = self.optimizer.get_scaled_loss(loss) if self.mixed else loss
        grads = tape.gradient(scaled, variables)
        if self.mixed:
            grads = self.optimizer.get_unscaled_gradients(grads)
        stop = tf.cast(stop_requested, tf.float32)
        if self.hvd:
            # Dense: the embedding's gradient is IndexedSlices, small enough to send whole.
            # Averaged, the flag is > 0 exactly when some rank's is 1.
            *grads, shared = self.hvd.grouped_allreduce(
                [tf.convert_to_tensor(g) for g in grads] + [tf.stack([loss, stop])],
                op=self.hvd.Average)
            loss, stop = shared[0], shared[1]
        if self.clip_norm > 0:  # after the allreduce: every rank clips the same gradients
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
        self.optimizer.apply_gradients(zip(grads, variables))
        if self.averages:
            # TensorFlow's ExponentialMovingAverage with num_updates: a smaller decay early,
            # so the average is not held at the initial weights for the first ~1/(1-ema) steps.
            t = tf.cast(self.step, tf.float32)
            decay = tf.minimum(self.ema, (1.0 + t) / (10.0 + t))
            for average, v in zip(self.averages, variables):
                average.assign(decay * average + (1.0 - decay) * v)
        self.step.assign_add(1)
        return loss, stop > 0

    def start_average(self) -> None:
        """The moving average starts again from the current weights."""
        for average, v in zip(self.averages, self.model.trainable_variables):
            average.assign(v)

    @contextlib.contextmanager
    def averaged_weights(self):
        """The model holds the weights' moving average inside the block (with --ema; else its
        own weights), its own weights again after it."""
        own = [v.numpy() for v in self.model.trainable_variables] if self.averages else []
        for average, v in zip(self.averages, self.model.trainable_variables):
            v.assign(average)
        try:
            yield
        finally:
            for value, v in zip(own, self.model.trainable_variables):
                v.assign(value)

    @property
    def learning_rate(self) -> float:
        """The rate of the last update, read back from the optimizer."""
        from .schedule import current_rate

        return current_rate(self.optimizer)

    def broadcast_from_rank0(self):
        """Make every rank start from rank 0's weights and optimizer state."""
        if self.hvd:
            self.hvd.broadcast_variables(self.model.variables + self.averages, root_rank=0)
            self.hvd.broadcast_variables(self.optimizer.variables, root_rank=0)
            self.hvd.broadcast_variables([self.step], root_rank=0)


# -- the run directory ------------------------------------------------------------------------


def default_learning_rate(lr: float | None, preset: str | None, saved) -> float:
    """--lr if given; else a resumed run's own rate; else the preset's (dwave.model.config)."""
    if lr is not None:
        return lr
    saved_lr = saved[1].get("lr") if saved else None
    if isinstance(saved_lr, (int, float)) and saved_lr > 0:
        return float(saved_lr)
    return PRESET_LEARNING_RATES.get(preset or DEFAULT_PRESET, PRESET_LEARNING_RATES["base"])


# Training flags a resume may change, said when it does. The rest: steps and schedules of
# validation, checkpoints and listening samples change nothing a user would miss.
RESUME_FLAGS = ("store", "window", "batch_size", "seed", "precision", "lr", "warmup_steps",
                "data_mode", "windows_per_read", "val_batches", "decay_to", "clip_norm", "ema")


def resume_changes(saved: dict, train: TrainConfig) -> list[str]:
    """What a resume changes in the flags the run was last started with, as `--flag new
    (was old)`; an error for the two changes a resume cannot make."""
    now = dataclasses.asdict(train)
    was_fraction = saved.get("validation_fraction", train.validation_fraction)
    if was_fraction != train.validation_fraction:
        raise DwaveError(
            f"--validation-fraction {train.validation_fraction:g}: this run holds out "
            f"{was_fraction:g} of the tracks, and another split would train on its validation "
            f"tracks; resume with --validation-fraction {was_fraction:g} or use a new --run-dir")
    was_precision = saved.get("precision", train.precision)
    if (was_precision == "mixed") != (train.precision == "mixed"):
        raise DwaveError(
            f"--precision {train.precision}: this run was trained with --precision "
            f"{was_precision}, and its optimizer state is saved in that form (mixed "
            "precision keeps a loss scale); resume with --precision "
            f"{was_precision} or use a new --run-dir")
    return [f"--{key.replace('_', '-')} {now[key]} (was {saved[key]})" for key in RESUME_FLAGS
            if key in saved and saved[key] != now[key]]


def resolve_model_config(saved: ModelConfig | None, preset: str | None, overrides: dict,
                         conditioning: bool | None, store_values: list[str],
                         sample_rate: int, run_dir: str = "", levels: int = 256) -> ModelConfig:
    """The run's architecture.

    A new run: the preset (default `tiny`) with overrides, at the store's sample rate and
    quantization levels, conditioned on the store's values of the condition if asked. An
    existing run (`saved`): its config; flags or a store that disagree with it are an error
    rather than a silently different model.
    """
    if saved is None:
        return ModelConfig.from_preset(preset or DEFAULT_PRESET, sample_rate=sample_rate,
                                       quantization_channels=levels,
                                       condition_values=store_values if conditioning else [],
                                       **overrides)
    wanted = ModelConfig.from_preset(preset, **overrides).to_dict() if preset else overrides
    have = saved.to_dict()
    clashes = [f"{k} {have[k]} (flags ask for {v})" for k, v in wanted.items()
               if k in MODEL_FLAGS and have[k] != v]
    if conditioning is not None and conditioning != saved.conditioned:
        clashes.append(f"{saved.condition} conditioning " + ("on" if saved.conditioned else "off"))
    if saved.sample_rate != sample_rate:
        clashes.append(f"sample rate {saved.sample_rate} (the store's is {sample_rate})")
    if saved.quantization_channels != levels:
        clashes.append(f"{saved.quantization_channels} quantization levels (the store's codes "
                       f"have {levels})")
    if clashes:
        raise DwaveError(f"run dir {run_dir} holds a model with {'; '.join(clashes)}: use a new "
                         "--run-dir, or the flags it was started with")
    return saved


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


def configure_devices(hvd, threads: int | None) -> int:
    """One GPU per local rank when GPUs exist; the node's cores shared between its ranks."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpus[hvd.local_rank() % len(gpus)]
        tf.config.set_visible_devices(gpu, "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    threads = threads or cores_per_rank(hvd.local_size())
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    return threads


def run_training(train: TrainConfig, run_dir: str, preset: str | None = None,
                 model_overrides: dict | None = None, storage_options: dict | None = None,
                 log=print) -> dict:
    """Train (or resume) in `run_dir`. Returns a summary dict (rank 0's view)."""
    from .data import open_samplers, scan_store

    stop = StopSignal()
    # The store and the run dir are checked before TensorFlow loads: a bad one fails in a second.
    saved = read_run_config(run_dir)
    saved_model = saved[0] if saved else None
    train = dataclasses.replace(train, lr=default_learning_rate(train.lr, preset, saved))
    # The condition the run's tracks are labelled by: the saved model's, else the default's.
    scan = scan_store(train.store, storage_options, (saved_model or ModelConfig()).condition)
    model_config = resolve_model_config(saved_model, preset, model_overrides or {},
                                        train.genre_conditioning, scan.condition_values,
                                        scan.sample_rate,
                                        run_dir, scan.levels)
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
    data = open_data(on_bad_track=None)  # every other check now; the tracks' after the lock

    from ..ranks import start_horovod

    hvd = start_horovod()
    rank, size = hvd.rank(), hvd.size()
    say = log if rank == 0 else (lambda *_: None)
    threads = configure_devices(hvd, train.threads)  # before any TensorFlow op runs
    _lock_run_dir(run_dir, rank, size, hvd)
    # Only once the run dir is ours: a refused second job never looks at the store's tracks.
    data = open_data(on_bad_track=train.on_bad_track)
    data.load(say)

    import tensorflow as tf

    trainer = Trainer(model_config, train.lr, train.warmup_steps, size, train.precision,
                      hvd if size > 1 else None, seed=train.seed, decay_steps=train.steps,
                      decay_to=train.decay_to, clip_norm=train.clip_norm, ema=train.ema)
    state = dict(model=trainer.model, optimizer=trainer.optimizer, step=trainer.step)
    averages = {AVERAGE: trainer.averages} if trainer.averages else {}
    checkpoint, manager = checkpoint_manager(run_dir, train.keep_checkpoints, model_config,
                                             **state, **averages)
    # --ema turned on for a run whose checkpoints have no average: it starts from the weights.
    fresh_average = bool(averages and manager.latest_checkpoint
                         and not holds_average(manager.latest_checkpoint))
    if fresh_average:
        checkpoint = tf.train.Checkpoint(**state)
    restored = restore_latest(checkpoint, manager, model_config, run_dir, resuming)
    if fresh_average:
        trainer.start_average()
    trainer.broadcast_from_rank0()
    start_step = int(trainer.step.numpy())

    say(f"dwave train: {size} rank{'s' if size > 1 else ''} x {threads} threads, "
        f"{model_config.describe()}, {trainer.model.parameter_count:,} parameters")
    say(f"data: {len(data.train.tracks)} training tracks ({data.train_samples / data.sample_rate / 3600:.2f} h), "
        f"{len(data.validation.tracks) if data.validation else 0} validation tracks, "
        f"{data.train.mode} mode ({data.train.windows_per_read} window(s) a read); span {span} = receptive field {model_config.receptive_field}"
        f" + {train.window}; batch {train.batch_size} per rank, {train.batch_size * size} global")
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
    if changes:
        say("flags changed since the run's last start: " + "; ".join(changes) + ". Validation "
            f"keeps the run's windows (window {windows['window']}, batch {windows['batch_size']}"
            f", seed {windows['seed']}, {windows['val_batches']} batches): its log stays "
            "comparable")
    if data.left_out["damaged"]:
        say(f"warning: left out {len(data.left_out['damaged'])} track(s) whose shards are "
            f"missing or cut short (--on-bad-track skip; e.g. {data.left_out['damaged'][0].id} "
            f"in parts/{data.left_out['damaged'][0].part}): `dwave store verify --repair` and "
            "a preprocess rerun bring them back")
    if data.left_out["tracks"]:
        say(f"left out {data.left_out['tracks']} track(s) of {model_config.condition}s this run "
            f"was not started with ({', '.join(data.left_out['values'])}): a new --run-dir can "
            "condition on them")
    history = ValidationLog(run_dir, resuming, windows) if rank == 0 else None
    if history is not None and data.validation:
        history.baselines = _baselines(data, model_config, windows["val_batches"]).to_dict()
        b = history.baselines
        say(f"baselines on the validation windows: code histogram {b['unigram_bits']:.3f} "
            f"bits/sample, bigram p(x_t | x_t-1) {b['bigram_bits']:.3f}: a WaveNet that learns "
            f"is below the bigram within a few hundred steps")
    if start_step >= train.steps:
        say(f"run already at step {start_step} >= --steps {train.steps}: nothing to do")
        return {"step": start_step, "stopped": False, "resumed_from": start_step}

    def save(step: int) -> None:
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            # The checkpoint first, then the step in config.json that says it exists: a failed
            # save (disk full) leaves config.json at the last checkpoint that is complete, so
            # `dwave status` never calls a run finished without its final weights.
            try:
                manager.save(checkpoint_number=step)
                write_run_config(run_dir, model_config, dataclasses.asdict(train), size, step)
            except (tf.errors.OpError, OSError) as exc:
                reason = (exc.message if isinstance(exc, tf.errors.OpError) else str(exc))
                reason = reason.strip().splitlines()[-1].split("; ")[-1]
                reason = reason.split(" [Op:")[0][:120]  # TF's op name means nothing here
                last = manager.latest_checkpoint
                raise DwaveError(
                    f"cannot write the step-{step} checkpoint in {run_dir} ({reason}): the run "
                    f"dir still resumes from {os.path.basename(last) if last else 'its start'}; "
                    "free space (or move the run dir somewhere with room) and rerun the same "
                    "command") from None

    if not resuming:
        save(start_step)  # config.json and ckpt-0 on disk from the first second

    writers = None
    if rank == 0:
        writers = {name: tf.summary.create_file_writer(_writable_directory(
            os.path.join(run_dir, TENSORBOARD, name))) for name in ("train", "validation")}

    batches = data.train.batches(rank, start_step, train.steps)
    predicted_per_step = train.batch_size * train.window * size
    progress = _Progress(train.steps, start_step, say)
    step, loss_bits, stopped = start_step, math.nan, False
    window_started, window_steps = time.perf_counter(), 0
    val_bits = None
    listener = None
    if rank == 0 and data.validation and train.listen_seconds > 0:
        from .listen import Listener

        listener = Listener(run_dir, train.listen_seconds, model_config.sample_rate,
                            model_config.quantization_channels, writers["validation"])
    from .watchdog import Watchdog

    watchdog = Watchdog(train.stall_minutes * 60 if size > 1 else 0, rank)
    loop_started = time.perf_counter()
    while step < train.steps:
        codes, condition = next(batches)
        loss, stop_all = trainer.train_step(codes, condition, tf.constant(stop.requested))
        watchdog.beat()
        step += 1
        window_steps += 1
        loss_bits = float(loss) / LN2
        if not math.isfinite(loss_bits):
            raise DwaveError(f"loss became {loss_bits} at step {step}: lower --lr (now "
                             f"{train.lr:g}) or use --precision fp32")
        now = time.perf_counter()
        if progress.due(now) or step == train.steps or bool(stop_all):
            rate = predicted_per_step * window_steps / (now - window_started)
            learning_rate = trainer.learning_rate
            progress.show(step, loss_bits, rate, learning_rate)
            if writers:
                with writers["train"].as_default(step=step):
                    tf.summary.scalar("loss_bits_per_sample", loss_bits)
                    tf.summary.scalar("samples_per_second", rate)
                    tf.summary.scalar("learning_rate", learning_rate)
            window_started, window_steps = time.perf_counter(), 0
        if data.validation and (step % train.val_every == 0 or step == train.steps):
            started = time.perf_counter()
            with trainer.averaged_weights():
                val_bits = _validate(trainer, data.validation, rank, size,
                                     windows["val_batches"], hvd)
            val_seconds = time.perf_counter() - started
            watchdog.beat()
            if rank == 0:
                say(f"step {step}: validation loss {val_bits:.3f} bits/sample"
                    + history.versus_baselines(val_bits) + f" ({val_seconds:.1f} s)")
                history.add(step, val_bits, time.perf_counter() - loop_started)
                with writers["validation"].as_default(step=step):
                    tf.summary.scalar("loss_bits_per_sample", val_bits)
                if listener:
                    codes, condition = data.validation.batch(0, 0)
                    with trainer.averaged_weights():  # the weights validation scored
                        listener.start(trainer.model, codes[0],
                                       int(condition[0]) if model_config.conditioned else None,
                                       step, wait=step == train.steps)
            window_started, window_steps = time.perf_counter(), 0
        if listener:
            for line in listener.finished():
                say(line)
        if bool(stop_all):
            stopped = True
            break
        if step % train.ckpt_every == 0 and step < train.steps:
            save(step)
            watchdog.beat()
    watchdog.stop()
    save(step)
    progress.finish()
    digests = _check_ranks_in_sync(trainer, hvd, size)
    if listener:
        for line in listener.close():
            say(line)
    if writers:
        for w in writers.values():
            w.flush()
    summary = {"step": step, "loss_bits": loss_bits, "validation_bits": val_bits,
               "stopped": stopped, "resumed_from": start_step if restored else None,
               "checkpoint": manager.latest_checkpoint if rank == 0 else None,
               "weights_sha256": digests}
    if stopped:
        say(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}: "
            f"checkpoint written; rerun the same command to resume")
    say(f"done: step {step}, train loss {loss_bits:.3f} bits/sample"
        + (f", validation {val_bits:.3f}" + history.versus_baselines(val_bits)
           if val_bits is not None and history is not None else "")
        + f"; checkpoint {summary['checkpoint']}")
    return summary


def _writable_directory(path: str) -> str:
    """`path`, made and checked writable now: TensorFlow's writers fail later, in a traceback."""
    try:
        ensure_writable(path)
    except OSError as exc:
        raise DwaveError(f"cannot write TensorBoard logs in {path} ({exc.strerror or exc}): "
                         "make it writable (or move it away) and rerun; the run resumes from "
                         "its checkpoint") from None
    return path


def _baselines(data, model_config: ModelConfig, val_batches: int):
    """The store's code histogram and bigram, fitted on the training tracks, scored on the
    validation windows the model is scored on."""
    from .baselines import count_codes, evaluate

    counts = count_codes(data.train.code_chunks(), data.levels)
    windows = (data.validation.batch(0, i)[0] for i in range(val_batches))
    return evaluate(counts, windows, model_config.receptive_field)


_HELD_LOCKS: list = []


def _lock_run_dir(run_dir: str, rank: int, size: int, hvd) -> None:
    """Rank 0 takes RUN_DIR/lock for the rest of the process (released when it exits, however
    it exits); every rank learns whether it got it, so a refused job stops on all ranks."""
    refusal = None
    if rank == 0:
        try:
            lock = DirectoryLock(run_dir)
            lock.acquire()
            _HELD_LOCKS.append(lock)  # never released here: it lives as long as this process
        except DwaveError as exc:
            refusal = str(exc)
    if size > 1:
        refusal = hvd.broadcast_object(refusal, root_rank=0)
    if refusal:
        raise DwaveError(refusal)


def _validate(trainer: Trainer, sampler, rank: int, size: int, batches: int, hvd) -> float:
    """Mean loss in bits over a fixed set of validation batches, shared out over the ranks
    (the same windows every time, so the curve compares like with like)."""
    import tensorflow as tf

    mine = range(rank, batches, size)
    total = sum(float(trainer.eval_step(*sampler.batch(0, i))) for i in mine)
    totals = tf.constant([total, float(len(mine))], tf.float64)
    if size > 1:
        totals = hvd.allreduce(totals, op=hvd.Sum)
    total, count = totals.numpy()
    return total / max(count, 1) / LN2


def _check_ranks_in_sync(trainer: Trainer, hvd, size: int) -> list[str]:
    """Every rank's weight digest; a mismatch would mean the ranks trained different models."""
    digest = weights_digest(trainer.model.variables)
    digests = hvd.allgather_object(digest) if size > 1 else [digest]
    if hvd.rank() == 0:
        if len(set(digests)) == 1:
            print(f"weights identical on {size} rank{'s' if size > 1 else ''}: sha256 "
                  f"{digest[:16]}", file=sys.stderr)
        else:
            print("warning: ranks ended with different weights: "
                  + ", ".join(f"rank {i} {d[:16]}" for i, d in enumerate(digests)),
                  file=sys.stderr)
        for i, d in enumerate(digests):
            print(f"rank {i} weights sha256 {d}", file=sys.stderr)
    return digests


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
