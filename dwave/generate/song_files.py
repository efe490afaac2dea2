"""Song files: a generated song's WAV and its spectrogram PNG, written so that nothing else is
ever overwritten.

    STEM.wav   16-bit PCM; its `software` string starts with "dwave": the mark of a file dwave
               wrote (a user's WAV, or one of another tool, has none)
    STEM.png   the spectrogram; its tEXt `Software` chunk is "dwave"

A song is written as it is made (`SongWriter`: `dwave generate` streams its songs through it,
so memory does not grow with their length; `write_song` writes one held whole). Each file is
written under a temporary name beside it (`.dwave-tmp-PID-HOST-NAME`, created with O_EXCL |
O_NOFOLLOW) and renamed into place when complete, the PNG first: a WAV under its final name is
whole and has its PNG; a killed writer's temporaries are removed by the next run
(`remove_stale_temporaries`). A rename replaces a symlink at the final name; it never writes
through it. Whether a final name may be replaced is `check_song_targets`'s to say, before any
work starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct

import numpy as np

from ..errors import DwaveError

MARK = "dwave"
_TEMPORARY = ".dwave-tmp-"


def write_song(stem: str, codes: np.ndarray, sample_rate: int, quantization_channels: int,
               primed: int = 0) -> None:
    """Write STEM.png and STEM.wav of the song `codes` (mu-law codes), whose first `primed`
    codes are the real audio it was primed with: the spectrogram marks where they end."""
    writer = SongWriter(stem, len(codes), sample_rate, quantization_channels, primed)
    try:
        writer.write(codes)
        writer.close()
    except BaseException:
        writer.abandon()
        raise


# The spectrogram: scipy's defaults over segments of SEGMENT samples every HOP; at most COLUMNS
# time columns in the picture (a longer song's segments are averaged into them), so that what a
# song holds while it is written does not grow with its length.
SEGMENT, HOP, COLUMNS = 512, 128, 1024


def wav_bytes(samples: int) -> int:
    """The size of a song's WAV: 16-bit mono samples and a header of well under 1 KiB."""
    return 2 * samples + 1024


class SongWriter:
    """One song written as it is made: its codes go, chunk by chunk, into a WAV under a
    temporary name and into a spectrogram of at most COLUMNS columns; `close()` draws the PNG
    and renames both into place, the PNG first (as `write_song`). The file's bytes do not depend
    on the chunks: a song written in one piece or in many is the same file.

    Memory: one chunk, the spectrogram's columns (COLUMNS x 257 float32) and the last segment's
    tail, whatever the song's length. `total` (the song's length in codes) fixes the columns."""

    def __init__(self, stem: str, total: int, sample_rate: int, quantization_channels: int,
                 primed: int = 0):
        import soundfile as sf

        self.stem, self.total, self.rate = stem, total, sample_rate
        self.quantization_channels = quantization_channels
        self.primed, self.written = primed, 0
        segment = min(SEGMENT, total)  # a song shorter than one segment (--seconds 0.01) too
        self.segment, self.overlap = segment, segment * 3 // 4  # SEGMENT - HOP for a full one
        frames = (total - segment) // (segment - self.overlap) + 1
        self.frames, self.columns = frames, min(COLUMNS, frames)
        # float32, as scipy gives for float32 audio: a short song's picture is the same as
        # one drawn from the whole song's spectrogram at once.
        self.power = np.zeros((segment // 2 + 1, self.columns), np.float32)
        self.counts = np.zeros(self.columns)
        self.frame, self.tail = 0, np.zeros(0, np.float32)
        self.wav_path = _temporary(stem + ".wav")
        fd = os.open(self.wav_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            self.sound = sf.SoundFile(open(fd, "wb"), "w", sample_rate, 1, "PCM_16",
                                      format="WAV", closefd=True)
            self.sound.software = MARK  # before the data: WAV keeps it in a chunk ahead of it
        except BaseException:
            os.remove(self.wav_path)
            raise

    def write(self, codes: np.ndarray) -> None:
        from scipy.signal import spectrogram

        from ..store.audio import mu_law_decode

        if self.written + len(codes) > self.total:
            raise ValueError(f"{self.stem}: {self.written + len(codes)} samples for a song of "
                             f"{self.total}")
        audio = np.clip(mu_law_decode(codes, self.quantization_channels), -1.0, 1.0)
        self.sound.write(audio)
        self.written += len(audio)
        buffer = np.concatenate([self.tail, audio])
        step = self.segment - self.overlap
        if len(buffer) >= self.segment:
            _, _, power = spectrogram(buffer, fs=self.rate, nperseg=self.segment,
                                      noverlap=self.overlap)
            n = power.shape[1]
            column = (np.arange(self.frame, self.frame + n) * self.columns) // self.frames
            np.add.at(self.power.T, column, power.T)
            np.add.at(self.counts, column, 1)
            self.frame += n
            buffer = buffer[n * step:]
        self.tail = buffer

    def close(self) -> None:
        """Draw the PNG, finish the WAV's header, rename both into place. Not called (an
        exception, a kill): `abandon()` removes the temporary file."""
        if self.written != self.total:
            raise ValueError(f"{self.stem}: {self.written} of {self.total} samples written")
        self.sound.close()
        mean = (self.power / np.maximum(self.counts, 1)).astype(np.float32)
        step = self.segment - self.overlap
        # Each column at the mean centre time of its segments (scipy times a segment by its
        # centre): column c holds segments lo[c] .. hi[c] - 1, those with k * columns // frames
        # == c. Computed per column, not per segment: nothing here grows with the song.
        c = np.arange(self.columns)
        lo = (c * self.frames + self.columns - 1) // self.columns
        hi = ((c + 1) * self.frames + self.columns - 1) // self.columns
        times = (self.segment / 2 + step * (lo + hi - 1) / 2) / self.rate
        freqs = np.fft.rfftfreq(self.segment, 1 / self.rate)
        title = os.path.basename(self.stem)
        png = _write_complete(self.stem + ".png", lambda f: _draw(
            f, times, freqs, mean, title, self.primed / self.rate))
        try:
            os.replace(self.wav_path, self.stem + ".wav")
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(png)
            raise

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.sound.close()
        with contextlib.suppress(OSError):
            os.remove(self.wav_path)


def check_song_targets(directory: str, stems: list[str], overwrite: bool) -> None:
    """Refuse, before any work, to write a song over a file dwave did not write, over a
    symlink, or over dwave's own songs without `overwrite`. A dwave PNG without its WAV (a run
    killed between the two renames) is a leftover, replaced without asking."""
    for stem in stems:
        wav = os.path.join(directory, stem + ".wav")
        for path in (wav, os.path.join(directory, stem + ".png")):
            kind = _kind(path)
            if kind is None:
                continue
            name = os.path.basename(path)
            if kind != "dwave":
                raise DwaveError(
                    f"--out {directory} already holds {name} ({kind}), which dwave did not "
                    "write: it is left alone; move it or choose another --out")
            leftover = path.endswith(".png") and _kind(wav) is None
            if not (overwrite or leftover):
                raise DwaveError(f"--out {directory} already holds dwave's {name}: pass "
                                 "--overwrite to replace its songs, or choose another --out")


def is_dwave_song(directory: str, stem: str) -> bool:
    """STEM.wav is in place and dwave wrote it (a finished song: its PNG went first)."""
    return _kind(os.path.join(directory, stem + ".wav")) == "dwave"


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporary files of dwave processes of this host that are gone (killed
    mid-write): only names of dwave's own pattern, and only where that process is not alive."""
    removed = []
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            pid, _, rest = name.removeprefix(_TEMPORARY).partition("-")
            if (name.startswith(_TEMPORARY) and pid.isdigit() and rest.startswith(host + "-")
                    and not _alive(int(pid))):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))
                    removed.append(name)
    return removed


# -- private ----------------------------------------------------------------------------------


def _temporary(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f"{_TEMPORARY}{os.getpid()}-{socket.gethostname()}-{name}")


def _write_complete(path: str, write) -> str:
    temporary = _temporary(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with open(fd, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return path


def _draw(f, times: np.ndarray, freqs: np.ndarray, power: np.ndarray, title: str,
          prime_end: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.pcolormesh(times, freqs, 10 * np.log10(power + 1e-12), shading="auto", cmap="magma")
    ax.set_xlabel("seconds")
    ax.set_ylabel("Hz")
    ax.set_title(title)
    if prime_end > 0:  # what a listener hears first is real music, not the model's
        ax.axvline(prime_end, color="cyan", linestyle="--", linewidth=1.5)
        label = dict(color="cyan", va="top", fontsize=8,
                     bbox=dict(facecolor="black", alpha=0.7, pad=1, linewidth=0))
        ax.text(prime_end, freqs[-1], " generated \u2192", **label)
        ax.text(prime_end, freqs[-1], "\u2190 prime ", ha="right", **label)
    fig.tight_layout()
    fig.savefig(f, format="png", dpi=80, metadata={"Software": MARK})
    plt.close(fig)


def _kind(path: str) -> str | None:
    """None (nothing there), "dwave" (a file dwave wrote), or what else is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        marked = _png_software(path) if path.endswith(".png") else _wav_software(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return "dwave" if marked else "not marked as dwave's"


def _wav_software(path: str) -> bool:
    import soundfile as sf

    try:
        with sf.SoundFile(path) as sound:
            return (sound.software or "").startswith(MARK)
    except (sf.LibsndfileError, RuntimeError):
        return False


def _png_software(path: str) -> bool:
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
        while header := f.read(8):
            if len(header) < 8:
                return False
            length, kind = struct.unpack(">I4s", header)
            if kind == b"tEXt":
                keyword, _, text = f.read(length).partition(b"\0")
                if keyword == b"Software":
                    return text.decode("latin-1") == MARK
                f.seek(4, os.SEEK_CUR)
            elif kind == b"IDAT" or kind == b"IEND":
                return False  # text chunks that matter come before the image data
            else:
                f.seek(length + 4, os.SEEK_CUR)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
