"""Decoders: a song's bytes -> float32 mono at its own rate, to the song's real end.

Two decoders behind one interface (:class:`Decoder`), chosen by the file's first bytes:

- ``mpeg`` (FFmpeg's decoder, through PyAV, whose wheels carry FFmpeg's libraries) for an MP3
  whose length nothing exact states. An MPEG stream has no length field: a Xing/Info or VBRI
  header gives the frame count when the encoder wrote one; otherwise any length "in the header"
  is a guess from the first frame's bitrate, and libsndfile stops at that guess (VBR songs
  without a Xing header lost half their length or more). FFmpeg decodes every frame to the end
  of the file and matches the ``ffmpeg`` command to the sample.
- ``libsndfile`` (soundfile's wheels) for WAV, FLAC, Ogg/Vorbis, Opus, AIFF, ...: formats whose
  headers state their length exactly, which libsndfile checks (and logs when short); and for
  an MP3 whose Xing header counts its frames and whose byte count reaches the end of the file
  (what LAME and FFmpeg write, FMA's clips among them): mpg123 then decodes exactly that count,
  to the sample as FFmpeg does, in about 0.8x its time.

Each decoder says how the length it decoded was established (:data:`LENGTH_SOURCES`): the store
records it per track, so a user can tell a length checked against the file's own count from one
that is simply where the decode ended.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Protocol

import numpy as np


class AudioError(Exception):
    """A file that cannot become a track; the message is the reason shown to the user."""


#: How a decoded length was established: the values of the track table's `length_source`.
LENGTH_SOURCES = {
    "header": "decoded to the end and checked against the frame count the file declares (a "
              "WAV/FLAC/Ogg header, an MP3's Xing/Info or VBRI header)",
    "decoded": "the file declares no length (an MP3 without a Xing header): decoded frame by "
               "frame to its end, the last frame checked complete",
}


@dataclass(frozen=True)
class StreamInfo:
    """What a source file says of itself, and the output length that implies."""

    source_rate: int
    source_channels: int
    declared_frames: int  # the exact frame count the file declares; 0 where it declares none
    sample_rate: int  # the rate the caller resamples to
    estimated_frames: int = 0  # a guess (a buffer's first size), never a check
    length_source: str = "header"
    decoder: str = ""

    @property
    def expected_length(self) -> int:
        """Output samples the declared length implies; 0 where the file declares none."""
        if not 0 < self.declared_frames < (1 << 40):
            return 0
        return -(-self.declared_frames * self.sample_rate // self.source_rate)

    @property
    def estimated_length(self) -> int:
        frames = self.declared_frames or self.estimated_frames
        if not 0 < frames < (1 << 40):
            return 0
        return -(-frames * self.sample_rate // self.source_rate)


class Decoder(Protocol):
    """Opens a song and yields `(mono, info)`: float32 blocks, the mean of the song's channels
    at its own rate, the last one ending where the song does (a block may be a view of the
    decoder's buffer, valid until the next one). Raises AudioError for a file that
    is not audio, is damaged, or is cut short."""

    name: str
    fallback: "Decoder | None"  # decodes the song again where this one gives up on it

    def blocks(self, file: BinaryIO | str | bytes,
               block_frames: int) -> Iterator[tuple[np.ndarray, StreamInfo]]: ...


def check_not_truncated(declared: int, decoded: int, rate: int) -> None:
    """A decode that ended noticeably short of the declared count: the file was cut. A few MPEG
    frames of slack (encoder delay and padding) are normal."""
    slack = max(4096, int(0.01 * declared))
    if 0 < declared < (1 << 40) and decoded + slack < declared:
        raise AudioError(
            f"truncated: decoded {decoded / rate:.2f} s of the {declared / rate:.2f} s "
            "its header declares"
        )


def downmix(block: np.ndarray) -> np.ndarray:
    """Average interleaved (frames, channels) to mono. A matrix-vector product: one pass over
    the interleaved frames (BLAS), faster than adding strided columns and far faster than
    `mean(axis=1)`, which reduces along the strided axis."""
    channels = block.shape[1]
    if channels == 1:
        return block[:, 0]
    return block @ np.full(channels, 1.0 / channels, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# libsndfile
# --------------------------------------------------------------------------------------------

_WAV_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class LibsndfileDecoder:
    """libsndfile, for the formats it reads exactly; for an MP3 (`fallback` set: the MPEG
    decoder) only while mpg123 decodes it cleanly. mpg123 stops at a damaged frame, or conceals
    it and prints notes on the process's stderr; either way the song is handed to `fallback`
    (FFmpeg conceals damage and decodes to the end, silently) by decode_to_mono."""

    name = "libsndfile"

    def __init__(self, fallback: "Decoder | None" = None):
        self.fallback = fallback

    def blocks(self, file, block_frames):
        import soundfile as sf

        with contextlib.ExitStack() as stack:
            # mpg123's notes are caught (one file for the whole decode), other formats' not
            caught = stack.enter_context(tempfile.TemporaryFile()) if self.fallback else None
            yield from self._blocks(sf, file, block_frames, caught)

    def _blocks(self, sf, file, block_frames, caught):
        try:
            with _stderr_into(caught):
                sound = sf.SoundFile(file)
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            raise AudioError(f"not a decodable audio file ({_libsndfile_reason(exc)})") from None
        with sound:
            _check_header_log(sound.extra_info)
            via = " (mpg123)" if self.fallback else ""
            info = StreamInfo(sound.samplerate, sound.channels, sound.frames, 0,
                              length_source="header",
                              decoder=f"libsndfile {_sndfile_version()}{via}")
            buffer = np.empty((block_frames, info.source_channels), dtype=np.float32)
            decoded = 0
            while True:
                try:
                    with _stderr_into(caught):
                        n = sound.read(out=buffer, dtype="float32", always_2d=True).shape[0]
                except (sf.LibsndfileError, RuntimeError) as exc:
                    raise AudioError(
                        f"decoding failed after {decoded / info.source_rate:.1f} s "
                        f"({_libsndfile_reason(exc)})"
                    ) from None
                decoded += n
                if n:
                    yield downmix(buffer[:n]), info
                if n < block_frames:
                    break
        check_not_truncated(info.declared_frames, decoded, info.source_rate)


class DecoderComplained(AudioError):
    """mpg123 printed a note (a damaged frame, a lost sync) while decoding."""


@contextlib.contextmanager
def _stderr_into(caught):
    """File descriptor 2 into `caught` (an open file; None: left alone) for a call into mpg123,
    which has no quiet switch through libsndfile: printed, its notes ran through the progress
    bar thousands of times on FMA. Anything caught is DecoderComplained; a worker decodes on
    one thread, so what is caught is mpg123's."""
    if caught is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(caught.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if caught.tell():
        caught.seek(0)
        notes = caught.read().decode("utf-8", "replace").strip()
        raise DecoderComplained(f"mpg123: {notes.splitlines()[0][:160] if notes else notes}")


def _sndfile_version() -> str:
    import soundfile as sf

    return sf.__libsndfile_version__


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


# --------------------------------------------------------------------------------------------
# MPEG audio (FFmpeg through PyAV)
# --------------------------------------------------------------------------------------------

# kbit/s by (MPEG-1?, layer); MPEG-2 and 2.5 share a table. Index 0 is "free format".
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_BITRATES[(False, 3)] = _BITRATES[(False, 2)]
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


@dataclass(frozen=True)
class MpegFrameHeader:
    """The four bytes that start every MPEG audio frame (ISO/IEC 11172-3, 2.4.1.3)."""

    version: int  # 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5
    layer: int
    bitrate: int  # kbit/s; 0 for free format
    sample_rate: int
    padding: int
    mono: bool

    @classmethod
    def parse(cls, head: bytes) -> "MpegFrameHeader | None":
        if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
            return None
        version, layer = (head[1] >> 3) & 3, 4 - ((head[1] >> 1) & 3)
        bitrate_index, rate_index = head[2] >> 4, (head[2] >> 2) & 3
        if version == 1 or layer == 4 or bitrate_index == 15 or rate_index == 3:
            return None
        return cls(version, layer, _BITRATES[(version == 3, layer)][bitrate_index],
                   _RATES[version][rate_index], (head[2] >> 1) & 1, head[3] >> 6 == 3)

    @property
    def length(self) -> int:
        """Bytes in the frame, header included; 0 for free format (no length to check)."""
        if not self.bitrate:
            return 0
        if self.layer == 1:
            return (12 * self.bitrate * 1000 // self.sample_rate + self.padding) * 4
        per_frame = 72 if self.layer == 3 and self.version != 3 else 144
        return per_frame * self.bitrate * 1000 // self.sample_rate + self.padding

    def length_tag(self, frame: bytes) -> "LengthTag | None":
        """The Xing/Info or VBRI header this first frame holds, if it is one: the stream's frame
        count, and the bytes it covers where the encoder wrote them."""
        if self.layer != 3:
            return None
        side_info = (17 if self.mono else 32) if self.version == 3 else (9 if self.mono else 17)
        at = 4 + side_info
        if frame[at:at + 4] in (b"Xing", b"Info") and len(frame) >= at + 16:
            (flags,) = struct.unpack_from(">I", frame, at + 4)
            fields, at = [], at + 8
            for bit in (1, 2):  # frames, bytes
                fields.append(struct.unpack_from(">I", frame, at)[0] if flags & bit else None)
                at += 4 if flags & bit else 0
            return LengthTag(*fields)
        if frame[36:40] == b"VBRI" and len(frame) >= 54:  # Fraunhofer: bytes, then frames
            stream_bytes, frames = struct.unpack_from(">II", frame, 46)
            return LengthTag(frames, stream_bytes)
        return None


@dataclass(frozen=True)
class LengthTag:
    """An MP3's Xing/Info or VBRI header."""

    frames: int | None
    stream_bytes: int | None  # from the first frame's start to the last frame's end

    def covers(self, stream_bytes: int) -> bool:
        """Whether the tag describes all of a stream of this many bytes: nothing was appended
        after it was written, and nothing cut off."""
        return bool(self.frames) and self.stream_bytes == stream_bytes


def id3v2_size(head: bytes) -> int:
    """Bytes of the ID3v2 tag at the start of `head` (0 where there is none)."""
    if len(head) < 10 or head[:3] != b"ID3":
        return 0
    size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9] & 0x7F
    return 10 + size + (10 if head[5] & 0x10 else 0)


def first_mpeg_frame(data: bytes) -> tuple[int, MpegFrameHeader] | None:
    """Offset and header of the first frame in `data` whose successor also starts where its
    length says (a lone 0xFFE sync pattern in a tag or in noise is not a frame)."""
    at = data.find(b"\xff")
    while 0 <= at < len(data) - 4:
        header = MpegFrameHeader.parse(data[at:at + 4])
        if header is not None:
            following = at + header.length
            if not header.length or following + 4 > len(data) or \
                    MpegFrameHeader.parse(data[following:following + 4]) is not None:
                return at, header
        at = data.find(b"\xff", at + 1)
    return None


class MpegDecoder:
    """MP3 (and MP2) through FFmpeg, every frame to the end of the file."""

    name = "mpeg"
    #: Undecodable frames tolerated (FFmpeg, like mpg123, conceals a damaged frame and goes
    #: on); more than this share of the song is a damaged file, not a glitch.
    MAX_BAD_FRAME_SHARE = 0.01

    fallback = None

    def __init__(self, counted: bool):
        self.counted = counted  # the first frame is a Xing/VBRI header with a frame count

    def blocks(self, file, block_frames):
        import av

        with contextlib.ExitStack() as stack:
            if isinstance(file, bytes):  # a path that is not UTF-8: FFmpeg takes str paths
                file = stack.enter_context(open(file, "rb"))
            try:
                container = stack.enter_context(av.open(file, format="mp3"))
            except av.error.FFmpegError as exc:
                raise AudioError(
                    f"not a decodable MPEG audio file ({_ffmpeg_reason(exc)})") from None
            yield from self._decode(container, self.counted, block_frames)

    def _decode(self, container, has_length_tag: bool, block_frames: int):
        import av

        # The demuxer's duration is the Xing/VBRI count where there is one (FFmpeg has already
        # taken the encoder's delay and padding off it); otherwise a guess from the bitrate.
        if not container.streams.audio:
            raise AudioError("no MPEG audio frames")
        stream = container.streams.audio[0]
        rate, channels = stream.rate, stream.channels
        seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
        info = StreamInfo(
            rate, channels, round(seconds * rate) if has_length_tag else 0, 0,
            estimated_frames=round(seconds * rate), decoder=f"ffmpeg {_ffmpeg_version()}",
            length_source="header" if has_length_tag else "decoded")
        # Frames (1,152 samples each) are gathered in FFmpeg's own FIFO and taken out in
        # blocks: one numpy operation per block, not per frame, which would cost more
        # than the decoding.
        fifo = av.AudioFifo()
        decoded = bad = packets = 0
        last_packet = None
        for packet in container.demux(stream):
            if not packet.size:
                continue
            packets += 1
            last_packet = packet
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad += 1
                continue
            for frame in frames:
                frame.pts = None  # a gap in the timestamps is not ours to refuse
                try:
                    fifo.write(frame)
                except ValueError:
                    raise AudioError(
                        f"the stream changes its sample rate or channels after "
                        f"{decoded / rate:.1f} s: not one song") from None
                decoded += frame.samples
                if fifo.samples >= block_frames:
                    yield _mono_of(fifo.read(block_frames)), info
        if packets == 0:
            raise AudioError("no MPEG audio frames")
        if bad > max(2, self.MAX_BAD_FRAME_SHARE * packets):
            raise AudioError(f"damaged: {bad} of {packets} MPEG frames cannot be decoded")
        if fifo.samples:
            yield _mono_of(fifo.read()), info
        _check_last_frame(bytes(last_packet), decoded, rate)
        check_not_truncated(info.declared_frames, decoded, rate)


def _mono_of(frame) -> np.ndarray:
    """An FFmpeg audio frame as mono float32: the mean of its channels, read from its planes
    (FFmpeg's MP3 decoder gives planar float: one buffer per channel, nothing to deinterleave)."""
    n, channels = frame.samples, len(frame.layout.channels)
    if frame.format.name == "fltp":
        planes = [np.frombuffer(plane, np.float32, count=n) for plane in frame.planes[:channels]]
        if channels == 1:
            return planes[0]
        mono = planes[0] + planes[1]
        for plane in planes[2:]:
            mono += plane
        mono *= np.float32(1.0 / channels)
        return mono
    array = frame.to_ndarray().reshape(channels, n) if frame.format.is_planar else \
        frame.to_ndarray().reshape(n, channels).T
    if array.dtype.kind in "iu":
        array = array / np.float32(np.iinfo(array.dtype).max + 1)
    return array.astype(np.float32).mean(axis=0, dtype=np.float32)


def _check_last_frame(packet: bytes, decoded: int, rate: int) -> None:
    # A stream with no length tag can only show it was cut by its last frame: shorter than its
    # own header says. (A file cut exactly between two frames cannot be told from a whole one.)
    header = MpegFrameHeader.parse(packet[:4])
    if header is not None and header.length and len(packet) < header.length:
        raise AudioError(
            f"truncated: the last MPEG frame holds {len(packet)} of its {header.length} bytes "
            f"(the file ends mid-frame, after {decoded / rate:.2f} s)")


def _ffmpeg_version() -> str:
    import av

    major, minor, _ = av.library_versions["libavcodec"]
    return f"(libavcodec {major}.{minor}, PyAV {av.__version__})"


def _ffmpeg_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


# --------------------------------------------------------------------------------------------
# Choosing one
# --------------------------------------------------------------------------------------------

#: The magic numbers of the containers libsndfile reads; anything else that starts with an ID3
#: tag or an MPEG frame goes to the MPEG decoder.
_LIBSNDFILE_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"riff", b"fLaC", b"OggS", b"FORM", b".snd",
                     b"caff", b"BW64", b"wvpk")
SNIFF_BYTES = 1 << 16

def choose_decoder(file: BinaryIO | str | bytes) -> Decoder:
    """The decoder for this file, from its first bytes (never its name: a `.wav` that holds an
    MP3 is decoded as the MP3 it is)."""
    head = _read_head(file, SNIFF_BYTES)
    if head[:4] in _LIBSNDFILE_MAGIC:
        return LibsndfileDecoder()
    tag = id3v2_size(head)
    if tag:
        if tag > len(head) - 4:  # cover art in the tag: read past it
            head = _read_head(file, tag + SNIFF_BYTES)
        at_end = len(head) < tag + SNIFF_BYTES  # the whole file is in `head`
        if at_end and first_mpeg_frame(head[tag:]) is None:
            raise AudioError(f"no audio: an ID3 tag and no MPEG audio frames after it "
                             f"({len(head)} bytes in all)")
    found = first_mpeg_frame(head[tag:tag + SNIFF_BYTES])
    if not tag and (found is None or found[0] != 0):
        return LibsndfileDecoder()
    length_tag = None
    if found is not None:
        start = tag + found[0]
        length_tag = found[1].length_tag(head[start:])
        stream_bytes = _file_size(file) - start
        # ... less a trailing ID3v1 tag (128 bytes) where there is one: accepted without reading
        # the tail (a request more on S3); bytes there that are not a tag make mpg123 complain,
        # and the song goes to FFmpeg after all
        if length_tag is not None and (length_tag.covers(stream_bytes)
                                       or length_tag.covers(stream_bytes - 128)):
            # The Xing count is exact and its byte count reaches the end of the file: mpg123
            # (in libsndfile) decodes to that count, to the sample as FFmpeg does, faster.
            return LibsndfileDecoder(fallback=MpegDecoder(counted=True))
    return MpegDecoder(counted=bool(length_tag and length_tag.frames))


def _file_size(file: BinaryIO | str | bytes) -> int:
    if isinstance(file, (str, bytes)):
        return os.path.getsize(file)
    at = file.tell()
    try:
        return file.seek(0, os.SEEK_END)
    finally:
        file.seek(at)


def _read_head(file: BinaryIO | str | bytes, size: int) -> bytes:
    if isinstance(file, (str, bytes)):
        with open(file, "rb") as f:
            return f.read(size)
    start = file.tell()
    try:
        return file.read(size)
    finally:
        file.seek(start)
