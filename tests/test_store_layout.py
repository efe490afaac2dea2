"""The version-2 store layout as a contract: zarr alone reads it, dwave's shard objects are
Zarr's own bytes, the index is folded from the parts present (never from every track), and a
part is invisible until complete."""

import json
import os

import numpy as np
import pytest

from dwave.store.part_codes import CHUNK_SAMPLES, SHARD_SAMPLES, encode_shards
from dwave.store.preprocess import PART_MAX_SONGS, TrackTask, group_into_parts
from dwave.store.sources import Source
from dwave.store.track_store import StoreConfig, TrackStore

from conftest import make_store


@pytest.mark.parametrize("dtype,samples", [(np.uint8, SHARD_SAMPLES + 3 * CHUNK_SAMPLES + 5),
                                           (np.uint16, 2 * CHUNK_SAMPLES - 1)])
def test_dwaves_shard_objects_are_byte_for_byte_what_zarr_writes(tmp_path, dtype, samples):
    import zarr

    from dwave.store.part_codes import create_codes_array

    codes = np.random.default_rng(0).integers(1, 1000 if dtype == np.uint16 else 256,
                                              samples).astype(dtype)
    group = zarr.create_group(str(tmp_path / "z"), zarr_format=3)
    array = create_codes_array(group, samples, np.dtype(dtype))
    array[:] = codes  # Zarr's own sharding codec
    ours = encode_shards(codes)
    assert len(ours) == -(-samples // SHARD_SAMPLES)
    for k, blob in enumerate(ours):
        assert (tmp_path / "z" / "codes" / "c" / str(k)).read_bytes() == blob


def test_zarr_alone_reads_tracks_as_the_readme_says(tmp_path):
    import zarr

    rng = np.random.default_rng(1)
    tracks = {str(i): (rng.integers(0, 256, 5000 * i).astype(np.uint8), "g") for i in (1, 2, 3)}
    url = make_store(str(tmp_path / "s"), tracks, tracks_per_part=2)
    root = zarr.open_group(url, mode="r")
    table = root["index"].attrs["tracks"]
    assert sorted(table["id"]) == ["1", "2", "3"] and len(set(table["part"])) == 2
    for tid, (codes, _) in tracks.items():
        i = table["id"].index(tid)
        start, length = table["offset"][i], table["length"][i]
        np.testing.assert_array_equal(root[f"parts/{table['part'][i]}/codes"][start:start + length],
                                      codes)
        np.testing.assert_array_equal(TrackStore(url).read_codes(tid), codes)


def test_a_part_is_invisible_until_complete_and_the_index_follows_the_parts_present(tmp_path):
    url = make_store(str(tmp_path / "s"), {"a": (np.full(100, 7, np.uint8), None)})
    store = TrackStore(url)
    # A part a killed writer left: codes written, the `complete` attribute never set.
    store.write_part("late", [{"id": "b"}], [np.full(50, 9, np.uint8)])
    attrs = json.load(open(f"{url}/parts/late/zarr.json"))
    attrs["attributes"]["complete"] = False
    json.dump(attrs, open(f"{url}/parts/late/zarr.json", "w"))
    index, changed = store.current_index()
    assert index.tracks.columns["id"] == ["a"] and not changed
    # Completed later but not indexed (the run was killed before its index): seen, folded in.
    store.write_part("late", [{"id": "b"}], [np.full(50, 9, np.uint8)])
    index, changed = store.current_index()
    assert sorted(index.tracks.columns["id"]) == ["a", "b"] and changed
    assert store.read_index().tracks.columns["id"] == ["a"]  # not yet written
    store.write_index()
    assert sorted(store.read_index().tracks.columns["id"]) == ["a", "b"]
    # A part removed by hand drops out, and says so.
    import shutil

    shutil.rmtree(f"{url}/parts/late")
    index, changed = store.current_index()
    assert index.tracks.columns["id"] == ["a"] and index.gone == ["late"] and changed


def test_two_parts_holding_one_song_keep_the_first(tmp_path):
    """Two runs racing on one store may both write a song, each in a part of its own."""
    url = make_store(str(tmp_path / "s"), {})
    store = TrackStore(url)
    store.write_part("p1", [{"id": "x"}], [np.full(10, 1, np.uint8)])
    store.write_part("p2", [{"id": "x"}, {"id": "y"}], [np.full(10, 2, np.uint8),
                                                          np.full(10, 3, np.uint8)])
    index = store.write_index()
    rows = {r["id"]: r["part"] for r in index.tracks.rows()}
    assert rows == {"x": "p1", "y": "p2"}


def test_a_rerun_reads_the_index_and_one_listing_not_every_part(tmp_path, monkeypatch):
    """Resume and the index in time independent of the archive: with nothing new, no part's
    table is read; with one new part, only that one."""
    url = make_store(str(tmp_path / "s"), {str(i): (np.full(10, i, np.uint8), None)
                                           for i in range(40)}, tracks_per_part=4)
    asked = []
    real = TrackStore.read_part_tables
    monkeypatch.setattr(TrackStore, "read_part_tables",
                        lambda self, parts: asked.append(sorted(parts)) or real(self, parts))
    store = TrackStore(url)
    assert len(store.current_index()[0].tracks) == 40
    store.write_index()
    assert all(parts == [] for parts in asked)
    store.write_part("new", [{"id": "new"}], [np.full(10, 1, np.uint8)])
    asked.clear()
    assert len(store.write_index().tracks) == 41
    assert asked == [["new"]]


def _task(name: str, size: int) -> TrackTask:
    return TrackTask(Source(f"/songs/{name}.mp3", f"size={size}", size), name, None)


def test_songs_are_grouped_into_parts_by_count_bytes_and_workers():
    config = StoreConfig(16000, 256)
    clips = [_task(str(i), 200_000) for i in range(10_000)]  # 30-s clips at 48 kbit/s
    parts = group_into_parts(clips, config, workers=2)
    assert len(parts[0].tracks) == PART_MAX_SONGS  # 256 x 200 kB < 64 MiB: by count
    assert sum(len(p.tracks) for p in parts) == 10_000
    big = [_task(str(i), 40 << 20) for i in range(10)]  # 40 MiB each: one a part (64 MiB cap)
    assert [len(p.tracks) for p in group_into_parts(big, config, workers=1)] == [1] * 10
    few = [_task(str(i), 1000) for i in range(16)]  # 2 workers: 8 parts, 4 for each
    assert len(group_into_parts(few, config, workers=2)) == 8
    again = group_into_parts(clips, config, workers=2)
    assert [p.part_id for p in again] == [p.part_id for p in parts]  # a rerun's ids are the same
    assert len({p.part_id for p in parts}) == len(parts)


def test_memory_mode_maps_the_store_in_place(tmp_path):
    """Memory mode reads a local store through memory maps of its own shard files (the page
    cache: one copy per node), not a private buffer per rank."""
    from dwave.train.data import open_training_data

    url = make_store(str(tmp_path / "s"), {"a": ((np.arange(30000) % 251).astype(np.uint8), None)})
    data = open_training_data(url, 1000, 4, 0, validation_fraction=0.0, mode="memory")
    maps = data.train.mapped._maps
    assert maps and all(isinstance(m, np.memmap) for m in maps.values())
    assert {os.path.realpath(m.filename) for m in maps.values()} == {
        os.path.realpath(os.path.join(url, "parts", "p000000", "codes", "c", "0"))}
