"""Training windows: uniform over all samples, deterministic per (seed, rank, step), a stable
validation split, memory and stream modes agreeing, clear errors for stores that cannot feed."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_store
from dwave.train.data import open_training_data, split_tracks, Track
from dwave.errors import DwaveError


@pytest.fixture(scope="module")
def ramp_store(tmp_path_factory):
    """Tracks whose codes encode their own positions, so a window shows where it came from."""
    lengths = {"a": 3000, "b": 12000, "c": 500, "d": 6000, "e": 9000}
    tracks = {tid: ((np.arange(n) % 251).astype(np.uint8), "g1" if tid < "c" else "g2")
              for tid, n in lengths.items()}
    path = str(tmp_path_factory.mktemp("stores") / "ramps")
    return make_store(path, tracks), lengths


def test_windows_are_uniform_over_every_valid_start(ramp_store):
    url, lengths = ramp_store
    window = 1000
    data = open_training_data(url, window, batch_size=64, seed=0, validation_fraction=0)
    sampler = data.train
    ids = [t.id for t in sampler.tracks]
    assert "c" not in ids  # shorter than a window: never drawn
    counts = np.zeros(len(ids))
    for step in range(400):
        track, start = sampler.locate(rank=0, step=step)
        assert (start >= 0).all()
        assert (start + window <= np.array([lengths[ids[t]] for t in track])).all()
        np.add.at(counts, track, 1)
    starts = np.array([lengths[i] - window + 1 for i in ids], float)
    expected = starts / starts.sum() * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20, (counts, expected)  # 3 degrees of freedom: p ~ 2e-4 at 20
    codes, genre = sampler.batch(0, 0)
    track, start = sampler.locate(0, 0)
    for row in range(4):
        np.testing.assert_array_equal(codes[row], (start[row] + np.arange(window)) % 251)


def test_streams_differ_by_rank_and_step_and_repeat_exactly(ramp_store):
    url, _ = ramp_store
    sampler = open_training_data(url, 1000, 8, seed=5, validation_fraction=0).train
    a = sampler.batch(0, 10)[0]
    np.testing.assert_array_equal(a, sampler.batch(0, 10)[0])
    assert not np.array_equal(a, sampler.batch(1, 10)[0])
    assert not np.array_equal(a, sampler.batch(0, 11)[0])
    other_seed = open_training_data(url, 1000, 8, seed=6, validation_fraction=0).train
    assert not np.array_equal(a, other_seed.batch(0, 10)[0])


@pytest.mark.parametrize("per_read", [1, 8])
def test_memory_and_stream_modes_give_the_same_batches_through_tf_data(ramp_store, per_read):
    url, _ = ramp_store
    memory = open_training_data(url, 1000, 4, seed=1, validation_fraction=0, mode="memory",
                                windows_per_read=per_read)
    stream = open_training_data(url, 1000, 4, seed=1, validation_fraction=0, mode="stream",
                                windows_per_read=per_read)
    assert (memory.train.mode, stream.train.mode) == ("memory", "stream")
    # Steps 125-133 cross a round's end (512 windows / 4 per batch = 128 steps a round).
    from_memory = list(memory.train.dataset(rank=1, first_step=125, last_step=133))
    from_stream = list(stream.train.dataset(rank=1, first_step=125, last_step=133))
    assert len(from_memory) == 8
    for (c1, g1), (c2, g2), step in zip(from_memory, from_stream, range(125, 133)):
        np.testing.assert_array_equal(c1.numpy(), c2.numpy())
        np.testing.assert_array_equal(g1.numpy(), g2.numpy())
        np.testing.assert_array_equal(c1.numpy(), memory.train.batch(1, step)[0])
        track, start = memory.train.locate(1, step)
        for row in range(4):  # each window is the codes at its located start
            np.testing.assert_array_equal(c1.numpy()[row], (start[row] + np.arange(1000)) % 251)


def test_defaults_stream_mode_reads_windows_in_groups_and_memory_mode_one_by_one(ramp_store):
    url, _ = ramp_store
    from dwave.train.config import STREAM_WINDOWS_PER_READ

    stream = open_training_data(url, 1000, 4, seed=1, validation_fraction=0, mode="stream")
    memory = open_training_data(url, 1000, 4, seed=1, validation_fraction=0, mode="memory")
    assert (stream.train.windows_per_read, memory.train.windows_per_read) == (
        STREAM_WINDOWS_PER_READ, 1)


def test_grouped_windows_share_reads_yet_stay_spread_and_uniform(tmp_path):
    """Windows drawn 8 to a read: 1/8 of the requests, one span of bytes per window, each
    window the codes at its located start, each batch from different places."""
    lengths = {"long": 200_000, "mid": 60_000, "short": 7_000}
    url = make_store(str(tmp_path / "s"), {
        tid: ((np.arange(n) % 251).astype(np.uint8), "g") for tid, n in lengths.items()})
    span, batch = 1000, 4
    sampler = open_training_data(url, span, batch, seed=3, validation_fraction=0,
                                 mode="stream", windows_per_read=8).train
    steps = 4 * sampler.steps_per_round  # four rounds
    spread = []
    for step in range(steps):
        codes, _ = sampler.batch(0, step)
        track, start = sampler.locate(0, step)
        spread.append(len({(int(t), int(s) // 10_000) for t, s in zip(track, start)}))
        for row, (t, s) in enumerate(zip(track, start)):
            np.testing.assert_array_equal(codes[row], (s + np.arange(span)) % 251)
    reader = sampler._reader()
    windows = steps * batch
    # One read of 8 spans a group (a shorter track: all of it, shared by its groups in a round).
    assert windows / 10 < reader.requests <= windows / 8
    assert windows * span * 0.8 < reader.bytes_read <= windows * span
    assert np.mean(spread) > 3.5  # a batch's 4 windows come from 4 places, nearly always


def test_grouped_draws_keep_tracks_in_proportion_and_positions_uniform():
    """The grouped draw's marginal: each track in proportion to its valid starts, and every
    region of a track (its edges included) drawn equally often, within sampling noise."""
    from dwave.train.data import grouped_starts

    lengths, span = np.array([200_000, 60_000, 7_000]), 1000
    starts = lengths - span + 1
    track, start, block, end = grouped_starts(np.random.default_rng(0), np.cumsum(starts),
                                              lengths, span, 800_000, 8)
    assert ((block <= start) & (start + span <= end) & (end <= lengths[track])).all()
    assert ((end - block) == np.minimum(8 * span, lengths[track])).all()
    share = np.bincount(track, minlength=3) / len(track)
    np.testing.assert_allclose(share, starts / starts.sum(), rtol=0.02)
    for t, bins in ((0, 20), (2, 6)):
        density = np.histogram(start[track == t], bins=bins, range=(0, starts[t]))[0]
        np.testing.assert_allclose(density / density.mean(), 1.0, atol=0.06)


def test_genres_index_the_store_vocabulary(ramp_store):
    url, _ = ramp_store
    data = open_training_data(url, 1000, 32, seed=0, validation_fraction=0)
    assert data.condition_values == ["g1", "g2"]
    track, _ = data.train.locate(0, 0)
    _, genre = data.train.batch(0, 0)
    expected = [0 if data.train.tracks[t].id < "c" else 1 for t in track]
    np.testing.assert_array_equal(genre, expected)


def test_validation_split_is_by_track_stable_and_disjoint():
    tracks = [Track(str(i), 1000 + i, "x") for i in range(200)]
    train, val = split_tracks(tracks, 0.1)
    assert {t.id for t in train}.isdisjoint({t.id for t in val})
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    # Adding tracks never moves an existing one to the other side.
    train2, val2 = split_tracks(tracks + [Track(f"n{i}", 999, "x") for i in range(50)], 0.1)
    assert {t.id for t in val} <= {t.id for t in val2}
    # Two tracks: one each side; one track: nothing held out.
    assert [len(s) for s in split_tracks(tracks[:2], 0.1)] == [1, 1]
    assert [len(s) for s in split_tracks(tracks[:1], 0.1)] == [1, 0]


def test_stores_that_cannot_feed_a_window_are_clear_errors(tmp_path):
    empty = make_store(str(tmp_path / "empty"), {})
    with pytest.raises(DwaveError, match="holds no tracks"):
        open_training_data(empty, 100, 1, 0)
    short = make_store(str(tmp_path / "short"), {"1": (np.zeros(50, np.uint8), None)})
    with pytest.raises(DwaveError, match="no track as long as one training window"):
        open_training_data(short, 100, 1, 0)
    with pytest.raises(DwaveError, match="not a dwave store"):
        open_training_data(str(tmp_path / "nothing"), 100, 1, 0)



def test_tracks_of_a_genre_the_run_does_not_know_are_left_out_not_relabelled(tmp_path):
    from conftest import synthetic_codes

    url = make_store(str(tmp_path / "s"), {
        "a": (synthetic_codes(1.0, seed=1), "rock"), "b": (synthetic_codes(1.0, seed=2), "pop"),
        "c": (synthetic_codes(1.0, seed=3), "rock"), "d": (synthetic_codes(1.0, seed=4), "jazz")})
    data = open_training_data(url, 100, 2, 0, validation_fraction=0.0, values=["pop", "rock"])
    assert sorted(t.id for t in data.train.tracks) == ["a", "b", "c"]
    assert data.left_out == {"tracks": 1, "values": ["jazz"], "damaged": []}
    assert sorted(set(data.train.track_condition.tolist())) == [0, 1]  # pop, rock: their own ids
    assert data.train.track_condition.tolist() == [1, 0, 1]  # a rock, b pop, c rock
    with pytest.raises(DwaveError, match="no track has a genre this run knows"):
        open_training_data(url, 100, 2, 0, values=["metal"])
    everything = open_training_data(url, 100, 2, 0, validation_fraction=0.0)
    assert everything.left_out["tracks"] == 0
    assert everything.condition_values == ["jazz", "pop", "rock"]


def test_a_track_that_cannot_be_read_is_a_one_line_error_in_both_modes(tmp_path):
    """A damaged chunk (a bad disk, a copy cut short) names the store and the track, in memory
    mode when the tracks are read in and in stream mode from inside tf.data's workers, where
    TensorFlow wraps the error in its own; nothing is read before load() is asked for."""
    lengths = {"a": 3000, "b": 4000}
    url = make_store(str(tmp_path / "s"), {
        tid: ((np.arange(n) % 251).astype(np.uint8), "g") for tid, n in lengths.items()},
        tracks_per_part=1)
    # Samplers opened while the store was whole (each start checks it: see the end), then a
    # shard cut short under them.
    unloaded = open_training_data(url, 100, 2, 0, validation_fraction=0.0, load=False)
    stream = open_training_data(url, 100, 2, 0, validation_fraction=0.0, mode="stream")
    (tmp_path / "s" / "parts" / "p000001" / "codes" / "c" / "0").write_bytes(b"\x00")
    said = (rf"store {url}: track b \(parts/p000001\) cannot be read \("
            r"parts/p000001/codes/c/0 bytes \d+-\d+: only \d+ bytes there \(the shard is cut "
            rf"short\)\): `dwave store verify {url} --repair` sets damaged parts aside")
    assert unloaded.train.mapped is None  # the damaged shard was not touched
    with pytest.raises(DwaveError, match=said):
        unloaded.load()
    with pytest.raises(DwaveError, match=said) as raised:
        for _ in stream.train.batches(rank=0, first_step=0, last_step=50):
            pass
    # A start after the damage is stopped by the check, before any codes are read.
    with pytest.raises(DwaveError, match=r"1 track\(s\) in 1 damaged part\(s\) \(e.g. "
                                         r"parts/p000001: shard 0 holds 1 bytes"):
        open_training_data(url, 100, 2, 0, validation_fraction=0.0, mode="memory")
    assert "\n" not in str(raised.value)
