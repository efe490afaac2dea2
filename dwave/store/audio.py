"""Audio numerics: mu-law companding, streaming decode to mono at a target rate, WAV output.

Pure functions over numpy arrays (plus libsndfile/soxr for decoding); nothing here knows about
Dask, Zarr or TensorFlow, so every piece is testable on its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

#: Frames decoded per block. 2^18 stereo float32 frames = 2 MiB: a 30-s clip is read in 6
#: calls (libsndfile's MP3 decoder costs a little per call), and the buffer stays small next
#: to the decoded song a worker holds.
DECODE_BLOCK_FRAMES = 1 << 18

#: A signal whose peak is below this (about -120 dBFS) is treated as silence.
SILENCE_PEAK = 1e-6


class AudioError(Exception):
    """A file that cannot become a track; the message is the reason shown to the user."""


# --------------------------------------------------------------------------------------------
# mu-law companding (ITU-T G.711 curve, as in the WaveNet paper, section 2.2)
# --------------------------------------------------------------------------------------------

# What a song becomes unless told otherwise: the defaults of the store (`dwave preprocess`), and
# so of every model trained on one. Their one home.
DEFAULT_SAMPLE_RATE = 16000
DEFAULT_QUANTIZATION_CHANNELS = 256


def code_dtype(quantization_channels: int) -> np.dtype:
    """The smallest unsigned integer type that holds `quantization_channels` codes."""
    if not 2 <= quantization_channels <= 65536:
        raise ValueError(f"quantization channels must be in 2..65536, got {quantization_channels}")
    return np.dtype(np.uint8 if quantization_channels <= 256 else np.uint16)


def mu_law_encode(audio: np.ndarray,
                  quantization_channels: int = DEFAULT_QUANTIZATION_CHANNELS,
                  gain: float = 1.0) -> np.ndarray:
    """Compand `audio` * `gain` in [-1, 1] and quantise it to integer codes 0 .. channels-1.

    f(x) = sign(x) * ln(1 + mu*|x|) / ln(1 + mu), mu = channels - 1, then f in [-1, 1] is
    mapped linearly to [0, mu] and rounded to the nearest integer (so 0.0 -> 128 for 256).
    """
    dtype = code_dtype(quantization_channels)
    mu = quantization_channels - 1
    # The same formula, in place on one buffer: several times faster than the textbook
    # expression (which allocates a temporary per operation), because numpy vectorises float32
    # log (not log1p).
    # 1 + mu|x| >= 1, so log loses no precision that matters. float32 resolves 256 levels
    # exactly enough; 16-bit codes need float64.
    work = np.float32 if quantization_channels <= 256 else np.float64
    x = np.asarray(audio, dtype=work)
    a = np.abs(x)
    if gain != 1.0:  # here, not by the caller: |x| * gain is |x * gain|, without a temporary
        a *= work(gain)
    np.minimum(a, 1.0, out=a)
    a *= work(mu)
    a += work(1.0)
    np.log(a, out=a)
    a *= work(mu / 2.0 / np.log1p(mu))
    np.copysign(a, x, out=a)
    a += work(mu / 2.0 + 0.5)
    np.floor(a, out=a)
    return a.astype(dtype)


def mu_law_decode(codes: np.ndarray,
                  quantization_channels: int = DEFAULT_QUANTIZATION_CHANNELS) -> np.ndarray:
    """Inverse of :func:`mu_law_encode`: integer codes -> float32 audio in [-1, 1]."""
    mu = quantization_channels - 1
    companded = 2.0 * (np.asarray(codes, dtype=np.float32) / mu) - 1.0
    magnitude = (np.power(np.float32(1 + mu), np.abs(companded)) - 1.0) / mu
    return (np.sign(companded) * magnitude).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedAudio:
    """Mono float32 audio at `sample_rate`, plus what the source file declared."""

    samples: np.ndarray
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    peak: float  # max |sample| before normalisation

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def _downmix(block: np.ndarray) -> np.ndarray:
    """Average channels to mono. A matrix-vector product: one pass over the interleaved frames
    (BLAS), faster than adding strided columns and far faster than `mean(axis=1)`, which
    reduces along the strided axis."""
    channels = block.shape[1]
    if channels == 1:
        return block[:, 0]
    return block @ np.full(channels, 1.0 / channels, dtype=np.float32)


@dataclass(frozen=True)
class StreamInfo:
    """What a source file's header says, and the output length that implies."""

    source_rate: int
    source_channels: int
    declared_frames: int  # from the header; an estimate for MP3s without a Xing/LAME header
    sample_rate: int

    @property
    def expected_length(self) -> int:
        if not 0 < self.declared_frames < (1 << 40):
            return 0
        return -(-self.declared_frames * self.sample_rate // self.source_rate)


def iter_mono_blocks(
    file: BinaryIO | str, sample_rate: int, block_frames: int = DECODE_BLOCK_FRAMES
) -> Iterator[tuple[np.ndarray, StreamInfo]]:
    """Decode `file` block by block to mono float32 at `sample_rate`.

    Yields `(block, info)`. Memory is O(block), whatever the length of the song. Raises
    :class:`AudioError` for anything libsndfile cannot decode, or a file cut short.
    """
    import soundfile as sf
    import soxr

    if _size_of(file) == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        sound = sf.SoundFile(file)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"not a decodable audio file ({_libsndfile_reason(exc)})") from None
    with sound:
        _check_header_log(sound.extra_info)
        info = StreamInfo(sound.samplerate, sound.channels, sound.frames, sample_rate)
        resampler = None
        if info.source_rate != sample_rate:
            resampler = soxr.ResampleStream(info.source_rate, sample_rate, 1, dtype="float32")
        buffer = np.empty((block_frames, info.source_channels), dtype=np.float32)
        decoded_frames = 0
        while True:
            try:
                n = sound.read(out=buffer, dtype="float32", always_2d=True).shape[0]
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise AudioError(
                    f"decoding failed after {decoded_frames / info.source_rate:.1f} s "
                    f"({_libsndfile_reason(exc)})"
                ) from None
            last = n < block_frames
            mono = _downmix(buffer[:n])
            decoded_frames += n
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            elif info.source_channels == 1:
                mono = mono.copy()  # a view of `buffer`, which the next read overwrites
            if len(mono):
                yield mono, info
            if last:
                break
    _check_not_truncated(info.declared_frames, decoded_frames, info.source_rate)


def _check_not_truncated(declared: int, decoded: int, rate: int) -> None:
    # libsndfile takes the frame count from the header (WAV/FLAC sizes, the MP3 Xing/LAME
    # header). Decoding noticeably fewer frames than declared means the file was cut short.
    # A few MPEG frames of slack (encoder delay and padding) are normal.
    slack = max(4096, int(0.01 * declared))
    if 0 < declared < (1 << 40) and decoded + slack < declared:
        raise AudioError(
            f"truncated: decoded {decoded / rate:.2f} s of the {declared / rate:.2f} s "
            "its header declares"
        )


def _size_of(file: BinaryIO | str | bytes) -> int | None:
    if isinstance(file, (str, bytes)):
        return os.path.getsize(file)
    try:
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        return size
    except (AttributeError, OSError):
        return None


_WAV_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _check_header_log(log: str) -> None:
    # WAV and Ogg files cut short still open: libsndfile shrinks the frame count to what is
    # there and says so only in its log. Those notes are the evidence of truncation.
    short = _WAV_SHORT_DATA.search(log)
    if short and int(short.group(2)) < int(short.group(1)):
        raise AudioError(
            f"truncated: the data chunk holds {short.group(2)} of the {short.group(1)} bytes "
            "its header declares"
        )
    if "lacks an end-of-stream bit" in log:
        raise AudioError("truncated: the Ogg stream ends without its end-of-stream page")


def _libsndfile_reason(exc: Exception) -> str:
    text = str(exc)
    # soundfile prefixes the message with the (often synthetic) file name; keep the reason.
    if text.startswith("Error opening"):
        text = text.split(": ", 1)[-1]
    return text or f"libsndfile error {getattr(exc, 'code', '?')}"


# Longer songs are failures: a worker holds 4 bytes per output sample (690 MB for 3 hours at
# 16 kHz), and nothing in a music archive is longer than a DJ mix.
DEFAULT_MAX_SONG_MINUTES = 180.0


def decode_to_mono(file: BinaryIO | str, sample_rate: int,
                   max_seconds: float | None = None) -> DecodedAudio:
    """Decode a whole file to one mono float32 array at `sample_rate` (not yet normalised).

    The resampled track is kept whole (the peak is known only at the end; decoding twice would
    double the dominant cost) but never the decoded source, which at 44.1 kHz stereo is 5.5x
    larger. The buffer is sized from the header's frame count, so there is no concatenation
    copy: peak memory is ~4 bytes per output sample (230 MB for an hour at 16 kHz).

    `max_seconds` bounds that memory whatever the input (a 2 MB zip can hold hours of
    silence; a header can claim any length): a song declared or decoded longer is an
    AudioError, raised before the buffer grows past the bound.
    """
    limit = None if max_seconds is None else int(max_seconds * sample_rate)

    def span(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"

    def too_long(seconds: float, how: str) -> AudioError:
        return AudioError(f"too long: {how} {span(seconds)}, more than the "
                          f"{span(max_seconds)} allowed (--max-song-minutes)")

    samples = np.empty(0, dtype=np.float32)
    filled = 0
    peak = 0.0
    info = None
    for block, info in iter_mono_blocks(file, sample_rate):
        end = filled + len(block)
        if limit is not None and filled == 0 and info.expected_length > limit:
            raise too_long(info.expected_length / sample_rate, "its header declares")
        if limit is not None and end > limit:
            raise too_long(end / sample_rate, "decoded past")
        if end > len(samples):
            capacity = max(end, info.expected_length + 4096, int(len(samples) * 1.25))
            if limit is not None:
                capacity = min(capacity, limit + 4096)
            grown = np.empty(capacity, dtype=np.float32)
            grown[:filled] = samples[:filled]
            samples = grown
        samples[filled:end] = block
        filled = end
        peak = max(peak, float(block.max()), -float(block.min()))  # no |x| temporary
    if info is None or filled == 0:
        raise AudioError("empty: no audio frames")
    return DecodedAudio(samples[:filled], sample_rate, info.source_rate, info.source_channels, peak)


def normalisation_gain(decoded: DecodedAudio) -> np.float32:
    """The factor that brings the track's peak to 1.0. Raises AudioError for silence."""
    if not np.isfinite(decoded.peak):
        raise AudioError("invalid samples (NaN or infinity) in the decoded audio")
    if decoded.peak < SILENCE_PEAK:
        raise AudioError("all-silent: peak amplitude is zero")
    return np.float32(1.0 / decoded.peak)


def encode_in_place(
    decoded: DecodedAudio, gain: np.float32,
    quantization_channels: int = DEFAULT_QUANTIZATION_CHANNELS,
    chunk: int = 1 << 20,
) -> np.ndarray:
    """Normalise by `gain` and mu-law encode the whole track, reusing the float buffer.

    Returns the codes as an array that shares memory with `decoded.samples` (which is consumed:
    do not read it afterwards). Chunk i is encoded into a small temporary and copied to byte
    offset i*chunk*itemsize of the buffer, which only overlaps floats of chunks already encoded;
    so a whole track is encoded with no second track-sized allocation (an hour at 16 kHz is
    230 MB of floats: a separate 58 MB code array would push a worker past 400 MB).
    """
    samples = decoded.samples
    dtype = code_dtype(quantization_channels)
    codes = samples.view(np.uint8)[: len(samples) * dtype.itemsize].view(dtype)
    for start in range(0, len(samples), chunk):
        block = mu_law_encode(samples[start : start + chunk], quantization_channels, gain)
        codes[start : start + len(block)] = block
    return codes


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_wav(path, audio: np.ndarray, sample_rate: int) -> None:
    """Write float audio in [-1, 1] as 16-bit PCM WAV."""
    import soundfile as sf

    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
