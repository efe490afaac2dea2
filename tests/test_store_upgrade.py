"""`dwave store upgrade`: a version-1 store (as the dwave of before 2026-12 wrote it) converted
in place, codes and track attributes kept, without the sources; a killed upgrade finishes on a
rerun; every other command on a version-1 store says to upgrade it."""

import json

import numpy as np
import pytest

from dwave.store.track_store import TrackStore

from conftest import dwave_here


def write_version1_store(path: str, tracks: dict) -> None:
    """A store in the version-1 layout, written with zarr as dwave wrote it then: one array per
    track (chunks of 2^20, zstd), its attributes, an index group, consolidated metadata."""
    import zarr
    from zarr.codecs import ZstdCodec

    root = zarr.create_group(path, zarr_format=3, attributes={
        "dwave_store_version": 1, "sample_rate": 16000, "quantization_channels": 256})
    group = root.create_group("tracks")
    root.create_group("index")
    for tid, (codes, genre) in tracks.items():
        array = group.create_array(tid, shape=codes.shape, chunks=(1 << 20,), dtype=codes.dtype,
                                   compressors=[ZstdCodec(level=1)], attributes={
                                       "sample_rate": 16000, "quantization_channels": 256,
                                       "length": len(codes), "duration": len(codes) / 16000,
                                       "source": f"/songs/{tid}.mp3", "fingerprint": f"size={tid}",
                                       "genre": genre, "complete": False})
        array[:] = codes
        array.attrs.update({"complete": True})
    half = group.create_array("half", shape=(10,), dtype="uint8", attributes={"complete": False})
    half[:] = 1  # a track a killed version-1 run left: never converted
    root["index"].attrs.update({"tracks": [], "failures": [{"source": "/songs/bad.mp3",
                                                           "reason": "not audio"}]})
    zarr.consolidate_metadata(path)


@pytest.fixture
def version1(tmp_path):
    rng = np.random.default_rng(0)
    tracks = {str(i): (rng.integers(0, 256, 3000 + 1000 * i).astype(np.uint8), g)
              for i, g in [(1, "rock"), (2, "jazz"), (3, None)]}
    path = str(tmp_path / "v1")
    write_version1_store(path, tracks)
    return path, tracks


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # the version-1 writer consolidates
def test_a_version1_store_is_upgraded_in_place_with_its_codes_and_attributes(version1):
    path, tracks = version1
    for args in (["info", path], ["train", path, "--run-dir", f"{path}-run", "--steps", "1"]):
        refused = dwave_here(*args)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1] == (
            f"dwave: error: store {path} is a version-1 store (one Zarr array per track): "
            "convert it once, in place and without decoding anything again, with `dwave store "
            f"upgrade {path}`")
    done = dwave_here("store", "upgrade", path, check=0)
    assert "3 complete version-1 tracks to convert" in done.stderr
    assert "version 2, 3 tracks in 1 parts (1 written now)" in done.stderr
    store = TrackStore(path)
    for tid, (codes, _) in tracks.items():
        np.testing.assert_array_equal(store.read_codes(tid), codes)
    info = json.loads(dwave_here("info", path, "--json", check=0).stdout)
    assert [(t["id"], t["genre"], t["source"], t["fingerprint"]) for t in info["tracks"]] == [
        ("1", "rock", "/songs/1.mp3", "size=1"), ("2", "jazz", "/songs/2.mp3", "size=2"),
        ("3", None, "/songs/3.mp3", "size=3")]
    assert info["failures"] == [{"source": "/songs/bad.mp3", "reason": "not audio"}]
    root = json.load(open(f"{path}/zarr.json"))
    assert root["attributes"]["dwave_store_version"] == 2
    assert "consolidated_metadata" not in root  # the version-1 listing of every track is gone
    import os
    assert sorted(os.listdir(path)) == ["index", "parts", "zarr.json"]
    again = dwave_here("store", "upgrade", path, check=0)
    assert "already version 2: nothing to do" in again.stderr


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_an_interrupted_upgrade_finishes_when_run_again(version1, monkeypatch):
    from dwave.store import upgrade

    path, tracks = version1
    monkeypatch.setattr(upgrade, "UPGRADE_PART_SAMPLES", 5000)  # one track a part
    real_write = TrackStore.write_part
    calls = []

    def write_then_die(self, *args):
        if calls:
            raise KeyboardInterrupt  # killed while writing the second part
        calls.append(args[0])
        real_write(self, *args)

    monkeypatch.setattr(TrackStore, "write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        upgrade.upgrade_store(path, log=lambda *_: None)
    assert TrackStore(path).root_attributes()["dwave_store_version"] == 1  # not switched yet
    monkeypatch.setattr(TrackStore, "write_part", real_write)
    said = []
    result = upgrade.upgrade_store(path, log=said.append)
    assert result == {"parts": 2, "tracks": 3}  # the part written before the kill was kept
    store = TrackStore(path)
    for tid, (codes, _) in tracks.items():
        np.testing.assert_array_equal(store.read_codes(tid), codes)
