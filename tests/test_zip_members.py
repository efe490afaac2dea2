"""Songs in zip archives as the Free Music Archive ships them (its creation.py: ZIP_BZIP2,
members fma_large/NNN/NNNNNN.mp3 beside README.txt and checksums): every compression method,
each archive opened once per part, members checked against their CRC, big ones streamed."""

import os
import zipfile

import numpy as np
import pytest

from dwave.store import zip_members
from dwave.store.audio import decode_to_mono
from dwave.store.preprocess import TrackTask, decode_track
from dwave.store.sources import expand_sources
from dwave.store.track_store import StoreConfig
from dwave.store.zip_members import ArchivePool, DamagedMember

from conftest import write_tone


def fma_zip(path, songs: dict, method=zipfile.ZIP_BZIP2) -> str:
    """A zip laid out as FMA's creation.py writes it: members under fma_large/NNN/."""
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr("fma_large/README.txt", "This .zip archive is part of the FMA ...")
        z.writestr("fma_large/checksums", "\n".join(f"0000  {n}" for n in songs))
        for name, song in songs.items():
            z.write(song, f"fma_large/{name[:3]}/{name}")
    return str(path)


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    where = tmp_path_factory.mktemp("songs")
    return {f"{n:06d}.mp3": write_tone(where / f"{n:06d}.mp3", 1.5, freq=300.0 + 50 * n)
            for n in (2, 5, 140)} | {"000777.wav": write_tone(where / "000777.wav", 1.0)}


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_DEFLATED,
                                    zipfile.ZIP_STORED])
def test_members_decode_as_the_files_do(tmp_path, songs, method):
    archive = fma_zip(tmp_path / "fma_large.zip", songs, method)
    expansion = expand_sources([archive])
    assert [s.track_id for s in expansion.sources] == ["2", "5", "140", "777"]
    assert sorted(os.path.basename(i) for i in expansion.ignored) == ["README.txt", "checksums"]
    with ArchivePool() as archives:
        for source in expansion.sources:
            assert source.member is not None and source.member.read_directly
            with source.open(archives) as f:
                from_zip = decode_to_mono(f, 16000).samples
            name = source.uri.rsplit("/", 1)[-1]
            np.testing.assert_array_equal(from_zip, decode_to_mono(songs[name], 16000).samples)


def test_an_archive_is_opened_once_for_all_of_a_parts_songs(tmp_path, songs):
    archive = fma_zip(tmp_path / "fma_large.zip", songs)
    sources = expand_sources([archive]).sources
    with ArchivePool() as archives:
        with sources[0].open(archives) as f:
            f.read(1)
        # The pool holds the archive open: with another file put in its place, the part's
        # other songs still read from the one opened (they would not if each song opened the
        # archive again: see the end).
        os.rename(archive, archive + ".moved")
        with open(archive, "wb") as f:
            f.write(bytes(os.path.getsize(archive + ".moved")))
        for source in sources[1:]:
            with source.open(archives) as f:
                assert len(decode_to_mono(f, 16000).samples) > 0
    with pytest.raises(DamagedMember, match="no local header"):
        with sources[1].open() as f:
            pass


def test_a_damaged_member_is_a_failed_song_naming_it(tmp_path, songs):
    archive = fma_zip(tmp_path / "fma_large.zip", songs, zipfile.ZIP_STORED)
    source = expand_sources([archive]).sources[1]
    data = bytearray(open(archive, "rb").read())
    at = source.member.header_offset + 30 + len("fma_large/000/000005.mp3") + 2000
    data[at] ^= 0xFF  # one flipped byte in the middle of a stored MP3
    open(archive, "wb").write(bytes(data))
    with pytest.raises(DamagedMember, match="000005.mp3: its bytes do not match the archive's "
                                            "CRC-32"):
        with source.open() as f:
            pass
    result, _, codes = decode_track(TrackTask(source, source.track_id, None),
                                    StoreConfig(16000, 256), 600.0)
    assert codes is None and result["status"] == "failed" and "CRC-32" in result["reason"]


def test_a_member_over_the_memory_limit_is_streamed(tmp_path, songs, monkeypatch):
    archive = fma_zip(tmp_path / "fma_large.zip", songs)
    monkeypatch.setattr(zip_members, "MEMBER_IN_MEMORY_BYTES", 1000)
    source = expand_sources([archive]).sources[0]
    assert not source.member.read_directly
    with source.open() as f:
        assert isinstance(f, zipfile.ZipExtFile)
        streamed = decode_to_mono(f, 16000).samples
    np.testing.assert_array_equal(streamed, decode_to_mono(songs["000002.mp3"], 16000).samples)


def test_a_member_pattern_selects_part_of_an_archive(tmp_path, songs):
    from dwave.errors import DwaveError

    archive = fma_zip(tmp_path / "fma_large.zip", songs)
    picked = expand_sources([f"{archive}::fma_large/000/*.mp3"]).sources
    assert [s.track_id for s in picked] == ["2", "5", "140"]
    assert [s.track_id for s in expand_sources([f"{archive}::**/*.wav"]).sources] == ["777"]
    with pytest.raises(DwaveError, match="no audio member of .* matches 'fma_large/9/\\*'"):
        expand_sources([f"{archive}::fma_large/9/*"])


@pytest.mark.slow
def test_a_failure_is_the_songs_wherever_it_is_read_from(tmp_path, songs):
    """One bad song in two archives is one failure, not tried again while it is unchanged."""
    import json

    from conftest import run_dwave

    bad = tmp_path / "000099.mp3"
    bad.write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00")  # FMA's known-empty kind
    first = fma_zip(tmp_path / "fma_large.zip", {"000099.mp3": str(bad),
                                                 "000002.mp3": songs["000002.mp3"]})
    second = fma_zip(tmp_path / "fma_full.zip", {"000099.mp3": str(bad)})
    store = tmp_path / "store"
    args = ("--out", store, "--workers", "1", "--no-progress")
    one = run_dwave("preprocess", first, *args, check=0)
    assert "1 written, 0 already done, 1 failed" in one.stderr
    two = run_dwave("preprocess", second, *args, check=0)
    assert "1 that failed before and are unchanged (not tried again; --retry-failed" in two.stderr
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert len(info["failures"]) == 1 and info["failures"][0]["track_id"] == "99"
    again = run_dwave("preprocess", second, *args, "--retry-failed", check=0)
    assert "0 written, 0 already done, 1 failed" in again.stderr
    assert "an ID3 tag and no MPEG audio frames" in again.stderr
    fixed = fma_zip(tmp_path / "fixed.zip", {"000099.mp3": songs["000005.mp3"]})
    run_dwave("preprocess", fixed, *args, check=0)
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert info["failures"] == [] and len(info["tracks"]) == 2
