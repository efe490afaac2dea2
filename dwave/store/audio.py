"""Audio numerics: mu-law companding, streaming decode to mono at a target rate, WAV output.

Pure functions over numpy arrays (plus libsndfile/soxr for decoding); nothing here knows about
Dask, Zarr or TensorFlow, so every piece is testable on its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from .decoders import AudioError, Decoder, StreamInfo, choose_decoder

__all__ = ["AudioError", "StreamInfo"]  # re-exported: the rest of dwave imports them from here

#: Frames decoded per block. 2^18 stereo float32 frames = 2 MiB: a 30-s clip is read in 6
#: calls (libsndfile's MP3 decoder costs a little per call), and the buffer stays small next
#: to the decoded song a worker holds.
DECODE_BLOCK_FRAMES = 1 << 18

#: A signal whose peak is below this (about -120 dBFS) is treated as silence.
SILENCE_PEAK = 1e-6


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
    length_source: str = "header"  # how the length was established: decoders.LENGTH_SOURCES
    decoder: str = ""  # which decoder, and its version

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def iter_mono_blocks(
    file: BinaryIO | str, sample_rate: int, block_frames: int = DECODE_BLOCK_FRAMES,
    decoder: Decoder | None = None,
) -> Iterator[tuple[np.ndarray, StreamInfo]]:
    """Decode `file` block by block to mono float32 at `sample_rate`, to the song's real end.

    Yields `(block, info)`. Memory is O(block), whatever the length of the song. The decoder
    is chosen from the file's first bytes (dwave.store.decoders). Raises :class:`AudioError`
    for anything that cannot be decoded, or a file cut short.
    """
    import soxr

    if _size_of(file) == 0:
        raise AudioError("empty file (0 bytes)")
    decoder = decoder or choose_decoder(file)
    resampler = None
    for mono, source_info in decoder.blocks(file, block_frames):
        info = dataclasses.replace(source_info, sample_rate=sample_rate)
        if resampler is None and info.source_rate != sample_rate:
            resampler = soxr.ResampleStream(info.source_rate, sample_rate, 1, dtype="float32")
        if resampler is not None:
            mono = resampler.resample_chunk(mono)
        else:
            mono = mono.copy()  # may be a view of the decoder's buffer, reused for the next
        if len(mono):
            yield mono, info
    if resampler is not None:  # the filter's tail: the last input samples' outputs
        tail = resampler.resample_chunk(np.empty(0, dtype=np.float32), last=True)
        if len(tail):
            yield tail, info


def _size_of(file: BinaryIO | str | bytes) -> int | None:
    if isinstance(file, (str, bytes)):
        return os.path.getsize(file)
    try:
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        return size
    except (AttributeError, OSError):
        return None


# Longer songs are failures: a worker holds 4 bytes per output sample (690 MB for 3 hours at
# 16 kHz), and nothing in a music archive is longer than a DJ mix.
DEFAULT_MAX_SONG_MINUTES = 180.0


class TooLong(AudioError):
    """A song past --max-song-minutes."""


def decode_to_mono(file: BinaryIO | str, sample_rate: int,
                   max_seconds: float | None = None) -> DecodedAudio:
    """Decode a whole file to one mono float32 array at `sample_rate` (not yet normalised),
    with the decoder its first bytes call for; where that decoder gives up on the song (an MP3
    mpg123 cannot decode cleanly), again with its fallback (FFmpeg), from the start."""
    if _size_of(file) == 0:
        raise AudioError("empty file (0 bytes)")
    decoder = choose_decoder(file)
    while True:
        try:
            return _decode_whole(file, sample_rate, max_seconds, decoder)
        except TooLong:
            raise
        except AudioError:
            if decoder.fallback is None:
                raise
            decoder = decoder.fallback
            if not isinstance(file, (str, bytes)):
                file.seek(0)


def _decode_whole(file: BinaryIO | str, sample_rate: int, max_seconds: float | None,
                  decoder: Decoder) -> DecodedAudio:
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
        return TooLong(f"too long: {how} {span(seconds)}, more than the "
                          f"{span(max_seconds)} allowed (--max-song-minutes)")

    samples = np.empty(0, dtype=np.float32)
    filled = 0
    peak = 0.0
    info = None
    for block, info in iter_mono_blocks(file, sample_rate, decoder=decoder):
        end = filled + len(block)
        if limit is not None and filled == 0 and info.expected_length > limit:
            raise too_long(info.expected_length / sample_rate, "its header declares")
        if limit is not None and end > limit:
            raise too_long(end / sample_rate, "decoded past")
        if end > len(samples):
            capacity = max(end, info.estimated_length + 4096, int(len(samples) * 1.25))
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
    return DecodedAudio(samples[:filled], sample_rate, info.source_rate, info.source_channels, peak,
                        info.length_source, info.decoder)


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
