"""Fast generation: equal to the full network (teacher forcing, priming), deterministic per
song across batches and ranks, temperature 0 = argmax, WAV output, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import MPI_ENV, ROOT, run_dwave, write_tone
from dwave.model.config import ModelConfig



def random_model(genres=(), seed=0, **overrides):
    import tensorflow as tf

    from dwave.model.network import WaveNet

    tf.keras.utils.set_random_seed(seed)
    config = ModelConfig.from_preset("tiny", condition_values=list(genres), **overrides)
    model = WaveNet(config)
    # Random biases too, so a wrong bias path cannot hide behind zero initialisation.
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if "bias" in v.name:
            v.assign(rng.normal(0, 0.1, v.shape).astype(np.float32))
    return model


# Channel counts that are not whole 16-column panels: the generator pads them.
ODD_SIZES = dict(residual_channels=12, dilation_channels=10, skip_channels=20,
                 quantization_channels=100)


@pytest.mark.parametrize("genres, sizes, threads", [
    ((), {}, 1), (("a", "b", "c"), {}, 2), (("a", "b", "c"), ODD_SIZES, 2),
    ((), dict(input_kernel=1), 2)])
def test_teacher_forced_fast_logits_equal_the_full_network(genres, sizes, threads):
    from dwave.cores import usable_cores
    from dwave.generate.cpu_engine import FastGenerator

    model = random_model(genres, **sizes)
    config = model.config
    assert config.stacks >= 2
    steps, batch = 3 * config.receptive_field, 3
    codes = np.random.default_rng(1).integers(0, config.quantization_channels, (batch, steps))
    genre = np.array([2, 0, 1]) if genres else None
    full = model(codes, condition=genre, causal=True).numpy()  # (batch, steps, Q)
    generator = FastGenerator.for_model(model, batch, genre, threads=threads)
    # 3 songs are less than a row tile: the threads share each product's columns (one core
    # per thread at most: they spin while they wait).
    assert (len(generator.lanes), generator.threads_per_lane) == (1, min(threads,
                                                                         usable_cores()))
    generator.next_code = codes[:, 0].copy()
    forced = np.concatenate([codes[:, 1:], codes[:, -1:]], axis=1).T  # next inputs
    _, logits = generator.generate(np.zeros((steps, batch)), 1.0, forced=forced,
                                   keep_logits=True)
    np.testing.assert_allclose(logits.transpose(1, 0, 2), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("input_kernel", [2, 1])
def test_priming_then_one_step_equals_the_full_network_on_prime_plus_one(input_kernel):
    from dwave.generate.cpu_engine import FastGenerator, prime_state

    model = random_model(("a", "b"), input_kernel=input_kernel)
    rf = model.config.receptive_field
    # shorter and longer than the receptive field (only its last one is run: its edges too)
    for n in (1, 5, rf - 1, rf, rf + 1, rf + 37, 3 * rf + 5):
        prime = np.random.default_rng(n).integers(0, 256, (2, n))
        generator = FastGenerator.for_model(model, 2, [1, 0])
        generator.restore(prime_state(model, prime, [1, 0]))
        sampled, logits = generator.generate(np.full((1, 2), 0.5), 1.0, keep_logits=True)
        full = model(prime, condition=np.array([1, 0]), causal=True).numpy()
        np.testing.assert_allclose(logits[0], full[:, -1], rtol=1e-4, atol=1e-4)
        # One more step: the full network over prime + the sampled sample.
        _, logits = generator.generate(np.full((1, 2), 0.5), 1.0, keep_logits=True)
        extended = np.concatenate([prime, sampled.T], axis=1)
        full = model(extended, condition=np.array([1, 0]), causal=True).numpy()
        np.testing.assert_allclose(logits[0], full[:, -1], rtol=1e-4, atol=1e-4)


def test_temperature_zero_follows_the_argmax_and_sampling_follows_the_softmax():
    from dwave.generate.cpu_engine import FastGenerator

    model = random_model()
    generator = FastGenerator.for_model(model, 2)
    codes, logits = generator.generate(np.random.default_rng(0).random((50, 2)), 0.0,
                                       keep_logits=True)
    np.testing.assert_array_equal(codes, logits.argmax(-1))
    # Temperature 1: each draw is the inverse CDF of softmax(logits) at its uniform.
    generator = FastGenerator.for_model(model, 2)
    uniforms = np.random.default_rng(1).random((50, 2)).astype(np.float32)
    codes, logits = generator.generate(uniforms, 1.0, keep_logits=True)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
    expected = (cdf <= uniforms[..., None]).sum(-1)
    np.testing.assert_array_equal(codes, np.minimum(expected, 255))


def test_a_temperature_whose_inverse_overflows_acts_as_zero():
    from dwave.generate.cpu_engine import FastGenerator, inverse_temperature

    assert inverse_temperature(1e-40) == 0 and inverse_temperature(0.0) == 0
    assert inverse_temperature(0.5) == np.float32(2.0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            inverse_temperature(bad)
    model = random_model()
    uniforms = np.random.default_rng(0).random((40, 2))
    greedy = FastGenerator.for_model(model, 2).generate(uniforms, 0.0)
    tiny = FastGenerator.for_model(model, 2).generate(uniforms, 1e-40)
    np.testing.assert_array_equal(tiny, greedy)


def test_a_song_does_not_depend_on_its_batch():
    from dwave.generate.cpu_engine import FastGenerator
    from dwave.generate.command import song_stream

    def song_uniforms(seed, song, samples):  # a song's draws, as dwave generate makes them
        return song_stream(seed, song).random(samples, dtype=np.float32)

    model = random_model()
    uniforms = np.stack([song_uniforms(7, s, 400) for s in range(9)], axis=1)
    one_thread = FastGenerator.for_model(model, 9, threads=1)
    two_lanes = FastGenerator.for_model(model, 9, threads=2)
    alone_two_threads = FastGenerator.for_model(model, 1, threads=2)  # one song, columns shared
    assert len(two_lanes.lanes) == 2 and alone_two_threads.threads_per_lane == 2
    together = one_thread.generate(uniforms, 1.0)
    np.testing.assert_array_equal(two_lanes.generate(uniforms, 1.0), together)
    alone = alone_two_threads.generate(song_uniforms(7, 2, 400)[:, None], 1.0)
    np.testing.assert_array_equal(alone[:, 0], together[:, 2])


@pytest.mark.slow
def test_generate_writes_songs_deterministically_across_ranks(trained_run, tmp_path):
    one = tmp_path / "one"
    proc = run_dwave("generate", trained_run, "--out", one, "--num-songs", "3", "--seconds",
                     "0.5", "--genre", "tone", "--seed", "3", check=0)
    assert "samples/s" in proc.stderr and "real time" in proc.stderr
    names = sorted(n for n in os.listdir(one) if n.startswith("song-"))
    assert names == [f"song-00{i}.{ext}" for i in range(3) for ext in ("png", "wav")]
    audio, rate = sf.read(one / "song-000.wav", dtype="int16")
    assert rate == 16000 and audio.shape == (8000,) and audio.std() > 0
    assert sf.info(str(one / "song-000.wav")).subtype == "PCM_16"

    two = tmp_path / "two"
    cmd = ["mpirun", "-np", "2", "--bind-to", "none", "-x", "PATH", sys.executable, "-m",
           "dwave.cli", "generate", str(trained_run), "--out", str(two), "--num-songs", "3",
           "--seconds", "0.5", "--genre", "tone", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **MPI_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(n for n in os.listdir(two) if n.startswith("song-")) == names
    for i in range(3):
        assert (one / f"song-00{i}.wav").read_bytes() == (two / f"song-00{i}.wav").read_bytes()
    assert (one / "song-000.wav").read_bytes() != (one / "song-001.wav").read_bytes()


@pytest.mark.slow
def test_generate_with_a_prime_starts_from_the_song(trained_run, tmp_path):
    prime = write_tone(tmp_path / "prime.ogg", seconds=1.0, rate=44100)
    out = tmp_path / "out"
    run_dwave("generate", trained_run, "--out", out, "--seconds", "0.25", "--prime", prime,
              "--prime-seconds", "0.5", "--genre", "chirp", "--temperature", "0", check=0)
    audio, rate = sf.read(out / "song-000.wav", dtype="float32")
    assert len(audio) == 8000 + 4000  # the prime, then what follows
    from dwave.store.audio import decode_to_mono, mu_law_decode, mu_law_encode, normalisation_gain

    decoded = decode_to_mono(prime, 16000)
    expected = mu_law_decode(mu_law_encode(decoded.samples * normalisation_gain(decoded)))[:8000]
    np.testing.assert_allclose(audio[:8000], expected, atol=1 / 32768 + 1e-6)


@pytest.mark.slow
def test_bad_generate_inputs_are_one_line_errors(trained_run, tmp_path):
    def error_of(*args):
        proc = run_dwave("generate", *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr.strip().splitlines()[-1]

    out = ["--out", str(tmp_path / "o")]
    assert "does not exist" in error_of(tmp_path / "missing", *out)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in error_of(tmp_path / "empty", *out)
    assert "must be a positive number" in error_of(trained_run, *out, "--seconds", "-1",
                                                   "--genre", "tone")
    for flag, value, message in [("--temperature", "nan", "finite number >= 0, got nan"),
                                 ("--temperature", "inf", "finite number >= 0, got inf"),
                                 ("--temperature", "-0.5", "finite number >= 0"),
                                 ("--seconds", "inf", "--seconds must be a positive number"),
                                 ("--prime-seconds", "inf", "--prime-seconds must be a positive")]:
        assert message in error_of(trained_run, *out, flag, value, "--genre", "tone"), flag
    # refused before anything was written (dwave's own job folder included)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    (tmp_path / "a-file").write_text("x")
    for out_dir in (tmp_path / "a-file", tmp_path / "a-file" / "songs"):
        assert f"--out {out_dir}: cannot write there" in error_of(
            trained_run, "--out", out_dir, "--genre", "tone")
    # An empty or damaged checkpoint state file: one line naming the checkpoint to resume from.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(trained_run, broken)
    (broken / "checkpoints" / "checkpoint").write_text("")
    line = error_of(broken, *out, "--genre", "tone")
    assert "checkpoints/checkpoint is empty or damaged; the newest checkpoint beside it is " \
        "ckpt-30" in line
    assert "unknown genre 'jazz'" in error_of(trained_run, *out, "--genre", "jazz")
    assert "conditioned on genre" in error_of(trained_run, *out)
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text((trained_run / "config.json").read_text())
    assert "no checkpoint yet" in error_of(no_ckpt, *out, "--genre", "tone")


@pytest.mark.slow
def test_generate_never_writes_over_what_it_did_not_write(trained_run, tmp_path):
    out = tmp_path / "out"
    flags = ["--out", out, "--num-songs", "2", "--seconds", "0.1", "--genre", "tone"]

    def error_of(*extra):
        proc = run_dwave("generate", trained_run, *flags, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    out.mkdir()
    (out / "song-001.wav").write_bytes(b"the user's own recording")
    target = tmp_path / "precious.txt"
    target.write_text("not a song")
    (out / "song-000.png").symlink_to(target)
    line = error_of()
    assert "already holds song-000.png (a symlink), which dwave did not write" in line
    (out / "song-000.png").unlink()
    line = error_of("--overwrite")  # --overwrite replaces dwave's songs, never a user's file
    assert "already holds song-001.wav (not marked as dwave's)" in line
    assert (out / "song-001.wav").read_bytes() == b"the user's own recording"
    assert target.read_text() == "not a song"
    (out / "song-001.wav").unlink()
    # dwave's job folder in --out is its own: a symlink there is not followed, a file not
    # replaced.
    (out / ".dwave-generate").symlink_to(tmp_path)
    assert ".dwave-generate is not dwave's folder (a symlink or a file)" in error_of()
    (out / ".dwave-generate").unlink()

    def songs():
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    run_dwave("generate", trained_run, *flags, check=0)
    first = songs()
    assert sorted(first) == ["song-000.png", "song-000.wav", "song-001.png", "song-001.wav"]
    # The same request again continues its job (nothing left to do); another one may not
    # replace its songs without --overwrite.
    assert "nothing to do" in run_dwave("generate", trained_run, *flags, check=0).stderr
    assert "already holds dwave's song-000.wav: pass --overwrite" in error_of("--seed", "1")
    # dwave's own songs are replaced with --overwrite, a symlink in their place is not followed
    (out / "song-001.wav").unlink()
    (out / "song-001.wav").symlink_to(target)
    assert "song-001.wav (a symlink)" in error_of("--overwrite")
    (out / "song-001.wav").unlink()
    run_dwave("generate", trained_run, *flags, "--overwrite", check=0)
    assert songs() == first  # same seed, same songs
    assert target.read_text() == "not a song"


def test_song_files_are_complete_or_absent_and_stale_temporaries_go(tmp_path):
    import socket

    import soundfile as sf

    from dwave.generate.song_files import check_song_targets, remove_stale_temporaries, write_song

    codes = np.random.default_rng(0).integers(0, 256, 4000)
    write_song(str(tmp_path / "song-000"), codes, 16000, 256)
    assert sf.info(str(tmp_path / "song-000.wav")).frames == 4000
    write_song(str(tmp_path / "short"), codes[:160], 16000, 256)  # shorter than a segment
    assert sf.info(str(tmp_path / "short.wav")).frames == 160
    for name in ("short.wav", "short.png"):
        (tmp_path / name).unlink()
    # A run killed between the PNG's rename and the WAV's leaves dwave's PNG alone: a
    # leftover, replaced without --overwrite; the WAV alone is not.
    (tmp_path / "song-000.wav").unlink()
    check_song_targets(str(tmp_path), ["song-000"], overwrite=False)
    # Temporaries of a dead dwave process on this host go; a live one's and others stay.
    host = socket.gethostname()
    dead = _dead_pid()
    names = [f".dwave-tmp-{dead}-{host}-song-001.wav", f".dwave-tmp-{os.getpid()}-{host}-x.wav",
             f".dwave-tmp-{dead}-otherhost-song-002.wav", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(str(tmp_path)) == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:] + ["song-000.png"])


def test_a_primed_songs_spectrogram_marks_where_the_prime_ends(tmp_path):
    """The marker is a cyan line (a colour the magma spectrogram never uses) at the prime's
    end: at a quarter of the width for 1 s of prime in 4 s, and absent without a prime."""
    import matplotlib.image

    from dwave.generate.song_files import write_song

    codes = np.random.default_rng(0).integers(0, 256, 4 * 16000)

    def cyan_columns(primed):
        write_song(str(tmp_path / f"song-{primed}"), codes, 16000, 256, primed=primed)
        pixels = matplotlib.image.imread(str(tmp_path / f"song-{primed}.png"))[..., :3]
        cyan = (pixels[..., 0] < 0.3) & (pixels[..., 1] > 0.7) & (pixels[..., 2] > 0.7)
        return np.flatnonzero(cyan.sum(axis=0) > pixels.shape[0] // 3)

    assert cyan_columns(0).size == 0
    columns = cyan_columns(16000)
    assert columns.size > 0
    # The plot's axes start after the y label: the line lies at the first quarter of them,
    # so left of the image's middle and right of its first tenth.
    width = matplotlib.image.imread(str(tmp_path / "song-16000.png")).shape[1]
    assert 0.1 * width < columns.mean() < 0.5 * width


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_song_written_in_chunks_is_the_file_written_whole(tmp_path):
    """SongWriter (what `dwave generate` streams songs through) against an independent write:
    the WAV is soundfile's 16-bit file of the decoded codes, byte for byte, whatever the chunks;
    the spectrogram is scipy's of the whole song (a song of up to 1024 segments: one column
    each)."""
    import soundfile as sf
    from scipy.signal import spectrogram

    from dwave.generate import song_files
    from dwave.store.audio import mu_law_decode

    codes = np.random.default_rng(3).integers(0, 256, 50_000)
    audio = np.clip(mu_law_decode(codes, 256), -1.0, 1.0)
    drawn = []
    real_draw = song_files._draw
    song_files._draw = lambda f, *args: (drawn.append(args), real_draw(f, *args))
    try:
        for name, chunk in (("whole", len(codes)), ("chunks", 1999), ("tiny", 7)):
            writer = song_files.SongWriter(str(tmp_path / name), len(codes), 16000, 256)
            for begin in range(0, len(codes), chunk):
                writer.write(codes[begin:begin + chunk])
            writer.close()
    finally:
        song_files._draw = real_draw
    with sf.SoundFile(tmp_path / "reference.wav", "w", 16000, 1, "PCM_16", format="WAV") as f:
        f.software = "dwave"
        f.write(audio)
    reference = (tmp_path / "reference.wav").read_bytes()
    freqs, times, power = spectrogram(audio, fs=16000, nperseg=512, noverlap=384)
    for name, (t, f, p, title, _) in zip(("whole", "chunks", "tiny"), drawn):
        assert (tmp_path / f"{name}.wav").read_bytes() == reference
        assert title == name and np.array_equal(t, times) and np.array_equal(f, freqs)
        assert np.array_equal(p, power)
    png = {name: (tmp_path / f"{name}.png").read_bytes() for name in ("whole", "chunks", "tiny")}
    assert png["whole"] != png["chunks"]  # their titles differ; the pictures are checked above
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".dwave-tmp-")]


@pytest.mark.slow
def test_a_long_songs_writer_holds_what_a_short_ones_does(tmp_path):
    """What a song being written holds does not grow with its length: the spectrogram's
    columns are capped (a long song's segments averaged into them)."""
    import tracemalloc

    from dwave.generate.song_files import SongWriter

    chunk = np.random.default_rng(4).integers(0, 256, 2000)

    def peak(seconds):
        total = seconds * 16000
        tracemalloc.start()
        writer = SongWriter(str(tmp_path / f"s{seconds}"), total, 16000, 256)
        for _ in range(total // len(chunk)):
            writer.write(chunk)
        writer.close()
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    peak(1)  # imports and matplotlib's first figure (fonts, caches), not a song's holding
    short, long_ = peak(40), peak(400)  # 4,997 and 49,997 segments: both over COLUMNS
    # The whole 400-s song held as before: its float32 audio and its float32 spectrogram.
    held_whole = 400 * 16000 * 4 + 49_997 * 257 * 4
    print(f"peak while writing: 40 s {short:,} B, 400 s {long_:,} B; held whole {held_whole:,} B")
    assert long_ <= 1.2 * short < held_whole, (short, long_, held_whole)


def _digests(directory) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.name.startswith("song-")}


def _interrupt(args: list, out, codes_at: int, signal_number: int) -> bool:
    """Start `dwave generate ARGS`, and once song-000 has `codes_at` codes on disk send it
    `signal_number`; True if the process was stopped with songs in progress."""
    import signal
    import time

    log = out.parent / f"{out.name}-{time.time_ns()}.log"  # a file: a full pipe would block it
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dwave.cli", "generate",
                                 *map(str, args)], stdout=subprocess.DEVNULL, stderr=stderr,
                                cwd=ROOT)
    codes = out / ".dwave-generate" / "song-000.codes"
    started = time.time_ns()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        # Written by this process (a file left by the last one does not count): at or past
        # `codes_at` codes, or with fewer left to make.
        if (codes.exists() and codes.stat().st_mtime_ns > started
                and codes.stat().st_size >= codes_at):
            proc.send_signal(signal_number)
            break
        time.sleep(0.01)
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
    if signal_number == signal.SIGTERM:
        assert proc.returncode == 0, log.read_text()[-3000:]
    return any((out / ".dwave-generate").glob("*.state.npz"))


@pytest.mark.slow
def test_a_stopped_or_killed_generation_resumes_to_the_same_files(trained_run, tmp_path):
    """SIGTERM (saves at once) and SIGKILL (the last periodic save) at random points, each
    followed by the same command: the songs come out byte for byte as an uninterrupted run's,
    a primed song included; finished songs are skipped; `dwave status` tells how far it is."""
    import signal

    prime = write_tone(tmp_path / "prime.ogg", seconds=1.0, rate=16000)
    flags = ["--num-songs", "3", "--seconds", "12", "--genre", "tone", "--batch-size", "2",
             "--prime", prime, "--prime-seconds", "0.25"]
    whole = tmp_path / "whole"
    run_dwave("generate", trained_run, "--out", whole, *flags, check=0)
    expected = _digests(whole)
    assert len(expected) == 6

    out = tmp_path / "stopped"
    args = [trained_run, "--out", out, *flags, "--save-every", "0.001"]
    rng = np.random.default_rng(0)
    stops = 0
    for signal_number in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        at = int(rng.integers(4000, 12 * 16000))
        stops += _interrupt(args, out, at, signal_number)
        status = run_dwave("status", out)
        assert status.returncode in (0, 3) and "song(s) finished" in status.stdout
    assert stops >= 2  # at least two interruptions landed in the middle of songs
    # The last resume on 2 ranks: song i moves to rank i mod 2, its saved state with it.
    proc = subprocess.run(["mpirun", "-np", "2", "--bind-to", "none", "-x", "PATH",
                           sys.executable, "-m", "dwave.cli", "generate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **MPI_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stderr and "continuing the job in" in proc.stderr
    assert _digests(out) == expected
    assert sorted(os.listdir(out / ".dwave-generate")) == ["job.json", "lock"]
    status = run_dwave("status", out, check=0)
    assert "3 of 3 song(s) finished" in status.stdout
    # Done: the same command again has nothing to do and leaves the songs as they are.
    proc = run_dwave("generate", *args, check=0)
    assert "nothing to do: all 3 song(s) are in" in proc.stderr
    assert _digests(out) == expected


@pytest.mark.slow
def test_songs_in_progress_are_continued_only_by_their_own_request(trained_run, tmp_path):
    """Another request (seed, length) into an --out with songs in progress is refused in one
    line naming what differs; --overwrite starts over; a second job on the same --out is
    refused while the first holds it; a damaged state is an error, not a fresh start; a job
    whose checkpoint is gone is not continued with other weights."""
    import shutil
    import signal

    out = tmp_path / "out"
    flags = ["--out", out, "--num-songs", "2", "--seconds", "10", "--genre", "tone"]
    assert _interrupt([trained_run, *flags], out, 40_000, signal.SIGTERM)

    def error_of(*args):
        proc = run_dwave("generate", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    line = error_of(trained_run, *flags, "--seed", "1", "--seconds", "9")
    assert "holds songs in progress of another request" in line
    assert "--seconds: 10.0 there, 9.0 here; --seed: 0 there, 1 here" in line

    # A second job while one runs: the lock, held by another process.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dwave.files import DirectoryLock; "
         "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(out / ".dwave-generate")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = error_of(trained_run, *flags)
        assert f"--out {out / '.dwave-generate'} is in use by another dwave generate" in line
    finally:
        holder.kill()
        holder.wait()

    state = out / ".dwave-generate" / "song-000.state.npz"
    saved = state.read_bytes()
    state.write_bytes(saved[:100])
    assert f"cannot read {state}" in error_of(trained_run, *flags)
    state.write_bytes(saved)

    copy = tmp_path / "run-copy"
    shutil.copytree(trained_run, copy)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    request = (moved / ".dwave-generate" / "job.json")
    request.write_text(request.read_text().replace(str(trained_run), str(copy)))
    for index in (copy / "checkpoints").glob("ckpt-30.index"):
        index.unlink()
    line = error_of(copy, "--out", moved, "--num-songs", "2", "--seconds", "10",
                    "--genre", "tone")
    assert "were started from checkpoint" in line and "which is gone" in line

    # --overwrite: the other request's progress goes, its songs are made anew.
    run_dwave("generate", trained_run, *flags, "--seed", "1", "--overwrite", check=0)
    fresh = tmp_path / "fresh"
    run_dwave("generate", trained_run, "--out", fresh, *flags[2:], "--seed", "1", check=0)
    assert _digests(out) == _digests(fresh)


@pytest.mark.slow
def test_a_stop_while_songs_are_written_saves_the_rest_whole(trained_run, tmp_path):
    """Writing thousands of songs' files takes minutes: a stop between two of them saves the
    rest as made in full, and the rerun writes them without generating anything again."""
    import signal
    import time

    flags = ["--num-songs", "24", "--batch-size", "24", "--seconds", "0.05", "--genre", "tone"]
    whole = tmp_path / "whole"
    run_dwave("generate", trained_run, "--out", whole, *flags, check=0)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dwave.cli", "generate", str(trained_run),
                             "--out", str(out), *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while proc.poll() is None and not (out / "song-000.wav").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stopped by SIGTERM" in stderr, stderr[-2000:]
    written = sorted(p.name for p in out.glob("*.wav"))
    assert 1 <= len(written) < 24
    saved = sorted((out / ".dwave-generate").glob("*.state.npz"))
    assert len(saved) == 24 - len(written)
    with np.load(saved[0]) as state:
        assert int(state["codes"]) == 800  # made in full
    proc = run_dwave("generate", trained_run, "--out", out, *flags, check=0)
    assert f"{len(written)} song(s) finished, {len(saved)} resumed" in proc.stderr
    assert "0 samples in" in proc.stderr  # nothing generated again
    assert _digests(out) == _digests(whole)


def test_genre_names_are_matched_without_case_and_a_near_miss_is_suggested():
    from dwave.errors import DwaveError
    from dwave.generate.command import condition_index
    from dwave.model.config import ModelConfig

    config = ModelConfig.from_preset("tiny", condition_values=["Electronic", "Hip-Hop", "Rock"])
    assert condition_index(config, "rock") == 2 and condition_index(config, "HIP-HOP") == 1
    with pytest.raises(DwaveError, match=r"unknown genre 'Hiphop' \(did you mean 'Hip-Hop'\?\); "
                                         "this model knows Electronic, Hip-Hop, Rock"):
        condition_index(config, "Hiphop")
    with pytest.raises(DwaveError, match=r"unknown genre 'jazz'; this model knows"):
        condition_index(config, "jazz")
