"""What a `dwave generate` leaves in OUT/.dwave-generate/ so that a stopped job resumes.

    job.json            the request: what the songs' audio depends on (run, checkpoint and the
                        digest of its index, engine, seconds, temperature, seed, the digest of
                        the prime's codes, genre), plus num_songs and written_by. A rerun
                        into OUT with the same request continues the job: finished songs are
                        skipped, songs in progress resume from their last saved state.
    lock                held by rank 0 while a job runs: one job writes OUT at a time
    song-NNN.codes      the song's codes so far, prime first (audio.code_dtype), appended
    song-NNN.state.npz  the song's generator state at its last save (a SongsState of one song),
                        its random stream's state, and how many codes of .codes that state has
                        made; codes after those are made again, identically, on resume

A save puts the codes on disk (fsync) before the state that counts them, and writes the state
under a temporary name that is then renamed: whatever kills the process, the state on disk
describes codes that are on disk. When a song's WAV is in place, its two files go. Nothing
here touches a file outside this directory, and only the names above inside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import DwaveError

DIRECTORY = ".dwave-generate"
RECORD = "job.json"
_CODES, _STATE = ".codes", ".state.npz"

# How a request's fields read in an error: the flag that sets each.
FLAGS = {"run_dir": "RUN_DIR", "checkpoint": "--checkpoint",
         "checkpoint_digest": "the checkpoint's contents", "engine": "--engine",
         "seconds": "--seconds", "temperature": "--temperature", "seed": "--seed",
         "prime_digest": "the prime's codes (--prime, --prime-seconds)",
         "genre": "--genre", "sample_rate": "the model's sample rate",
         "quantization_channels": "the model's quantization channels"}


@dataclass
class SavedSong:
    """One song's place at its last save."""

    caches: np.ndarray  # (slots, C)
    t: int
    next_code: int
    previous_code: int
    stream: dict  # numpy bit generator state of the song's random stream
    codes: int  # codes of the .codes file this state has made (prime included)


def song_stem(song: int) -> str:
    """Song i's files: OUT/song-00i.wav and .png."""
    return f"song-{song:03d}"


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class GenerationJob:
    def __init__(self, out: str):
        self.out = out
        self.directory = os.path.join(out, DIRECTORY)
        self.record_path = os.path.join(self.directory, RECORD)

    # -- the request ----------------------------------------------------------------------

    def recorded(self) -> dict | None:
        """The request of the job that last wrote OUT, or None where none did."""
        try:
            with open(self.record_path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DwaveError(f"cannot read {self.record_path} ({exc.strerror}): fix its "
                             "permissions, or choose another --out") from None
        except ValueError:
            raise DwaveError(f"{self.record_path} is damaged: pass --overwrite to start the "
                             "songs in --out over, or choose another --out") from None
        if not isinstance(record, dict) or not isinstance(record.get("request"), dict):
            raise DwaveError(f"{self.record_path} is not a dwave generate record: pass "
                             "--overwrite to start over, or choose another --out")
        return record

    def check(self, request: dict, overwrite: bool) -> bool:
        """Whether this request continues OUT's job (its finished songs are skipped, its songs
        in progress resumed). Another request's songs in progress are an error unless
        `overwrite` (which starts every song over); its finished songs are for
        check_song_targets to judge."""
        record = self.recorded()
        if record is None or overwrite:
            return False
        if record["request"] == request:
            return True
        if self.in_progress():
            raise DwaveError(
                f"--out {self.out} holds songs in progress of another request "
                f"({differences(record['request'], request)}): rerun with the flags they were "
                f"started with (in {self.record_path}) to finish them, pass --overwrite to "
                "drop them, or choose another --out")
        return False

    def begin(self, request: dict, num_songs: int, continuing: bool) -> None:
        """Make this request OUT's job (rank 0, holding the lock, after `check` and the song
        targets' check): a new job's leftover progress files go."""
        from ..files import atomic_write_json
        from ..versions import software_versions

        if not continuing:
            self.drop_progress()
        os.makedirs(self.directory, exist_ok=True)
        atomic_write_json(self.record_path, {"request": request, "num_songs": num_songs,
                                             "written_by": software_versions()})

    def progress(self) -> tuple[int, int]:
        """(songs finished, songs asked for) of the recorded job."""
        from .song_files import is_dwave_song

        songs = int(self.recorded()["num_songs"])
        return sum(is_dwave_song(self.out, song_stem(i)) for i in range(songs)), songs

    # -- songs ----------------------------------------------------------------------------

    def in_progress(self) -> list[str]:
        """Stems of the songs with a .codes or state file here."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted({n.removesuffix(_CODES).removesuffix(_STATE) for n in names
                       if n.startswith("song-") and (n.endswith(_CODES) or n.endswith(_STATE))})

    def drop_progress(self) -> None:
        for stem in self.in_progress():
            self.song_done(stem)

    def codes_path(self, stem: str) -> str:
        return os.path.join(self.directory, stem + _CODES)

    def load(self, stem: str, dtype) -> SavedSong | None:
        """The song's last saved state, or None for a song to start from the beginning
        (none saved, or its codes are not all there: made again from the start, identically).
        A state file that cannot be read is an error: it is not ours to guess past."""
        path = os.path.join(self.directory, stem + _STATE)
        try:
            with np.load(path) as saved:
                song = SavedSong(saved["caches"], int(saved["t"]), int(saved["next_code"]),
                                 int(saved["previous_code"]), json.loads(str(saved["stream"])),
                                 int(saved["codes"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:120]
            raise DwaveError(f"cannot read {path} ({reason}): pass --overwrite to start the "
                             "songs in --out over, or choose another --out") from None
        try:
            on_disk = os.path.getsize(self.codes_path(stem)) // np.dtype(dtype).itemsize
        except FileNotFoundError:
            on_disk = 0
        return song if on_disk >= song.codes else None

    def open_codes(self, stem: str, keep: int):
        """The song's .codes file, open for appending after its first `keep` codes (what a
        resumed state has made; 0 for a new song)."""
        os.makedirs(self.directory, exist_ok=True)
        path = self.codes_path(stem)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        f = open(fd, "r+b")
        f.truncate(keep)
        f.seek(keep)
        return f

    def save(self, stem: str, state, stream: dict, codes_file, codes: int) -> None:
        """Song `stem`'s state (a one-song SongsState), after its codes are on disk."""
        codes_file.flush()
        os.fsync(codes_file.fileno())
        path = os.path.join(self.directory, stem + _STATE)
        temporary = f"{path}.tmp-{os.getpid()}.npz"
        try:
            with open(temporary, "wb") as f:
                np.savez(f, caches=state.caches[0], t=state.t, next_code=state.next_code[0],
                         previous_code=state.previous_code[0], stream=json.dumps(stream),
                         codes=codes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            if exc.errno == errno.ENOSPC:
                raise DwaveError(f"{self.directory}: the disk is full while saving {stem}'s "
                                 "state: free space and rerun the same command to resume from "
                                 "the last save") from None
            raise

    def remove_if_only_lock(self) -> None:
        """The directory, where it holds nothing but the lock file (a refused first request)."""
        with contextlib.suppress(OSError):
            if os.listdir(self.directory) == ["lock"]:
                os.remove(os.path.join(self.directory, "lock"))
                os.rmdir(self.directory)

    def song_done(self, stem: str) -> None:
        """The song's WAV is in place (or the song is dropped): its progress files go."""
        for suffix in (_STATE, _CODES):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, stem + suffix))


def differences(old: dict, new: dict) -> str:
    """'--seed 3 there, 0 here; ...' for the fields two requests disagree on."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "checkpoint_digest" in keys and "checkpoint" in keys:
        keys.remove("checkpoint_digest")  # another checkpoint: of course other contents
    return "; ".join(f"{FLAGS.get(k, k)}: {_short(old.get(k))} there, {_short(new.get(k))} here"
                     for k in keys)


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) \
        else text
