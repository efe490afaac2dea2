"""A small corpus of synthetic songs, so the demo and the tests need no downloaded data.

Three "genres" with audibly different structure (so genre conditioning has something to learn):
tonal arpeggios, square-wave chiptune and filtered-noise percussion. Written as real MP3 files
through libsndfile, so they go through exactly the code path of a user's songs.
"""

from __future__ import annotations

import csv
import os

import numpy as np

GENRES = ("tonal", "chiptune", "percussive")


def _notes(rng: np.random.Generator, count: int) -> np.ndarray:
    # A pentatonic scale: anything sounds pleasant, and the pitch set is small enough to learn.
    scale = np.array([0, 2, 4, 7, 9])
    steps = rng.choice(scale, count) + 12 * rng.integers(0, 2, count)
    return 220.0 * 2.0 ** (steps / 12.0)


def synth_song(genre: str, seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """A stereo float32 song of `seconds`, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    beat = int(sample_rate * rng.uniform(0.15, 0.3))
    freqs = np.repeat(_notes(rng, n // beat + 1), beat)[:n]
    phase = 2 * np.pi * np.cumsum(freqs) / sample_rate
    position = (np.arange(n) % beat) / beat  # 0..1 within each note
    if genre == "tonal":
        wave = np.sin(phase) + 0.3 * np.sin(2 * phase) + 0.1 * np.sin(3 * phase)
        envelope = np.exp(-3.0 * position)
    elif genre == "chiptune":
        wave = np.sign(np.sin(phase)) * 0.6
        envelope = (position < 0.7).astype(np.float64)
    elif genre == "percussive":
        noise = rng.standard_normal(n)
        kernel = np.ones(8) / 8  # a crude low-pass so the hits are thuds, not hiss
        wave = np.convolve(noise, kernel, mode="same") * 2.0 + 0.5 * np.sin(phase / 2)
        envelope = np.exp(-12.0 * position)
    else:
        raise ValueError(f"unknown genre {genre!r}; choose from {GENRES}")
    mono = wave * envelope
    mono = 0.8 * mono / np.max(np.abs(mono))
    pan = rng.uniform(0.6, 1.0)
    return np.stack([mono * pan, mono * (1.6 - pan)], axis=1).astype(np.float32) * 0.9


def write_corpus(
    directory: str, songs: int = 6, seconds: float = 20.0, sample_rate: int = 44100, seed: int = 0
) -> str:
    """Write `songs` MP3s named like FMA's (000001.mp3 ...) and a tracks.csv of their genres.

    Returns the path of the CSV. Existing files are kept (the corpus is deterministic).
    """
    import soundfile as sf

    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(songs):
        genre = GENRES[i % len(GENRES)]
        path = os.path.join(directory, f"{i + 1:06d}.mp3")
        if not os.path.exists(path):
            audio = synth_song(genre, seconds, sample_rate, seed=seed * 1000 + i)
            sf.write(path + ".tmp", audio, sample_rate, format="MP3")
            os.replace(path + ".tmp", path)
        rows.append((i + 1, genre))
    csv_path = os.path.join(directory, "tracks.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["track_id", "genre"])
        writer.writerows(rows)
    return csv_path
