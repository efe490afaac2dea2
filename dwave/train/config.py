"""How a run trains, and the run's configuration resolved from its flags, its run dir and its
store: TrainConfig (saved beside the ModelConfig in config.json), the training defaults, and
the rules for a resumed run. No TensorFlow here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import DwaveError
from ..model.config import DEFAULT_PRESET, MODEL_FLAGS, PRECISIONS, ModelConfig
from ..store.audio import DEFAULT_QUANTIZATION_CHANNELS

# Adam's default rate for one rank, per preset, settled with benchmarks/bench_learning.py on
# the corpus's tuning half (batch 4 x 4000; benchmarks/results/HISTORY.md has the runs).
# `small`'s 2e-3 is tuned with the default moving average of the weights (--ema 0.999), which
# smooths the noisier updates; `--ema 0` runs want `--lr 1e-3`. `base` and `music` keep the
# reference WaveNet's 1e-3. A run that overrides a preset's channels keeps the preset's rate.
PRESET_LEARNING_RATES: dict[str, float] = {"tiny": 5e-3, "small": 2e-3, "base": 1e-3,
                                           "music": 1e-3}

# --data-mode: where training windows come from (dwave.train.data says how each works).
# Without the flag: memory while the training tracks' codes fit in DEFAULT_CACHE_BYTES, else
# stream.
DATA_MODES = ("memory", "stream")
DEFAULT_CACHE_BYTES = 4 << 30
# --windows-per-read: training windows that share one read of the store (dwave.train.data's
# grouped draws). Stream mode reads 16 at a time by default: each request to S3 costs
# milliseconds of CPU, so one per window would cap a rank far below what a GPU consumes
# (benchmarks/bench_scale.py measures it); memory mode, where a read is a slice, draws each
# window on its own.
STREAM_WINDOWS_PER_READ = 16


UNLABELLED_CHOICES = ("class", "skip")


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
    # Conditioned runs: tracks the store has no genre for (about half of fma_large) are one
    # more class ("class", named UNKNOWN_VALUE) or left out ("skip"). Read at a run's start.
    unlabelled: str = "class"
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
    # min(ema, (1 + t) / (10 + t)) at update t); 0: off. Better after the first few hundred
    # steps on the learning benchmark's tuning half, behind the weights before them.
    ema: float = 0.999

    def __post_init__(self):
        if self.unlabelled not in UNLABELLED_CHOICES:
            raise DwaveError(f"--unlabelled must be one of {', '.join(UNLABELLED_CHOICES)}, got "
                             f"{self.unlabelled!r}")
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
                         sample_rate: int, run_dir: str = "",
                         quantization_channels: int = DEFAULT_QUANTIZATION_CHANNELS) -> ModelConfig:
    """The run's architecture.

    A new run: the preset (default `tiny`) with overrides, at the store's sample rate and
    quantization channels, conditioned on the store's values of the condition if asked. An
    existing run (`saved`): its config; flags or a store that disagree with it are an error
    rather than a silently different model.
    """
    if saved is None:
        return ModelConfig.from_preset(preset or DEFAULT_PRESET, sample_rate=sample_rate,
                                       quantization_channels=quantization_channels,
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
    if saved.quantization_channels != quantization_channels:
        clashes.append(f"{saved.quantization_channels} quantization channels (the store's codes "
                       f"have {quantization_channels})")
    if clashes:
        raise DwaveError(f"run dir {run_dir} holds a model with {'; '.join(clashes)}: use a new "
                         "--run-dir, or the flags it was started with")
    return saved
