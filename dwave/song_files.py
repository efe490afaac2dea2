"""Song files: a generated song's WAV and its spectrogram PNG, written so that nothing else is
ever overwritten.

    STEM.wav   16-bit PCM; its `software` string starts with "dwave": the mark of a file dwave
               wrote (a user's WAV, or one of another tool, has none)
    STEM.png   the spectrogram; its tEXt `Software` chunk is "dwave"

Each file is written under a temporary name beside it (`.dwave-tmp-PID-HOST-NAME`, created
with O_EXCL | O_NOFOLLOW) and renamed into place when complete, the PNG first: a WAV under its final
name is whole and has its PNG. A rename replaces a symlink at the final name; it never writes
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

from .errors import DwaveError

MARK = "dwave"
_TEMPORARY = ".dwave-tmp-"


def write_song(stem: str, codes: np.ndarray, sample_rate: int, quantization_channels: int,
               primed: int = 0) -> None:
    """Write STEM.png and STEM.wav of the song `codes` (mu-law codes), whose first `primed`
    codes are the real audio it was primed with: the spectrogram marks where they end."""
    from .audio import mu_law_decode

    audio = np.clip(mu_law_decode(codes, quantization_channels), -1.0, 1.0)
    title = os.path.basename(stem)
    png = _write_complete(stem + ".png", lambda f: _spectrogram(f, audio, sample_rate, title,
                                                                 primed / sample_rate))
    try:
        _write_complete(stem + ".wav", lambda f: _wav(f, audio, sample_rate))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(png)  # ours, just written: a PNG without its song is not a result
        raise


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


def _write_complete(path: str, write) -> str:
    directory, name = os.path.split(path)
    temporary = os.path.join(directory,
                             f"{_TEMPORARY}{os.getpid()}-{socket.gethostname()}-{name}")
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


def _wav(f, audio: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    with sf.SoundFile(f, "w", sample_rate, 1, "PCM_16", format="WAV") as sound:
        sound.software = MARK  # strings before the data: WAV keeps them in a chunk ahead of it
        sound.write(audio)


def _spectrogram(f, audio: np.ndarray, sample_rate: int, title: str,
                 prime_end: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.signal import spectrogram

    segment = min(512, len(audio))  # a song shorter than one segment (--seconds 0.01) too
    freqs, times, power = spectrogram(audio, fs=sample_rate, nperseg=segment,
                                      noverlap=segment * 3 // 4)
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
