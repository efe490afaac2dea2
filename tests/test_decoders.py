"""Every song decoded to its real end, checked against ffmpeg (a decoder dwave does not drive).

The test songs are VBR MP3s made by ffmpeg's LAME encoder with and without the Xing header: a
noisy opening then quiet passages, so the first frame's bitrate (all an MP3 without a Xing
header offers as a length) says nothing about the rest. libsndfile stopped at that guess.
"""

import io
import subprocess

import numpy as np
import pytest
import soundfile as sf

from dwave.store.audio import AudioError, decode_to_mono
from dwave.store.decoders import (LENGTH_SOURCES, LibsndfileDecoder, MpegDecoder,
                                  MpegFrameHeader, choose_decoder)

from conftest import write_tone


def vbr_song(path, seconds: float, xing: bool, seed: int = 0, rate: int = 44100) -> str:
    """A VBR MP3: loud noise for the first seconds (high bitrate), a quiet tone after it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.02 * np.sin(2 * np.pi * 220 * t)
    loud = int(min(8.0, seconds / 3) * rate)
    x[:loud] += 0.8 * rng.standard_normal(loud).clip(-1.2, 1.2)
    pcm = (np.stack([x, 0.9 * x], 1).clip(-1, 1) * 32767).astype("<i2").tobytes()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "s16le", "-ar", str(rate), "-ac", "2",
                    "-i", "-", "-c:a", "libmp3lame", "-q:a", "2",
                    *([] if xing else ["-write_xing", "0"]), str(path)], input=pcm, check=True)
    return str(path)


def ffmpeg_decode(path, channels: int | None = None, rate: int | None = None) -> np.ndarray:
    """The ffmpeg command's decode: float32 samples, interleaved when `channels` > 1."""
    args = ["ffmpeg", "-v", "error", "-i", str(path)]
    if channels:
        args += ["-ac", str(channels)]
    if rate:
        args += ["-ar", str(rate)]
    out = subprocess.run(args + ["-f", "f32le", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype="<f4")


def check_against_ffmpeg(path, xing: bool):
    decoded = decode_to_mono(path, 16000)
    reference = len(ffmpeg_decode(path, channels=1, rate=16000)) / 16000
    assert abs(decoded.duration - reference) <= 0.050, (decoded.duration, reference)
    assert decoded.length_source == ("header" if xing else "decoded")
    # an MP3 whose Xing header covers the whole file goes to mpg123 (libsndfile), others to
    # FFmpeg, which decodes every frame to the end
    assert decoded.decoder.startswith("libsndfile" if xing else "ffmpeg (libavcodec")
    return decoded


@pytest.mark.parametrize("seconds", [10.0, 14.4, 37.0])
def test_vbr_without_xing_is_decoded_to_its_end(tmp_path, seconds):
    path = vbr_song(tmp_path / "song.mp3", seconds, xing=False)
    # the case is real: the length a header-trusting decoder takes from the first frame is short
    assert sf.info(path).duration < 0.8 * seconds
    check_against_ffmpeg(path, xing=False)
    check_against_ffmpeg(vbr_song(tmp_path / "xing.mp3", seconds, xing=True), xing=True)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [95.0, 240.0, 600.0])
def test_long_vbr_songs_to_their_end(tmp_path, seconds):
    for xing in (False, True):
        check_against_ffmpeg(vbr_song(tmp_path / f"{xing}.mp3", seconds, xing, seed=3), xing)


def test_samples_equal_ffmpeg_decode(tmp_path):
    path = vbr_song(tmp_path / "song.mp3", 6.0, xing=False)
    ours = decode_to_mono(path, 44100).samples  # the song's own rate: no resampling
    stereo = ffmpeg_decode(path).reshape(-1, 2)
    np.testing.assert_allclose(ours, stereo.mean(axis=1), atol=1e-6)


def test_a_file_object_decodes_as_the_path_does(tmp_path):
    path = vbr_song(tmp_path / "song.mp3", 5.0, xing=False)
    with open(path, "rb") as f:
        from_memory = decode_to_mono(io.BytesIO(f.read()), 16000).samples
    np.testing.assert_array_equal(from_memory, decode_to_mono(path, 16000).samples)


@pytest.mark.parametrize("xing", [False, True])
def test_a_file_cut_mid_frame_is_truncated(tmp_path, xing):
    path = vbr_song(tmp_path / "song.mp3", 20.0, xing=xing)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2 + 7])
    with pytest.raises(AudioError, match="truncated"):
        decode_to_mono(str(cut), 16000)


def test_a_known_empty_clip_says_what_it_is(tmp_path):
    # FMA's known-empty clips: an ID3 tag and nothing after it
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 40]) + b"TIT2" + bytes([0, 0, 0, 6, 0, 0, 3]) \
        + b"clip\x00" + bytes(25)
    path = tmp_path / "099134.mp3"
    path.write_bytes(tag)
    with pytest.raises(AudioError, match="an ID3 tag and no MPEG audio frames"):
        decode_to_mono(str(path), 16000)


def test_the_decoder_is_chosen_by_content_not_name(tmp_path):
    mp3 = vbr_song(tmp_path / "song.mp3", 3.0, xing=True)
    disguised = tmp_path / "song.wav"
    disguised.write_bytes(open(mp3, "rb").read())
    assert isinstance(choose_decoder(str(disguised)), LibsndfileDecoder)  # its Xing covers it
    no_xing = tmp_path / "v.wav"
    no_xing.write_bytes(open(vbr_song(tmp_path / "v.mp3", 3.0, xing=False), "rb").read())
    assert isinstance(choose_decoder(str(no_xing)), MpegDecoder)
    assert isinstance(choose_decoder(write_tone(tmp_path / "t.flac")), LibsndfileDecoder)
    assert decode_to_mono(str(disguised), 16000).length_source == "header"
    assert decode_to_mono(write_tone(tmp_path / "t.wav"), 16000).length_source == "header"
    assert set(LENGTH_SOURCES) == {"header", "decoded"}


def test_a_xing_header_that_does_not_cover_the_file_is_not_trusted(tmp_path):
    # Two songs joined (`cat a.mp3 b.mp3`, an edited file): the first one's Xing header counts
    # only its own frames. Decoding stops at no header's count: ffmpeg's length, to the end.
    first = vbr_song(tmp_path / "a.mp3", 8.0, xing=True, seed=1)
    second = vbr_song(tmp_path / "b.mp3", 12.0, xing=True, seed=2)
    joined = tmp_path / "joined.mp3"
    joined.write_bytes(open(first, "rb").read() + open(second, "rb").read())
    assert isinstance(choose_decoder(str(joined)), MpegDecoder)
    decoded = decode_to_mono(str(joined), 16000)
    reference = len(ffmpeg_decode(joined, channels=1, rate=16000)) / 16000
    assert decoded.duration > 19.0 and abs(decoded.duration - reference) <= 0.050


@pytest.mark.parametrize("xing", [True, False])
def test_damaged_frames_are_concealed_quietly_and_the_song_decoded_to_its_end(tmp_path, capfd,
                                                                              xing):
    # mpg123 (libsndfile) stops at such damage and prints notes on stderr (thousands of lines
    # through the progress bar on FMA); FFmpeg conceals the frames and goes on.
    path = vbr_song(tmp_path / "song.mp3", 20.0, xing=xing)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3:len(data) // 3 + 400] = b"\x55" * 400
    garbled = tmp_path / "garbled.mp3"
    garbled.write_bytes(bytes(data))
    capfd.readouterr()
    decoded = decode_to_mono(str(garbled), 16000)
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""
    reference = len(ffmpeg_decode(garbled, channels=1, rate=16000)) / 16000
    assert abs(decoded.duration - reference) <= 0.050 and decoded.duration > 19.5
    assert decoded.decoder.startswith("ffmpeg")


def test_a_trailing_id3v1_tag_is_not_a_frame_more(tmp_path):
    song = open(vbr_song(tmp_path / "a.mp3", 5.0, xing=True), "rb").read()
    tagged = tmp_path / "tagged.mp3"
    tagged.write_bytes(song + b"TAG" + b"Title".ljust(30, b"\0") + bytes(95))
    assert isinstance(choose_decoder(str(tagged)), LibsndfileDecoder)  # the Xing count holds
    reference = len(ffmpeg_decode(tagged, channels=1, rate=16000)) / 16000
    assert abs(decode_to_mono(str(tagged), 16000).duration - reference) <= 0.050


def test_frame_lengths_follow_the_standard():
    # MPEG-1 layer III, 128 kbit/s, 44.1 kHz, no padding: 144 * 128000 / 44100 = 417 bytes
    assert MpegFrameHeader.parse(bytes([0xFF, 0xFB, 0x90, 0x64])).length == 417
    # ... with the padding bit: 418; MPEG-2 layer III 64 kbit/s 22.05 kHz: 72 * 64000 / 22050
    assert MpegFrameHeader.parse(bytes([0xFF, 0xFB, 0x92, 0x64])).length == 418
    assert MpegFrameHeader.parse(bytes([0xFF, 0xF3, 0x80, 0xC4])).length == 208
    assert MpegFrameHeader.parse(b"RIFF") is None


@pytest.mark.slow
def test_verify_against_source_finds_and_repairs_songs_an_older_dwave_cut_short(tmp_path):
    """A store written as dwave did before these decoders (libsndfile's length for an MP3
    without a Xing header) is found out, set aside and written again in full."""
    from dwave.store.sources import expand_sources
    from dwave.store.track_store import TrackStore

    from conftest import run_dwave

    songs = tmp_path / "songs"
    songs.mkdir()
    vbr_song(songs / "000002.mp3", 30.0, xing=False, seed=1)  # libsndfile: ~9 s of it
    vbr_song(songs / "000005.mp3", 12.0, xing=True, seed=2)   # right then and now
    store_url = str(tmp_path / "store")
    store = TrackStore(store_url)
    store.prepare(16000, 256, overwrite=True)
    rows, codes = [], []
    for source in expand_sources([str(songs)]).sources:
        old_length = round(sf.info(source.uri).frames / 44100 * 16000)  # where libsndfile stopped
        rows.append({"id": source.track_id, "sample_rate": 16000, "duration": old_length / 16000,
                     "source": source.uri, "fingerprint": source.fingerprint, "genre": None})
        codes.append(np.full(old_length, 128, np.uint8))
    store.write_part("p000000", rows, codes)
    store.write_index([])

    found = run_dwave("store", "verify", store_url, "--against-source", "--workers", "1",
                      "--no-progress", check=1)
    assert "1 stored at a length more than 50 ms from their source's" in found.stderr
    short = [line for line in found.stderr.splitlines() if line.strip().startswith("track 2 ")]
    assert len(short) == 1 and "the source decodes to 30.0" in short[0], found.stderr
    assert "track 5 " not in found.stderr

    run_dwave("store", "verify", store_url, "--against-source", "--repair", "--workers", "1",
              "--no-progress", check=0)
    run_dwave("preprocess", songs, "--out", store_url, "--workers", "1", "--no-progress",
              check=0)
    run_dwave("store", "verify", store_url, "--against-source", "--workers", "1",
              "--no-progress", check=0)
    tracks = {row["id"]: row for row in TrackStore(store_url).read_index().tracks.rows()}
    reference = len(ffmpeg_decode(songs / "000002.mp3", channels=1, rate=16000))
    assert abs(tracks["2"]["length"] - reference) <= 0.05 * 16000
    assert tracks["2"]["length_source"] == "decoded" and tracks["5"]["length_source"] == "header"
