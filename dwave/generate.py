"""`dwave generate`: new songs from a trained run, fast, many at once, over many processes.

One process:  dwave generate runs/a --out songs --num-songs 8 --seconds 10
N processes:  mpirun -np N dwave generate runs/a --out songs --num-songs 64
              (or horovodrun / srun): song i goes to rank i mod N

Song i is always `song-<i>.wav` (+ a spectrogram PNG) and always the same audio for the same
seed: its random draws come from its own stream seeded by (seed, i), whichever rank makes it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .errors import DwaveError
from .song_files import (COLUMNS, SongWriter, check_song_targets, remove_stale_temporaries,
                         wav_bytes)

CHUNK = 2000  # samples per compiled call: the progress bar's granularity


@dataclass
class GenerateConfig:
    run_dir: str
    out: str
    seconds: float = 4.0
    num_songs: int = 1
    temperature: float = 1.0
    seed: int = 0
    prime: str | None = None
    prime_seconds: float = 1.0
    genre: str | None = None
    checkpoint: str | None = None
    batch_size: int = 64  # songs per step on one rank
    overwrite: bool = False  # replace dwave's own songs in --out (never anything else)
    threads: int | None = None  # per rank; None: the rank's cores (dwave.cores.cores_per_rank)

    def __post_init__(self):
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise DwaveError(f"--seconds must be a positive number, got {self.seconds:g}")
        if self.num_songs < 1:
            raise DwaveError("--num-songs must be at least 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise DwaveError(f"--temperature must be a finite number >= 0, got "
                             f"{self.temperature:g}")
        if not (self.prime_seconds > 0 and math.isfinite(self.prime_seconds)):
            raise DwaveError(f"--prime-seconds must be a positive number, got "
                             f"{self.prime_seconds:g}")
        if self.threads is not None and self.threads < 1:
            raise DwaveError("--threads must be at least 1")


def load_model(run_dir: str, checkpoint: str | None = None):
    """(model, config, checkpoint path) of a training run; clear errors for what is missing."""
    from .rundir import (AVERAGE, check_checkpoint_model, holds_average, latest_checkpoint,
                         read_run_config)

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

    from .model import WaveNet

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
    model.averaged = bool(average)
    return model, config, path


def condition_index(config, value: str | None) -> int | None:
    """The row of `value` in a conditioned model's condition table (`--genre` names it)."""
    name, values = config.condition, config.condition_values
    if not config.conditioned:
        if value is not None:
            raise DwaveError(f"--{name} given, but this model was trained without {name} "
                             "conditioning")
        return None
    if value is None:
        raise DwaveError(f"this model is conditioned on {name}: pass --{name}, one of "
                         f"{', '.join(values)}")
    if value not in values:
        raise DwaveError(f"unknown {name} {value!r}; this model knows {', '.join(values)}")
    return values.index(value)


def prime_codes(path: str, seconds: float, sample_rate: int, channels: int) -> np.ndarray:
    """The opening of a real song, through preprocessing's decode/resample/mu-law path."""
    from .audio import AudioError, decode_to_mono, encode_in_place, normalisation_gain

    try:
        decoded = decode_to_mono(path, sample_rate)
        codes = encode_in_place(decoded, normalisation_gain(decoded), channels)
    except (AudioError, OSError) as exc:
        raise DwaveError(f"--prime {path}: {exc}") from None
    return codes[: max(1, int(seconds * sample_rate))].astype(np.int64)


def song_stream(seed: int, song: int) -> np.random.Generator:
    """Song `song`'s random draws: its own stream, whatever batch or rank it is in. Drawn a
    chunk at a time (the same numbers as drawing them at once), so memory does not grow with
    the song's length."""
    return np.random.default_rng([seed, song])


def song_uniforms(seed: int, song: int, samples: int) -> np.ndarray:
    return song_stream(seed, song).random(samples, dtype=np.float32)


def run_generate(options: GenerateConfig, log=print) -> dict:
    from .ranks import world

    ranks = world()
    rank, size = ranks.rank, ranks.size
    say = log if rank == 0 else (lambda *_: None)
    _check_writable(options.out)  # before minutes of generating, not after
    if rank == 0:
        remove_stale_temporaries(options.out)
    check_song_targets(options.out, [song_stem(i) for i in range(options.num_songs)],
                       options.overwrite)
    model, config, checkpoint = load_model(options.run_dir, options.checkpoint)
    gid = condition_index(config, options.genre)
    rate, q = config.sample_rate, config.quantization_channels
    prime = None
    if options.prime:
        prime = prime_codes(options.prime, options.prime_seconds, rate, q)
    total = int(round(options.seconds * rate))
    if total < 1:
        raise DwaveError(f"--seconds {options.seconds:g} is less than one sample at {rate} Hz: "
                         f"ask for at least {1 / rate:.6f}")
    mine = list(range(rank, options.num_songs, size))
    from .audio import code_dtype

    dtype = code_dtype(q)  # a chunk's codes as written, not int64
    head_samples = len(prime) if prime is not None else 0
    _check_fits(min(options.batch_size, max(1, len(mine))), head_samples, ranks.ranks_on_node)
    _check_disk(options.out, options.num_songs, head_samples + total, rate)

    from .cores import cores_per_rank
    from .cached_generator import FastGenerator

    cores = cores_per_rank(ranks.ranks_on_node)
    threads = options.threads or cores
    os.makedirs(options.out, exist_ok=True)
    say(f"dwave generate: {options.num_songs} song(s) of {options.seconds:g} s at {rate} Hz "
        f"from {checkpoint}" + (" (its moving average of the weights)"
                                if getattr(model, "averaged", False) else "")
        + f", temperature {options.temperature:g}, {size} rank(s) x "
        f"{threads} thread(s)"
        + (f", primed with {len(prime) / rate:.2f} s of {options.prime}" if prime is not None
           else "") + (f", genre {options.genre}" if gid is not None else ""))

    started = time.perf_counter()
    generated = 0
    progress = _progress(rank, len(mine) * total, size)
    for first in range(0, len(mine), options.batch_size):
        songs = mine[first:first + options.batch_size]
        generator = FastGenerator(model, len(songs),
                                  None if gid is None else [gid] * len(songs), threads, cores)
        # Each song goes to disk as it is made: what a batch holds does not grow with
        # --seconds (a WAV under a temporary name until the song is whole, then renamed).
        writers = [SongWriter(os.path.join(options.out, song_stem(song)), head_samples + total,
                              rate, q, primed=head_samples) for song in songs]
        try:
            if prime is not None:
                generator.prime(np.tile(prime, (len(songs), 1)))  # int64: embedding indices
                head = prime.astype(dtype)  # once for the batch, not per song
                for writer in writers:
                    writer.write(head)
            streams = [song_stream(options.seed, s) for s in songs]
            for begin in range(0, total, CHUNK):
                steps = min(CHUNK, total - begin)
                uniforms = np.stack([r.random(steps, dtype=np.float32) for r in streams], axis=1)
                codes = generator.generate(uniforms, options.temperature).astype(dtype)
                for row, writer in enumerate(writers):
                    writer.write(codes[:, row])
                generated += codes.size
                progress.update(codes.size)
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abandon()  # only temporaries: songs already renamed stay
            raise
    progress.close()
    wall = time.perf_counter() - started
    if size > 1:
        counts = ranks.allgather((generated, wall))
        generated = sum(c[0] for c in counts)
        wall = max(c[1] for c in counts)
    rate_s = generated / wall if wall else float("nan")
    say(f"done: {options.num_songs} song(s) in {options.out}/song-*.wav (+ .png "
        f"spectrograms); {generated:,} samples in {wall:.1f} s = {rate_s:,.0f} samples/s, "
        f"{rate_s / rate:.2f}x real time")
    return {"samples": generated, "seconds": wall, "samples_per_s": rate_s,
            "real_time_factor": rate_s / rate, "songs": mine}


# What a song being written holds, whatever its length (dwave.song_files.SongWriter): its
# spectrogram's columns (257 float32 bins each, and a float64 copy when drawn), plus a chunk.
WRITER_BYTES = COLUMNS * 257 * (4 + 8) + CHUNK * 16


def _check_fits(batch: int, prime_samples: int, ranks_on_node: int) -> None:
    """A one-line error, before any work, for a request this node's memory cannot hold: a
    batch's song writers and its copies of the prime, per rank. The songs themselves go to
    disk as they are made (`_check_disk`)."""
    import psutil

    need = batch * (WRITER_BYTES + prime_samples * 8) * ranks_on_node
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        raise DwaveError(
            f"{batch} song(s) per rank x {ranks_on_node} rank(s) on this node need "
            f"~{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available: ask "
            "for a smaller --batch-size (or a shorter --prime-seconds)")


def _check_disk(out: str, songs: int, samples: int, sample_rate: int) -> None:
    """A one-line error, before any work, for songs a WAV cannot hold or --out has no room for
    (every rank's songs share it)."""
    import shutil

    per_song = wav_bytes(samples)
    if per_song > 2**32 - 1:
        most = (2**32 - 2**16) // 2 / sample_rate / 3600
        raise DwaveError(f"a WAV holds at most {most:.1f} h of 16-bit audio at {sample_rate} Hz "
                         f"(its sizes are 32-bit): ask for fewer --seconds")
    free = shutil.disk_usage(out).free  # _check_writable has made it
    if songs * per_song > free:
        raise DwaveError(f"--out {out}: {songs} song(s) of {samples:,} samples need "
                         f"~{songs * per_song / 1e6:,.1f} MB, more than the {free / 1e6:,.1f} MB "
                         "free there: ask for fewer --seconds or --num-songs, or choose another "
                         "--out")


def song_stem(song: int) -> str:
    return f"song-{song:03d}"


def _check_writable(directory: str) -> None:
    from .rundir import ensure_writable

    try:
        ensure_writable(directory)
    except OSError as exc:
        raise DwaveError(f"--out {directory}: cannot write there ({exc.strerror or exc}); "
                         "choose another directory") from None


def _progress(rank: int, total: int, size: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, disable=rank != 0,
                desc=f"generating (rank 0 of {size})" if size > 1 else "generating",
                file=sys.stderr, smoothing=0.1)
