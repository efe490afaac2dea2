"""Audio numerics: mu-law against independent computations, decoding of every format, bad files."""

import math

import numpy as np
import pytest
import soundfile as sf

from dwave.store.audio import (
    AudioError, decode_to_mono, encode_in_place, iter_mono_blocks, mu_law_decode,
    mu_law_encode, normalisation_gain,
)

from conftest import tone, write_audio, write_tone


def reference_encode(x: float, channels: int = 256) -> int:
    """The WaveNet paper's formula, one float64 sample at a time: the independent computation."""
    mu = channels - 1
    f = math.copysign(math.log1p(mu * abs(x)) / math.log1p(mu), x)
    return int(math.floor((f + 1) / 2 * mu + 0.5))


def test_mu_law_known_values():
    assert mu_law_encode(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    assert mu_law_encode(np.array([2.0, -3.0])).tolist() == [255, 0]  # clipped
    decoded = mu_law_decode(np.array([0, 255, 128]))
    np.testing.assert_allclose(decoded[:2], [-1.0, 1.0], atol=1e-6)
    # code 128 is the smallest positive level, (256^(1/255) - 1) / 255 by the inverse formula
    assert decoded[2] == pytest.approx((256 ** (1 / 255) - 1) / 255, rel=1e-4)
    assert mu_law_encode(np.zeros(3)).dtype == np.uint8


def test_mu_law_gain_is_the_same_as_scaling_the_audio_first():
    x = np.random.default_rng(1).uniform(-1.3, 1.3, 20000).astype(np.float32)
    gain = np.float32(1 / 0.77)
    assert np.array_equal(mu_law_encode(x, 256, gain), mu_law_encode(x * gain, 256))
    # 16-bit codes are computed in float64, the gain included
    wide = x.astype(np.float64) * np.float64(gain)
    assert np.array_equal(mu_law_encode(x, 65536, gain), mu_law_encode(wide, 65536))


def test_mu_law_matches_formula_computed_independently():
    x = np.random.default_rng(0).uniform(-1, 1, 20000).astype(np.float32)
    ours = mu_law_encode(x).astype(int)
    reference = np.array([reference_encode(float(v)) for v in x])
    # float32 vs float64 may round a value sitting exactly on a level boundary differently
    assert np.max(np.abs(ours - reference)) <= 1
    assert np.mean(ours == reference) > 0.999


@pytest.mark.parametrize("channels", [256, 1024, 65536])
def test_mu_law_round_trip(channels):
    codes = np.arange(channels)
    assert np.array_equal(mu_law_encode(mu_law_decode(codes, channels), channels), codes)
    x = np.random.default_rng(1).uniform(-1, 1, 50000).astype(np.float32)
    error = np.abs(mu_law_decode(mu_law_encode(x, channels), channels) - x)
    mu = channels - 1
    # Half a quantisation step (1/mu) in the companded domain, mapped back through the inverse
    # curve, whose slope ln(1+mu)/mu * (1 + mu|x|) grows by at most (1+mu)^(1/mu) over the step.
    slope = (1 + mu * np.abs(x)) * math.log1p(mu) / mu * (1 + mu) ** (1 / mu)
    bound = slope / mu + 1e-6
    assert np.all(error <= bound)
    assert mu_law_encode(x, channels).dtype == (np.uint8 if channels <= 256 else np.uint16)


def test_mu_law_rejects_bad_channel_counts():
    with pytest.raises(ValueError):
        mu_law_encode(np.zeros(2), 1)
    with pytest.raises(ValueError):
        mu_law_encode(np.zeros(2), 70000)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return np.argmax(spectrum) * rate / len(samples)


@pytest.mark.parametrize("ext", ["mp3", "ogg", "flac", "wav"])
@pytest.mark.parametrize("rate", [22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_formats_rates_and_channels(tmp_path, ext, rate, channels):
    path = write_tone(tmp_path / f"t.{ext}", seconds=3.0, rate=rate, channels=channels, freq=1000)
    with open(path, "rb") as f:
        decoded = decode_to_mono(f, 16000)
    assert decoded.source_sample_rate == rate and decoded.source_channels == channels
    # output length = duration x rate (within a millisecond)
    assert abs(len(decoded.samples) - 3.0 * 16000) <= 16
    assert decoded.samples.dtype == np.float32
    assert dominant_frequency(decoded.samples, 16000) == pytest.approx(1000, abs=2)
    # downmix of channel 0 (amplitude 0.5) and channel 1 (0.35) averages to amplitude 0.425;
    # RMS (away from the edges, where lossy codecs ring) is amplitude / sqrt(2)
    amplitude = 0.5 if channels == 1 else 0.425
    middle = decoded.samples[1600:-1600]
    # lossy codecs (joint stereo in MP3 especially) shift level and phase by a few percent
    tolerance = 0.01 if ext in ("wav", "flac") else 0.1
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(amplitude / np.sqrt(2), rel=tolerance)


def test_decode_opus(tmp_path):
    path = write_tone(tmp_path / "t.opus", seconds=2.0, rate=48000, channels=2, freq=440)
    decoded = decode_to_mono(path, 16000)
    assert abs(len(decoded.samples) - 32000) <= 16
    assert dominant_frequency(decoded.samples, 16000) == pytest.approx(440, abs=2)


def test_resample_matches_a_direct_computation(tmp_path):
    # Identity rate: decoding must return the file's samples (mono mix) untouched.
    audio = tone(1.0, 16000, channels=2, freq=300)
    path = write_audio(tmp_path / "t.wav", audio, 16000)
    decoded = decode_to_mono(path, 16000)
    expected = audio.mean(axis=1)
    np.testing.assert_allclose(decoded.samples, expected, atol=1 / 32768 + 1e-6)


def test_decoding_streams_in_blocks(tmp_path):
    path = write_tone(tmp_path / "long.flac", seconds=30.0, rate=44100, channels=2)
    sizes = [len(block) for block, _ in iter_mono_blocks(path, 16000, block_frames=1 << 14)]
    assert len(sizes) > 20
    # each block is one decode block resampled (soxr may hold back or release a little)
    assert max(sizes) <= 1.25 * (1 << 14) * 16000 / 44100
    assert sum(sizes) == pytest.approx(30 * 16000, abs=16)


def test_encoding_normalises_the_peak(tmp_path):
    path = write_tone(tmp_path / "quiet.wav", seconds=1.0, rate=16000, channels=1)
    decoded = decode_to_mono(path, 16000)
    codes = encode_in_place(decoded, normalisation_gain(decoded), 256, chunk=1000)
    assert len(codes) == 16000
    assert codes.max() == 255 and codes.min() <= 1  # the peak became full scale


@pytest.mark.parametrize("channels", [256, 65536])
def test_in_place_encoding_equals_encoding_a_copy(channels):
    from dwave.store.audio import DecodedAudio

    samples = np.random.default_rng(3).uniform(-0.7, 0.7, 10_007).astype(np.float32)
    expected = mu_law_encode(samples / np.float32(0.7), channels)
    decoded = DecodedAudio(samples.copy(), 16000, 16000, 1, 0.7)
    codes = encode_in_place(decoded, np.float32(1 / 0.7), channels, chunk=1000)
    assert codes.dtype == expected.dtype
    assert np.mean(codes == expected) > 0.999  # gain multiply vs divide: boundary rounding only
    assert np.max(np.abs(codes.astype(int) - expected.astype(int))) <= 1


def _truncate(path, fraction=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("kind,reason", [
    ("empty", "empty file"),
    ("text", "not a decodable audio file"),
    ("random", "not a decodable audio file"),
    ("truncated-mp3", "truncated"),
    ("truncated-wav", "truncated"),
    ("truncated-ogg", "truncated"),
    ("truncated-flac", "decoding failed|truncated|not a decodable"),
    ("silent", "all-silent"),
])
def test_bad_files_are_rejected_with_a_reason(tmp_path, kind, reason):
    if kind == "empty":
        path = tmp_path / "empty.mp3"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.mp3"
        path.write_text("these are not the songs you are looking for\n" * 50)
    elif kind == "random":
        path = tmp_path / "noise.wav"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes())
    elif kind.startswith("truncated"):
        path = _truncate(write_tone(tmp_path / f"cut.{kind.split('-')[1]}", seconds=5.0))
    else:
        path = tmp_path / "silent.flac"
        sf.write(str(path), np.zeros((16000, 2)), 16000)
    with pytest.raises(AudioError, match=reason):
        with open(path, "rb") as f:
            decoded = decode_to_mono(f, 16000)
            normalisation_gain(decoded)


def test_a_song_longer_than_the_limit_fails_before_its_buffer_grows(tmp_path):
    from dwave.store.audio import AudioError, decode_to_mono

    path = write_audio(tmp_path / "long.wav", tone(3.0, 8000), 8000)
    with pytest.raises(AudioError, match=r"too long: its header declares 3 s, more than the "
                                         r"1 s allowed \(--max-song-minutes\)"):
        decode_to_mono(path, 16000, max_seconds=1.0)
    assert len(decode_to_mono(path, 16000, max_seconds=3.5).samples) == 48000
    # An MP3's length is only estimated from its header: the decoded count is checked too.
    mp3 = write_audio(tmp_path / "long.mp3", tone(3.0, 22050), 22050)
    with pytest.raises(AudioError, match="too long"):
        decode_to_mono(mp3, 16000, max_seconds=1.0)
