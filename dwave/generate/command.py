"""`dwave generate`: new songs from a trained run, fast, many at once, over many processes.

One process:  dwave generate runs/a --out songs --num-songs 8 --seconds 10
N processes:  mpirun -np N dwave generate runs/a --out songs --num-songs 64
              (or horovodrun / srun): song i goes to rank i mod N

Song i is always `song-<i>.wav` (+ a spectrogram PNG) and always the same audio for the same
seed: its random draws come from its own stream seeded by (seed, i), whichever rank makes it.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import DwaveError
from ..files import DirectoryLock
from ..model.rundir import load_model
from ..store.audio import code_dtype
from .engines import ENGINES, default_engine
from .job import GenerationJob, SavedSong, file_digest, song_stem
from .song_files import (COLUMNS, SongWriter, check_song_targets, is_dwave_song,
                         remove_stale_temporaries, wav_bytes)

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
    engine: str | None = None  # cpu or cuda; None: cuda where Numba finds a GPU, else cpu
    save_every: float = 60.0  # seconds between saves of the songs in progress; 0: on signals only
    progress: bool = True  # the progress bar on rank 0

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
        if self.engine is not None and self.engine not in ENGINES:
            raise DwaveError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine}")
        if not (self.save_every >= 0 and math.isfinite(self.save_every)):
            raise DwaveError(f"--save-every must be a number of seconds >= 0, got "
                             f"{self.save_every:g}")


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
    if value in values:
        return values.index(value)
    # "rock" for FMA's "Rock": one value that differs only in case is the one meant
    folded = [v for v in values if v.casefold() == value.casefold()]
    if len(folded) == 1:
        return values.index(folded[0])
    close = difflib.get_close_matches(value, values, n=1, cutoff=0.6)
    raise DwaveError(f"unknown {name} {value!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                      else "") +
                     f"; this model knows {', '.join(values)}")


def prime_codes(path: str, seconds: float, sample_rate: int,
                quantization_channels: int) -> np.ndarray:
    """The opening of a real song, through preprocessing's decode/resample/mu-law path."""
    from ..store.audio import AudioError, decode_to_mono, encode_in_place, normalisation_gain

    try:
        decoded = decode_to_mono(path, sample_rate)
        codes = encode_in_place(decoded, normalisation_gain(decoded), quantization_channels)
    except (AudioError, OSError) as exc:
        raise DwaveError(f"--prime {path}: {exc}") from None
    return codes[: max(1, int(seconds * sample_rate))].astype(np.int64)


def song_stream(seed: int, song: int) -> np.random.Generator:
    """Song `song`'s random draws: its own stream, whatever batch or rank it is in. Drawn a
    chunk at a time (the same numbers as drawing them at once), so memory does not grow with
    the song's length."""
    return np.random.default_rng([seed, song])


def run_generate(options: GenerateConfig, log=print) -> dict:
    """Generate the songs of `options`, or those a stopped run with the same request left;
    returns this rank's figures. SIGTERM/SIGINT/SIGUSR1 save every song in progress and
    return early (`stopped`); the same command resumes them."""
    from ..ranks import world
    from ..stop_signal import StopSignal

    stop = StopSignal()  # first: a signal while the model loads is kept for the first chunk
    ranks = world()
    rank, size = ranks.rank, ranks.size
    say = log if rank == 0 else (lambda *_: None)
    _check_writable(options.out)  # before minutes of generating, not after
    job = GenerationJob(options.out)
    loaded = load_model(options.run_dir, _checkpoint_to_use(options, job, say))
    model, config, checkpoint = loaded.model, loaded.config, loaded.checkpoint
    gid = condition_index(config, options.genre)
    rate, quantization_channels = config.sample_rate, config.quantization_channels
    dtype = code_dtype(quantization_channels)  # codes as written, not int64
    prime = None
    if options.prime:
        prime = prime_codes(options.prime, options.prime_seconds, rate,
                            quantization_channels).astype(dtype)
    total = int(round(options.seconds * rate))
    if total < 1:
        raise DwaveError(f"--seconds {options.seconds:g} is less than one sample at {rate} Hz: "
                         f"ask for at least {1 / rate:.6f}")
    engine = options.engine or default_engine()
    request = _request(options, config, checkpoint, prime, engine)
    head = len(prime) if prime is not None else 0
    _check_fits(min(options.batch_size, math.ceil(options.num_songs / size)), config,
                ranks.ranks_on_node)

    # Rank 0 decides, holding OUT's lock for the whole job; every rank hears the verdict.
    verdict, finished, lock = None, [], None
    if rank == 0:
        try:
            lock, finished = _claim(job, request, options, head + total, rate, dtype)
        except DwaveError as exc:
            verdict = str(exc)
    if size > 1:
        verdict, finished = ranks.allgather((verdict, finished))[0]
    if verdict:
        raise DwaveError(verdict)
    mine = [i for i in range(rank, options.num_songs, size) if i not in set(finished)]
    batches = _plan(job, mine, options.batch_size, dtype)

    from ..cores import cores_per_rank

    cores = cores_per_rank(ranks.ranks_on_node)
    threads = options.threads or cores
    say(f"dwave generate: {options.num_songs} song(s) of {options.seconds:g} s at {rate} Hz "
        f"from {checkpoint}" + (" (its moving average of the weights)"
                                if loaded.averaged else "")
        + f", temperature {options.temperature:g}, {size} rank(s) x "
        + (f"{threads} thread(s)" if engine == "cpu" else "the CUDA engine")
        + (f", primed with {head / rate:.2f} s of {options.prime}" if prime is not None
           else "") + (f", genre {options.genre}" if gid is not None else ""))
    resumed = sum(len(b.songs) for b in batches if b.saved)
    if size > 1:  # every rank's: a resumed job's songs may go to other ranks than before
        resumed = sum(ranks.allgather(resumed))
    if finished or resumed:
        say(f"continuing the job in {options.out}: {len(finished)} song(s) finished, "
            f"{resumed} resumed from their saved state")

    weights = model.export()
    started = time.perf_counter()
    generated, stopped, done = 0, False, []
    progress = _progress(rank, sum(len(b.songs) * (head + total - max(b.made, head))
                                   for b in batches), size, options.progress)
    for batch in batches:
        condition = None if gid is None else [gid] * len(batch.songs)
        generator, streams = _start(batch, engine, model, weights, prime, condition, options,
                                    threads, cores)
        files = [job.open_codes(song_stem(song), batch.made) for song in batch.songs]
        try:
            if not batch.saved and prime is not None:
                for f in files:
                    f.write(prime.tobytes())
            made = batch.made if batch.saved else head
            made_now, stopped = _advance(generator, streams, files, made, head + total,
                                         options, stop, progress, job, batch.songs, dtype)
            generated += made_now
            if not stopped:
                stopped = _write_songs(job, options.out, batch.songs, generator, streams,
                                       files, head, total, rate, quantization_channels, dtype,
                                       stop, done)
        finally:
            for f in files:
                f.close()
        if stopped:
            break
    progress.close()
    wall = time.perf_counter() - started
    totals = [(generated, wall, len(done), stopped)]
    if size > 1:
        totals = ranks.allgather(totals[0])
    generated = sum(t[0] for t in totals)
    wall = max(t[1] for t in totals)
    rate_s = generated / wall if wall else float("nan")
    figures = (f"{generated:,} samples in {wall:.1f} s = {rate_s:,.0f} samples/s, "
               f"{rate_s / rate:.2f}x real time")
    if not batches and size == 1:
        say(f"nothing to do: all {options.num_songs} song(s) are in {options.out} already")
    elif any(t[3] for t in totals):
        left = options.num_songs - len(finished) - sum(t[2] for t in totals)
        say(f"stopped by {stop.signal_name or 'a signal'}: {left} song(s) not finished, "
            f"their state saved in {job.directory}; rerun the same command to resume them "
            f"({figures})")
    else:
        say(f"done: {options.num_songs} song(s) in {options.out}/song-*.wav (+ .png "
            f"spectrograms); {figures}")
    if lock is not None:
        lock.release()
    return {"samples": generated, "seconds": wall, "samples_per_s": rate_s,
            "real_time_factor": rate_s / rate, "songs": done, "stopped": stopped}


def _claim(job: GenerationJob, request: dict, options: GenerateConfig, samples: int,
           rate: int, dtype) -> tuple:
    """Rank 0: take --out's lock (held to the end), decide whether this continues its job
    (finished songs skipped) and check every song's target and the disk, then record the
    request. Returns (the lock, the finished songs)."""
    new = not os.path.lexists(job.directory)
    if os.path.islink(job.directory) or not (new or os.path.isdir(job.directory)):
        raise DwaveError(f"{job.directory} is not dwave's folder (a symlink or a file): dwave "
                         "does not write through it; move it away or choose another --out")
    lock = DirectoryLock(job.directory, "--out", "dwave generate", "--out")
    lock.acquire()
    try:
        remove_stale_temporaries(options.out)
        continuing = job.check(request, options.overwrite)
        stems = [song_stem(i) for i in range(options.num_songs)]
        finished = ([i for i, stem in enumerate(stems) if is_dwave_song(options.out, stem)]
                    if continuing else [])
        check_song_targets(options.out, [stem for i, stem in enumerate(stems)
                                         if i not in set(finished)], options.overwrite)
        _check_disk(options.out, options.num_songs - len(finished), samples, rate, dtype)
        job.begin(request, options.num_songs, continuing)
    except DwaveError:
        lock.release()
        if new:  # refused before any work: what this call made goes, --out is as it was
            job.remove_if_only_lock()
        raise
    return lock, finished


def _start(batch, engine: str, model, weights, prime, condition, options: GenerateConfig,
           threads: int, cores: int) -> tuple:
    """The batch's engine and its songs' random streams: restored from their saved state, or
    new, from the prime (only its last receptive field is run) or from silence."""
    from .cpu_engine import SongsState, prime_state
    from .engines import make_engine

    generator = make_engine(engine, weights, model.config.dilations, len(batch.songs),
                            condition, threads, cores)
    streams = [song_stream(options.seed, song) for song in batch.songs]
    if batch.saved:
        generator.restore(SongsState.stack([_as_state(saved) for saved in batch.saved]))
        for stream, saved in zip(streams, batch.saved):
            stream.bit_generator.state = saved.stream
    elif prime is not None:
        window = prime[-model.config.receptive_field - 1:].astype(np.int64)
        generator.restore(prime_state(model, np.tile(window, (len(batch.songs), 1)),
                                      condition))
    return generator, streams


def _advance(generator, streams: list, files: list, made: int, end: int, options, stop,
             progress, job: GenerationJob, songs: list, dtype) -> tuple[int, bool]:
    """Make the batch's codes from `made` to `end`, each chunk appended to its song's file; a
    save every --save-every seconds, and on a stop request a save and an early return.
    Returns (codes made, stopped)."""
    made_now, last_save = 0, time.monotonic()
    while made < end:
        steps = min(CHUNK, end - made)
        uniforms = np.stack([r.random(steps, dtype=np.float32) for r in streams], 1)
        codes = generator.generate(uniforms, options.temperature).astype(dtype)
        for row, f in enumerate(files):
            f.write(codes[:, row].tobytes())
        made += steps
        made_now += codes.size
        progress.update(codes.size)
        due = options.save_every and time.monotonic() - last_save >= options.save_every
        if made < end and (stop.requested or due):
            _save(job, songs, range(len(songs)), generator.state(), streams, files, made)
            last_save = time.monotonic()
            if stop.requested:
                return made_now, True
    return made_now, False


def _write_songs(job: GenerationJob, out: str, songs: list, generator, streams: list,
                 files: list, head: int, total: int, rate: int, quantization_channels: int,
                 dtype, stop, done: list) -> bool:
    """Each song's WAV and PNG from its codes, then its progress files go. A stop request
    between two songs saves the rest as made in full (thousands of songs take minutes to
    write): the rerun writes them without generating. Returns whether it stopped."""
    for i, song in enumerate(songs):
        if stop.requested:
            _save(job, songs, range(i, len(songs)), generator.state(), streams, files,
                  head + total)
            return True
        files[i].flush()
        _write_song_files(job, out, song_stem(song), head, total, rate, quantization_channels,
                          dtype)
        done.append(song)
    return False


@dataclass
class _Batch:
    songs: list  # song numbers
    saved: list  # their SavedSong, all at one step; [] for songs starting now
    made: int  # codes each song has (prime included): 0 for songs starting now


def _plan(job: GenerationJob, songs: list, batch_size: int, dtype) -> list:
    """Songs in progress first, in batches of songs at the same step; then the new ones."""
    saved = {song: job.load(song_stem(song), dtype) for song in songs}
    batches, groups = [], {}
    for song in songs:
        if saved[song] is not None:
            groups.setdefault((saved[song].t, saved[song].codes), []).append(song)
    for (_, made), group in sorted(groups.items()):
        for first in range(0, len(group), batch_size):
            part = group[first:first + batch_size]
            batches.append(_Batch(part, [saved[s] for s in part], made))
    new = [song for song in songs if saved[song] is None]
    batches += [_Batch(new[i:i + batch_size], [], 0) for i in range(0, len(new), batch_size)]
    return batches


def _as_state(saved: SavedSong):
    from .cpu_engine import SongsState

    return SongsState(saved.caches[None], saved.t, np.array([saved.next_code]),
                      np.array([saved.previous_code]))


def _save(job: GenerationJob, songs: list, rows, state, streams: list, files: list,
          made: int) -> None:
    """Save songs[i] for i in `rows` (rows of `state`, `streams`, `files`)."""
    for i in rows:
        job.save(song_stem(songs[i]), state.song(i), streams[i].bit_generator.state, files[i],
                 made)


def _write_song_files(job: GenerationJob, out: str, stem: str, head: int, total: int,
                      rate: int, quantization_channels: int, dtype) -> None:
    """The song's WAV and PNG from its codes on disk, a chunk at a time; then its progress
    files go."""
    writer = SongWriter(os.path.join(out, stem), head + total, rate, quantization_channels,
                        primed=head)
    try:
        with open(job.codes_path(stem), "rb") as f:
            while len(codes := np.fromfile(f, dtype, count=16 * CHUNK)):
                writer.write(codes)
        writer.close()
    except BaseException:
        writer.abandon()  # only its temporaries
        raise
    job.song_done(stem)


def _checkpoint_to_use(options: GenerateConfig, job: GenerationJob, say) -> str | None:
    """--checkpoint, or, continuing a job in --out from this run, the checkpoint its songs
    were started with (the run's latest may have moved on since: a song is made by one set of
    weights); None: the run's latest."""
    if options.checkpoint or options.overwrite:
        return options.checkpoint
    record = job.recorded()
    if record is None or record["request"].get("run_dir") != os.path.realpath(options.run_dir):
        return None
    recorded = record["request"].get("checkpoint")
    if recorded and not os.path.exists(recorded + ".index"):
        raise DwaveError(f"the songs in --out {options.out} were started from checkpoint "
                         f"{recorded}, which is gone: pass --overwrite to start them over from "
                         "the run's latest, or choose another --out")
    return recorded


def _request(options: GenerateConfig, config, checkpoint: str, prime, engine: str) -> dict:
    """What the songs' audio depends on (dwave.generate.job's job.json)."""
    import hashlib

    return {"run_dir": os.path.realpath(options.run_dir),
            "checkpoint": os.path.realpath(checkpoint),
            "checkpoint_digest": file_digest(checkpoint + ".index"),
            "engine": engine, "seconds": options.seconds,
            "temperature": options.temperature, "seed": options.seed,
            # the prime by its codes: the same opening from a moved or renamed file is the same
            "prime_digest": hashlib.sha256(prime.tobytes()).hexdigest() if prime is not None
            else None, "genre": options.genre, "sample_rate": config.sample_rate,
            "quantization_channels": config.quantization_channels}


def _check_fits(batch: int, config, ranks_on_node: int) -> None:
    """A one-line error, before any work, for a request this node's memory cannot hold: a
    batch's caches (and a copy when saved), a chunk's draws and codes, one song writer, per
    rank. The songs themselves go to disk as they are made (`_check_disk`); the prime is held
    once, and only its last receptive field is run."""
    import psutil

    slots, width = sum(config.dilations), config.residual_channels
    per_song = slots * width * 4 * 2 + CHUNK * (4 + 8 + 8)
    need = (batch * per_song + WRITER_BYTES) * ranks_on_node
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        raise DwaveError(
            f"{batch} song(s) per rank x {ranks_on_node} rank(s) on this node need "
            f"~{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available: ask "
            "for a smaller --batch-size")


# What the one song being written at a time holds, whatever its length (SongWriter): its
# spectrogram's columns (257 float32 bins each, and a float64 copy when drawn), plus a chunk.
WRITER_BYTES = COLUMNS * 257 * (4 + 8) + 16 * CHUNK * 16


def _check_disk(out: str, songs: int, samples: int, sample_rate: int, dtype) -> None:
    """A one-line error, before any work, for songs a WAV cannot hold or --out has no room for
    (every rank's songs share it; a song's codes are kept beside it until its WAV is whole)."""
    import shutil

    per_song = wav_bytes(samples)
    if per_song > 2**32 - 1:
        most = (2**32 - 2**16) // 2 / sample_rate / 3600
        raise DwaveError(f"a WAV holds at most {most:.1f} h of 16-bit audio at {sample_rate} Hz "
                         f"(its sizes are 32-bit): ask for fewer --seconds")
    per_song += samples * np.dtype(dtype).itemsize
    free = shutil.disk_usage(out).free  # _check_writable has made it
    if songs * per_song > free:
        raise DwaveError(f"--out {out}: {songs} song(s) of {samples:,} samples need "
                         f"~{songs * per_song / 1e6:,.1f} MB, more than the {free / 1e6:,.1f} MB "
                         "free there: ask for fewer --seconds or --num-songs, or choose another "
                         "--out")


def _check_writable(directory: str) -> None:
    from ..files import ensure_writable

    try:
        ensure_writable(directory)
    except OSError as exc:
        raise DwaveError(f"--out {directory}: cannot write there ({exc.strerror or exc}); "
                         "choose another directory") from None


def _progress(rank: int, total: int, size: int, shown: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, disable=rank != 0 or not shown,
                desc=f"generating (rank 0 of {size})" if size > 1 else "generating",
                file=sys.stderr, smoothing=0.1)
