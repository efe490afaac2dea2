"""SOURCE expansion: directories, globs, zip archives read in place, HTTP with resume; ids;
metadata CSVs."""

import hashlib
import http.server
import os
import threading
import time
import zipfile

import numpy as np
import pytest

from dwave.store.audio import decode_to_mono
from dwave.errors import DwaveError
from dwave.store.metadata import load_genres
from dwave.store.download import download
from dwave.store.sources import expand_sources, track_id_for

from conftest import write_tone


def test_fma_names_give_their_number_and_other_names_a_stable_hash():
    assert track_id_for("/data/fma_small/000/000002.mp3") == "2"
    assert track_id_for("/x/fma_full.zip::fma_full/155/155320.mp3") == "155320"
    a = track_id_for("/music/My Song!.mp3")
    assert a == track_id_for("/music/My Song!.mp3")  # stable
    assert a.startswith("My-Song-") and a != track_id_for("/other/My Song!.mp3")


def test_directory_is_walked_recursively_and_non_audio_is_ignored(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_tone(tmp_path / "a" / "b" / "000002.flac", 0.2)
    write_tone(tmp_path / "a" / "000001.wav", 0.2)
    (tmp_path / "a" / "cover.jpg").write_bytes(b"\xff\xd8")
    expansion = expand_sources([str(tmp_path)])
    assert [s.track_id for s in expansion.sources] == ["1", "2"]
    assert [os.path.basename(p) for p in expansion.ignored] == ["cover.jpg"]


def test_glob_and_explicit_files(tmp_path):
    for i in range(3):
        write_tone(tmp_path / f"{i:06d}.wav", 0.1)
    found = expand_sources([str(tmp_path / "00000[01].wav"), str(tmp_path / "000002.wav")])
    assert [s.track_id for s in found.sources] == ["0", "1", "2"]
    with pytest.raises(DwaveError, match="no such file"):
        expand_sources([str(tmp_path / "missing.mp3")])
    with pytest.raises(DwaveError, match="no files match"):
        expand_sources([str(tmp_path / "*.ogg")])


def test_zip_members_are_read_in_place(tmp_path):
    song = write_tone(tmp_path / "000007.mp3", 1.0)
    archive = tmp_path / "fma_small.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(song, "fma_small/000/000007.mp3")
        z.writestr("fma_small/README.txt", "hello")
    expansion = expand_sources([str(archive)])
    (source,) = expansion.sources
    assert source.track_id == "7" and source.uri.endswith("::fma_small/000/000007.mp3")
    assert expansion.ignored[0].endswith("README.txt")
    with source.open() as f:
        from_zip = decode_to_mono(f, 16000).samples
    np.testing.assert_array_equal(from_zip, decode_to_mono(song, 16000).samples)
    assert sorted(os.listdir(tmp_path)) == ["000007.mp3", "fma_small.zip"]  # nothing extracted


class _FlakyRangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file with Range support; the first GET dies after `cut` bytes."""

    payload = b""
    cut = 0
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server API
        start = 0
        range_header = self.headers.get("Range")
        type(self).requests.append(range_header)
        if range_header:
            start = int(range_header.split("=")[1].split("-")[0])
        body = self.payload[start:]
        self.send_response(206 if range_header else 200)
        self.send_header("Content-Length", str(len(body)))
        if range_header:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if len(type(self).requests) == 1:
            self.wfile.write(body[: self.cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-body
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(tmp_path):
    song = write_tone(tmp_path / "song.flac", 3.0)
    payload = open(song, "rb").read()
    handler = type("Handler", (_FlakyRangeHandler,),
                   {"payload": payload, "cut": len(payload) // 3, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/000042.flac", payload, handler
    server.shutdown()


def test_http_download_resumes_with_a_range_request(tmp_path, flaky_server):
    url, payload, handler = flaky_server
    digest = hashlib.sha256(payload).hexdigest()
    path = download(f"{url}#sha256={digest}", str(tmp_path / "cache"))
    assert open(path, "rb").read() == payload
    assert handler.requests == [None, f"bytes={len(payload) // 3}-"]
    # a second call reuses the finished download: no request at all
    assert download(url, str(tmp_path / "cache")) == path and len(handler.requests) == 2


def test_a_url_longer_than_a_file_name_downloads(tmp_path, flaky_server):
    url, payload, _ = flaky_server
    long_url = url.replace("/000042.flac", "/" + "x" * 300 + ".flac")
    path = download(long_url, str(tmp_path / "cache"))
    assert open(path, "rb").read() == payload and len(os.path.basename(path)) < 120


def test_http_checksum_mismatch_is_an_error_and_keeps_nothing(tmp_path, flaky_server):
    url, _, _ = flaky_server
    with pytest.raises(DwaveError, match="checksum mismatch"):
        download(f"{url}#sha256={'0' * 64}", str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [".locks"]  # only the (empty) lock files
    assert all(os.path.getsize(tmp_path / "cache" / ".locks" / f) == 0
               for f in os.listdir(tmp_path / "cache" / ".locks"))
    with pytest.raises(DwaveError, match="bad checksum"):
        download(f"{url}#md5=abc", str(tmp_path / "cache"))


def test_http_source_decodes_through_the_cache(tmp_path, flaky_server):
    url, payload, _ = flaky_server
    (source,) = expand_sources([url], cache_dir=str(tmp_path / "cache")).sources
    assert source.track_id == "42"
    with source.open() as f:
        assert len(decode_to_mono(f, 16000).samples) == 48000


def test_fma_tracks_csv_with_three_header_rows(tmp_path):
    path = tmp_path / "tracks.csv"
    path.write_text(
        ",album,album,track,track,track\n"
        ",comments,title,genre_top,genres,title\n"
        "track_id,,,,,\n"
        '2,0,AWOL,Hip-Hop,[21],Food\n'
        '5,0,AWOL,,[21],This World\n'
        '140,1,"Cool, Album",Folk,[17],Ohio\n'
    )
    assert load_genres(str(path)) == {"2": "Hip-Hop", "140": "Folk"}
    # fma_metadata.zip as it ships: its tracks.csv is read in place
    shipped = tmp_path / "fma_metadata.zip"
    with zipfile.ZipFile(shipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("fma_metadata/README.txt", "FMA metadata")
        z.writestr("fma_metadata/genres.csv", "genre_id,title\n21,Hip-Hop\n")
        z.write(path, "fma_metadata/tracks.csv")
    assert load_genres(str(shipped)) == {"2": "Hip-Hop", "140": "Folk"}
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("genres.csv", "x")
    with pytest.raises(DwaveError, match="a zip without a tracks.csv: unzip it"):
        load_genres(str(other))


def test_plain_metadata_csv_and_bad_ones(tmp_path):
    plain = tmp_path / "genres.csv"
    plain.write_text("track_id,genre\n000002,Rock\n3,\nmy-song-abc,Jazz\n²,Folk\n")
    assert load_genres(str(plain)) == {"2": "Rock", "my-song-abc": "Jazz", "²": "Folk"}
    bad = tmp_path / "bad.csv"
    bad.write_text("id,style\n1,Rock\n")
    with pytest.raises(DwaveError, match="track_id"):
        load_genres(str(bad))
    with pytest.raises(DwaveError, match="cannot read"):
        load_genres(str(tmp_path / "nope.csv"))


def test_symlink_loops_visit_each_real_file_once_and_finish(tmp_path):
    music = tmp_path / "music"
    (music / "a" / "b").mkdir(parents=True)
    write_tone(music / "a" / "one.wav", seconds=0.1)
    write_tone(music / "a" / "b" / "two.wav", seconds=0.1)
    # Three loops back to ancestors, and a link beside its target: Python's glob would list the
    # songs thousands of times (or never finish); a walk that follows links must not either.
    os.symlink(music, music / "a" / "b" / "up")
    os.symlink(music / "a", music / "a" / "b" / "up2")
    os.symlink(music / "a", music / "loop")
    os.symlink(music / "a" / "one.wav", music / "alias.wav")
    for spec in (str(music), f"{music}/**/*.wav", f"{music}/a/**"):
        uris = [s.uri for s in expand_sources([spec]).sources]
        reals = sorted(os.path.realpath(u) for u in uris)
        assert reals == sorted([str(music / "a" / "one.wav"), str(music / "a" / "b" / "two.wav")]), \
            (spec, uris)
    # Glob semantics: `*` stays within one directory, `**/` spans any number (zero included).
    assert [os.path.basename(s.uri) for s in expand_sources([f"{music}/a/*.wav"]).sources] == \
        ["one.wav"]


def test_a_dangling_symlink_is_a_failed_song_not_a_crash(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    write_tone(music / "good.wav", seconds=0.1)
    os.symlink(music / "gone.wav", music / "broken.wav")
    sources = expand_sources([str(music)]).sources
    assert sorted(os.path.basename(s.uri) for s in sources) == ["broken.wav", "good.wav"]
    broken = next(s for s in sources if s.uri.endswith("broken.wav"))
    assert broken.fingerprint.startswith("unreadable:")


def _serve(handler_class, **attrs):
    handler = type("Handler", (handler_class,), {"requests": [], **attrs})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, handler


class _WrongOffsetHandler(_FlakyRangeHandler):
    """Cuts the first answer short, then answers a Range request with 206 but the file from
    byte 0 (and says so in Content-Range): appending that would corrupt the song."""

    def do_GET(self):  # noqa: N802
        range_header = self.headers.get("Range")
        type(self).requests.append(range_header)
        self.send_response(206 if range_header else 200)
        self.send_header("Content-Length", str(len(self.payload)))
        if range_header:
            self.send_header("Content-Range", f"bytes 0-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        if len(type(self).requests) == 1:
            self.wfile.write(self.payload[: self.cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(self.payload)


class _NoLengthHandler(_FlakyRangeHandler):
    """HTTP/1.0, no Content-Length: the body ends when the connection closes, here half-way."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.headers.get("Range"))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2])


def test_a_206_from_the_wrong_offset_is_not_appended(tmp_path):
    payload = open(write_tone(tmp_path / "song.flac", 2.0), "rb").read()
    server, handler = _serve(_WrongOffsetHandler, payload=payload, cut=len(payload) // 3)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/000042.flac"
        path = download(url, str(tmp_path / "cache"))
    finally:
        server.shutdown()
    assert open(path, "rb").read() == payload  # restarted from zero, not stitched
    assert handler.requests[0] is None and handler.requests[1].startswith("bytes=")
    assert handler.requests[-1] is None


def test_a_body_of_unknown_length_is_never_cached_as_complete(tmp_path):
    payload = open(write_tone(tmp_path / "song.flac", 2.0), "rb").read()
    server, _ = _serve(_NoLengthHandler, payload=payload)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(DwaveError, match="neither a Content-Length nor chunked framing"):
            download(f"http://127.0.0.1:{server.server_address[1]}/000043.flac", str(cache))
    finally:
        server.shutdown()
    assert not [f for f in os.listdir(cache) if f.endswith(".flac")]  # no complete-looking file


def test_concurrent_downloads_of_one_url_fetch_it_once(tmp_path, flaky_server):
    from concurrent.futures import ProcessPoolExecutor

    url, payload, handler = flaky_server
    cache = str(tmp_path / "cache")
    with ProcessPoolExecutor(3) as pool:
        paths = list(pool.map(download, [url] * 3, [cache] * 3))
    assert len(set(paths)) == 1 and open(paths[0], "rb").read() == payload
    assert len(handler.requests) == 2  # the cut first answer and its resume, nothing more


class _TrickleHandler(_FlakyRangeHandler):
    """Sends the file a few bytes at a time, forever slower than any real download."""

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.headers.get("Range"))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        try:
            for i in range(0, len(self.payload), 4):
                self.wfile.write(self.payload[i:i + 4])
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


@pytest.mark.slow
def test_a_trickling_server_stalls_with_a_clear_error(tmp_path):
    from dwave.store.download import fetch_with_resume

    payload = b"x" * 4000
    server, handler = _serve(_TrickleHandler, payload=payload)
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.flac"
    started = time.monotonic()
    try:
        with pytest.raises(DwaveError, match=r"after 2 attempts: stalled: \d+ bytes in the last 1 s"):
            fetch_with_resume(url, str(tmp_path / "slow.part"), attempts=2, timeout=5,
                              stall_seconds=1.0, stall_bytes=1000)
    finally:
        server.shutdown()
    assert time.monotonic() - started < 10 and len(handler.requests) == 2


def test_a_directory_named_with_a_double_colon_is_a_directory(tmp_path):
    live = tmp_path / "live::2024"
    live.mkdir()
    song = write_tone(live / "encore.mp3", 0.5)
    (source,) = expand_sources([str(tmp_path)]).sources
    assert source.uri == str(song)
    with source.open() as opened:
        assert opened == str(song)  # a path, not a zip member
    assert len(decode_to_mono(str(song), 16000).samples) == 8000


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_a_song_like_any_other(tmp_path):
    from conftest import run_dwave

    songs = tmp_path / "songs"
    songs.mkdir()
    write_tone(songs / "plain.mp3", 0.5)
    song = write_tone(songs / "other.mp3", 0.5, freq=440.0)
    odd = os.path.join(os.fsencode(songs), b"caf\xe9-latin1.mp3")  # not UTF-8
    os.rename(os.fsencode(song), odd)
    ids = sorted(s.track_id for s in expand_sources([str(songs)]).sources)
    assert ids[0].startswith("caf-") and ids[1].startswith("plain-")  # readable, then a hash
    proc = run_dwave("preprocess", songs, "--out", tmp_path / "store", "--no-progress",
                     "--workers", "1", check=0)
    assert "2 written, 0 already done, 0 failed" in proc.stderr, proc.stderr[-2000:]
    info = run_dwave("info", tmp_path / "store", check=0)
    assert "tracks     2 " in info.stdout and "caf\\xe9-latin1.mp3" in info.stdout


@pytest.mark.slow
def test_an_s3_zip_is_expanded_and_its_members_read_by_range(tmp_path, s3_bucket):
    import boto3

    from conftest import run_dwave

    songs = [write_tone(tmp_path / f"00000{i}.mp3", 0.5, freq=300.0 * i) for i in (1, 2)]
    archive = tmp_path / "fma_tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for song in songs:
            z.write(song, f"fma_tiny/000/{os.path.basename(song)}")
        z.writestr("fma_tiny/README.txt", "hello")
    boto3.client("s3").upload_file(str(archive), s3_bucket, "music/fma_tiny.zip")
    run_dwave("preprocess", f"s3://{s3_bucket}/music/fma_tiny.zip", "--out", tmp_path / "s3",
              "--no-progress", "--workers", "1", check=0)
    run_dwave("preprocess", archive, "--out", tmp_path / "local", "--no-progress",
              "--workers", "1", check=0)
    from dwave.store.track_store import TrackStore

    stores = [TrackStore(str(tmp_path / name)) for name in ("s3", "local")]
    tables = [{t: s.read_codes(t).tobytes() for t in s.read_index().tracks.columns["id"]}
              for s in stores]
    assert sorted(tables[0]) == ["1", "2"] and tables[0] == tables[1]
