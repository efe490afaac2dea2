"""Preprocess never deletes what it did not write: a non-store --out is refused (even with
--overwrite), a store that overlaps a source is refused, a damaged store is an error naming the
damage (never wiped as "no store"), and --overwrite of a real store removes only its own parts.
Locally and on a real S3 endpoint (moto's server)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import (make_store, run_dwave, start_moto_server, synthetic_codes, tone,
                      write_audio)


def tree(path) -> dict[str, bytes]:
    """Every file under `path` with its bytes: to show nothing changed."""
    out = {}
    for directory, _, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def refused(*args, cwd=None, message: str) -> str:
    proc = run_dwave("preprocess", *args, "--workers", "1", "--no-progress", cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and message in lines[-1], proc.stderr[-2000:]
    assert len([l for l in lines if l.startswith("dwave: error")]) == 1
    return lines[-1]


@pytest.fixture
def song(tmp_path) -> str:
    songs = tmp_path / "songs"
    songs.mkdir()
    return write_audio(songs / "a.wav", tone(0.5, 22050), 22050)


def test_a_location_holding_other_files_is_refused_even_with_overwrite(tmp_path, song):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    (notes / "sub").mkdir()
    (notes / "sub" / "more.txt").write_text("more")
    before = tree(notes)
    for extra in ([], ["--overwrite"]):
        line = refused(song, "--out", notes, *extra, message="is not a dwave store")
        assert "holds 2 entries" in line and "'todo.txt'" in line
    assert tree(notes) == before

    # `--out .` in a directory with files in it
    refused(song, "--out", ".", "--overwrite", cwd=notes, message="is not a dwave store")
    assert tree(notes) == before

    # a regular file
    (tmp_path / "file").write_text("x")
    refused(song, "--out", tmp_path / "file", message="is a file, not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_a_store_that_is_in_or_around_a_source_is_refused(tmp_path, song):
    songs = os.path.dirname(song)
    before = tree(songs)
    for out in (songs, os.path.join(songs, "store"), tmp_path):
        refused(songs, "--out", out, "--overwrite", message="overlaps the source")
    refused(os.path.join(songs, "*.wav"), "--out", songs, message="overlaps the source")
    assert tree(songs) == before


@pytest.mark.slow
def test_a_damaged_store_is_an_error_not_an_empty_place(tmp_path, song):
    store = tmp_path / "store"
    run_dwave("preprocess", song, "--out", store, "--workers", "1", "--no-progress", check=0)
    root = store / "zarr.json"
    root.write_bytes(root.read_bytes()[:40])  # truncated, as by a full disk
    before = tree(store)
    for extra in ([], ["--overwrite"]):
        line = refused(song, "--out", store, *extra, message="root metadata zarr.json is damaged")
        assert "nothing was changed" in line
    assert tree(store) == before


@pytest.mark.slow
def test_overwrite_replaces_only_what_the_store_wrote(tmp_path, song):
    store = tmp_path / "store"
    run_dwave("preprocess", song, "--out", store, "--sample-rate", "8000", "--workers", "1",
              "--no-progress", check=0)
    (store / "README.txt").write_text("the user's note beside the store")
    run_dwave("preprocess", song, "--out", store, "--sample-rate", "16000", "--overwrite",
              "--workers", "1", "--no-progress", check=0)
    assert (store / "README.txt").read_text() == "the user's note beside the store"
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert info["sample_rate"] == 16000 and [t["length"] for t in info["tracks"]] == [8000]

    # An --overwrite interrupted after it removed the tracks: a one-line error saying how to
    # finish, and finishing works.
    import shutil

    shutil.rmtree(store / "parts")
    refused(song, "--out", store,
            message="has no parts group (an --overwrite that was interrupted?)")
    run_dwave("preprocess", song, "--out", store, "--overwrite", "--workers", "1", "--no-progress",
              check=0)
    assert (store / "README.txt").exists()


@pytest.mark.slow
def test_s3_bucket_root_or_prefix_with_other_objects_is_refused(s3_bucket, song):
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="photos/cat.jpg", Body=b"meow")
    s3.put_object(Bucket=s3_bucket, Key="data/notes.txt", Body=b"notes")
    for out in (f"s3://{s3_bucket}", f"s3://{s3_bucket}/", f"s3://{s3_bucket}/data"):
        refused(song, "--out", out, "--overwrite", message="is not a dwave store")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == ["data/notes.txt", "photos/cat.jpg"]
    # an empty prefix is a new store
    run_dwave("preprocess", song, "--out", f"s3://{s3_bucket}/store", "--workers", "1",
              "--no-progress", check=0)
    assert s3.get_object(Bucket=s3_bucket, Key="data/notes.txt")["Body"].read() == b"notes"


@pytest.mark.slow
def test_sources_and_store_have_their_own_storage_options(s3_bucket, s3_endpoint, tmp_path, song):
    """Songs in a bucket on a second S3 endpoint, named only in --source-storage-options; the
    store on the default endpoint (AWS_ENDPOINT_URL). Shared options would send the store's
    writes to the songs' endpoint."""
    import boto3

    other, songs_endpoint = start_moto_server()
    try:
        songs_s3 = boto3.client("s3", endpoint_url=songs_endpoint)
        songs_s3.create_bucket(Bucket="public-songs")
        songs_s3.upload_file(song, "public-songs", "a.wav")
        options = json.dumps({"endpoint_url": songs_endpoint})
        run_dwave("preprocess", "s3://public-songs/", "--source-storage-options", options,
                  "--out", f"s3://{s3_bucket}/store", "--workers", "1", "--no-progress", check=0)
        store_keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
            Bucket=s3_bucket)["Contents"]]
        assert "store/zarr.json" in store_keys
        assert [o["Key"] for o in songs_s3.list_objects_v2(Bucket="public-songs")["Contents"]] \
            == ["a.wav"]  # nothing of the store went to the songs' endpoint
        info = json.loads(run_dwave("info", f"s3://{s3_bucket}/store", "--json", check=0).stdout)
        assert [t["source"] for t in info["tracks"]] == ["s3://public-songs/a.wav"]
    finally:
        other.terminate()
        other.wait(10)


def test_a_closed_pipe_ends_dwave_info_quietly(tmp_path):
    import subprocess
    import sys

    store = tmp_path / "store"
    make_store(str(store), {"a": (synthetic_codes(0.5), "tone")})
    # The reader is gone before dwave writes a byte: every write meets a closed pipe.
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "dwave.cli", "info", str(store)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_a_missing_bucket_or_an_unwritable_place_is_one_line(s3_bucket, song, tmp_path):
    line = refused(song, "--out", "s3://no-such-bucket-here/store",
                   message="--out s3://no-such-bucket-here/store: cannot write the store")
    assert "The specified bucket does not exist" in line
    # Below a regular file: nothing can be created there (root ignores permission bits, but
    # not this).
    (tmp_path / "plain").write_text("x")
    refused(song, "--out", tmp_path / "plain" / "store", message="cannot")
    assert (tmp_path / "plain").read_text() == "x"


@pytest.mark.slow
def test_names_with_control_characters_are_printed_escaped(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    write_audio(songs / "good\x1b[2Jsong.wav", tone(0.3, 16000), 16000)
    (songs / "bad\nFAILED nothing.mp3").write_bytes(b"not audio")
    store = tmp_path / "store"
    proc = run_dwave("preprocess", songs, "--out", store, "--workers", "1", "--no-progress",
                     check=0)
    assert "\x1b" not in proc.stderr and "bad\\x0aFAILED nothing.mp3" in proc.stderr
    info = run_dwave("info", store, check=0).stdout
    assert "\x1b" not in info and "good\\x1b[2Jsong.wav" in info


@pytest.mark.slow
def test_a_full_disk_while_writing_the_index_is_one_line_and_keeps_the_tracks(small_disk,
                                                                             tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    for n in range(1, 4):
        write_audio(songs / f"00000{n}.wav", tone(2.0, 16000, freq=150.0 * n), 16000)
    store = small_disk / "store"
    run_dwave("preprocess", songs, "--out", store, "--workers", "1", "--no-progress", check=0)
    before = tree(store)
    filler = small_disk / "filler"  # the rest of the disk taken by someone else's file
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    # A rerun whose only song is a bad file: no part to write, only the index (its failure),
    # and the disk is full. (A rerun with nothing new writes nothing at all.)
    (songs / "000004.wav").write_text("not audio")
    proc = run_dwave("preprocess", songs, "--out", store, "--workers", "1", "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dwave: error: cannot write the index of {store} (") and \
        "No space left on device" in line and "rerun the same command" in line, line
    assert not [p for p in tree(store) if p.endswith(".partial")]  # no half-written index left
    filler.unlink()
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert sorted(t["id"] for t in info["tracks"]) == ["1", "2", "3"]
    after = tree(store)
    assert {k: v for k, v in after.items() if "/c/" in k} == \
        {k: v for k, v in before.items() if "/c/" in k}  # every track's chunks unchanged


@pytest.mark.slow
def test_a_read_only_location_is_one_line_for_every_command(tmp_path, song, trained_run,
                                                            tone_store):
    """A real read-only file system (root ignores permission bits, not this)."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        refused(song, "--out", ro / "store", message=f"--out {ro}/store: cannot write the store")
        for args, message in [
                (("generate", trained_run, "--out", ro / "songs", "--genre", "tone"),
                 f"--out {ro}/songs: cannot write there (Read-only file system)"),
                (("train", tone_store, "--run-dir", ro / "run", "--steps", "1"),
                 f"cannot create {ro}/run/lock")]:
            proc = run_dwave(*args, timeout=300)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


class _S3ErrorHandler:
    """An S3 endpoint that answers every request with one error: 403 AccessDenied (wrong
    credentials) or 503 SlowDown (a misbehaving server)."""

    @staticmethod
    def serve(status: int, code: str):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>{code}</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server


@pytest.mark.parametrize("status, code, message", [
    (403, "AccessDenied", "cannot read it"),
    # s3fs retries a SlowDown with backoff before it gives up: seconds.
    pytest.param(503, "SlowDown", "cannot tell what is there", marks=pytest.mark.slow)])
def test_s3_errors_while_checking_the_store_are_errors_not_an_empty_place(status, code, message,
                                                                         song):
    server = _S3ErrorHandler.serve(status, code)
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        proc = run_dwave("preprocess", song, "--out", "s3://bucket/store", "--workers", "1",
                         "--no-progress", "--overwrite", timeout=300,
                         env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "wrong",
                              "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1",
                              "AWS_MAX_ATTEMPTS": "2"})
    finally:
        server.shutdown()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dwave: error: --out s3://bucket/store: ") and message in line, line


def _prepare_in_a_process(url, rate, start, results):
    from dwave.errors import DwaveError
    from dwave.store.track_store import TrackStore

    start.wait()
    try:
        TrackStore(url).prepare(rate, None, False)
        results.put("ok")
    except DwaveError as exc:
        results.put(str(exc))
    except Exception as exc:  # the crash this test is for
        results.put(f"crash: {type(exc).__name__}: {exc}")


def test_runs_creating_one_store_at_once_all_find_it(tmp_path):
    """Six processes create the same new store at the same instant, five times over: every one
    gets the store (zarr's check-then-create races are absorbed; nobody sees a root without its
    attributes)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    outcomes = []
    for attempt in range(5):
        url = str(tmp_path / f"store{attempt}")
        start, results = context.Barrier(6), context.Queue()
        runs = [context.Process(target=_prepare_in_a_process, args=(url, None, start, results))
                for _ in range(6)]
        for run in runs:
            run.start()
        outcomes += [results.get(timeout=60) for _ in runs]
        for run in runs:
            run.join()
    assert outcomes == ["ok"] * 30


def test_a_root_caught_half_written_is_waited_for_not_refused(tmp_path):
    """Zarr writes zarr.json as zarr.<uuid>.partial and renames it: a run that lists the place
    in between sees the groups and that file. It is a store being created (wait), not a place
    holding someone else's files (refuse): the race that made one of 40 runs of the test above
    fail."""
    import threading
    import uuid

    from dwave.store.track_store import TrackStore

    url = tmp_path / "store"
    TrackStore(str(url)).prepare(None, None, False)
    root, partial = url / "zarr.json", url / f"zarr.{uuid.uuid4().hex}.partial"
    root.rename(partial)
    finish = threading.Timer(0.25, partial.rename, args=(root,))
    finish.start()
    try:
        assert TrackStore(str(url)).location_state() == "store"
    finally:
        finish.join()


def test_a_store_created_meanwhile_with_other_settings_is_not_relabelled(tmp_path):
    from dwave.errors import DwaveError
    from dwave.store.track_store import TrackStore

    url = str(tmp_path / "store")
    TrackStore(url).prepare(8000, None, False)
    late = TrackStore(url)  # found the place empty a moment ago, and creates it now
    with pytest.raises(DwaveError, match="another run created this store at the same moment"):
        late._create({"dwave_store_version": 1, "sample_rate": 16000,
                       "quantization_channels": 256})
    assert TrackStore(url).config().sample_rate == 8000


@pytest.mark.slow  # preprocess runs end to end
def test_a_damaged_index_is_an_error_for_readers_and_rebuilt_from_the_parts_by_preprocess(
        tmp_path, song):
    """The parts are the truth: a cut-short index/zarr.json stops `info` with one line saying
    what to do, and the rerun it names rebuilds the index without decoding anything."""
    store = tmp_path / "store"
    run_dwave("preprocess", song, "--out", store, "--workers", "1", "--no-progress", check=0)
    before = json.loads(run_dwave("info", store, "--json", check=0).stdout)["tracks"]
    index = store / "index" / "zarr.json"
    index.write_bytes(index.read_bytes()[:40])
    info = run_dwave("info", store)
    assert info.returncode == 2 and info.stderr.strip().splitlines()[-1] == (
        f"dwave: error: store {store}: index/zarr.json is damaged: rerun `dwave preprocess` on "
        "the store to rebuild it from its parts")
    rerun = run_dwave("preprocess", song, "--out", store, "--workers", "1", "--no-progress",
                      check=0)
    assert "its index is damaged; rebuilding it from the parts" in rerun.stderr
    assert "0 to process, 1 already in the store" in rerun.stderr
    assert json.loads(run_dwave("info", store, "--json", check=0).stdout)["tracks"] == before


@pytest.mark.slow
def test_a_store_deleted_or_replaced_under_a_stream_reader_says_so(tmp_path):
    import shutil

    from dwave.store.cluster import ClusterConfig
    from dwave.train.data import open_samplers, scan_store
    from dwave.errors import DwaveError
    from dwave.store.preprocess import run_preprocess

    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(4):
        write_audio(songs / f"{i}.wav", tone(1.0, 16000, freq=300.0 * (i + 1)), 16000)
    url = str(tmp_path / "store")

    def preprocess(**flags):
        run_preprocess([str(songs)], url, cluster=ClusterConfig(workers=1), progress=False,
                       log=lambda *_: None, **flags)

    preprocess()
    data = open_samplers(scan_store(url), 1000, 2, 0, mode="stream")
    assert len(data.train.read([(0, 0, 1000)])[0]) == 1000  # it reads
    # The same songs again, at another rate, over the store: a new store under the reader.
    first = data.train.read([(0, 0, 1000)])[0].copy()
    preprocess(overwrite=True, sample_rate=8000)
    # A local reader keeps its files open: it goes on reading what it started on (the old
    # files' codes, whole: never zeros, never the new rate's) ...
    np.testing.assert_array_equal(data.train.read([(0, 0, 1000)])[0], first)

    def read_in_a_new_thread():  # ... and a file opened anew (another thread's) says why not
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(data.train.read, [(0, 0, 1000)]).result()

    with pytest.raises(DwaveError, match="was replaced while this job read it .its store_id "
                                         "changed"):
        read_in_a_new_thread()
    shutil.rmtree(url)
    with pytest.raises(DwaveError, match="is gone .deleted, moved or being rewritten while this "
                                         "job read it"):
        read_in_a_new_thread()


@pytest.mark.slow
def test_a_damaged_part_stops_training_or_is_skipped_and_verify_repair_lets_a_rerun_redo_it(
        tmp_path):
    from dwave.store.cluster import ClusterConfig
    from dwave.train.data import open_samplers, scan_store
    from dwave.errors import DwaveError
    from dwave.store.info import describe_store
    from dwave.store.preprocess import run_preprocess

    songs = tmp_path / "songs"
    songs.mkdir()
    for i in range(6):
        write_audio(songs / f"{i}.wav", tone(1.0, 16000, freq=200.0 * (i + 1)), 16000)
    url = str(tmp_path / "store")

    def preprocess():
        return run_preprocess([str(songs)], url, cluster=ClusterConfig(workers=2),
                              progress=False, log=lambda *_: None)

    preprocess()
    assert run_dwave("store", "verify", url).returncode == 0
    scan = scan_store(url)
    victim = scan.tracks[0]
    shard = tmp_path / "store" / "parts" / victim.part / "codes" / "c" / "0"
    original = shard.read_bytes()
    shard.write_bytes(original[:1000])  # cut short, as a full disk or a killed copy leaves it
    in_part = sorted(t.id for t in scan.tracks if t.part == victim.part)

    with pytest.raises(DwaveError, match=rf"{len(in_part)} track\(s\) in 1 damaged part\(s\) "
                                         rf"\(e.g. parts/{victim.part}: shard 0 holds 1000 bytes"):
        open_samplers(scan, 1000, 2, 0, mode="stream")
    data = open_samplers(scan, 1000, 2, 0, mode="stream", on_bad_track="skip")
    assert sorted(t.id for t in data.left_out["damaged"]) == in_part
    kept = data.train.tracks + (data.validation.tracks if data.validation else [])
    assert {t.id for t in kept} == {t.id for t in scan.tracks} - set(in_part)

    train = ["train", url, "--steps", "2", "--window", "256", "--batch-size", "2",
             "--listen-seconds", "0"]
    proc = run_dwave(*train, "--run-dir", tmp_path / "stopped")
    assert proc.returncode == 2 and "damaged part(s)" in proc.stderr.strip().splitlines()[-1]
    proc = run_dwave(*train, "--run-dir", tmp_path / "skipped", "--on-bad-track", "skip",
                     check=0)
    assert f"warning: left out {len(in_part)} track(s) whose shards are missing" in proc.stderr

    proc = run_dwave("store", "verify", url)
    assert proc.returncode == 1, proc.stderr
    assert f"parts/{victim.part}: shard 0 holds 1000 bytes" in proc.stderr
    described = describe_store(url)  # dwave info counts what is really there
    assert described["num_tracks"] == 6 - len(in_part)
    assert described["damaged"] == {"parts": {victim.part: "shard 0 holds 1000 bytes, not "
                                              f"{len(original)}"}, "tracks": len(in_part)}
    proc = run_dwave("store", "verify", url, "--repair", check=0)
    assert f"moved parts/{victim.part} to {url}/damaged/{victim.part}-" in proc.stderr
    (aside,) = (tmp_path / "store" / "damaged").iterdir()
    assert (aside / "codes" / "c" / "0").read_bytes() == original[:1000]  # kept as it was
    assert describe_store(url)["num_tracks"] == 6 - len(in_part)  # info agrees with what is there
    summary = preprocess()  # the rerun writes them again
    assert sorted(r["track_id"] for r in summary.written) == in_part
    assert run_dwave("store", "verify", url).returncode == 0
    assert describe_store(url)["num_tracks"] == 6

    # Without --repair: a preprocess rerun finds the damage itself, sets the part aside and
    # writes its songs again.
    redone = scan_store(url).tracks[-1]
    shard = tmp_path / "store" / "parts" / redone.part / "codes" / "c" / "0"
    shard.unlink()
    lines = []
    summary = run_preprocess([str(songs)], url, cluster=ClusterConfig(workers=2),
                             progress=False, log=lines.append)
    assert any(f"parts/{redone.part} is damaged (shard 0 is missing): moved to" in line
               for line in lines), lines
    assert redone.id in [r["track_id"] for r in summary.written]
    assert run_dwave("store", "verify", url).returncode == 0


def test_wrong_s3_keys_are_access_denied_not_a_missing_store(tmp_path):
    server, endpoint = start_moto_server(check_credentials=True)
    try:
        env = {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong",
               "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        proc = run_dwave("info", "s3://music/store", env=env)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "access denied: check the credentials" in line, line
        assert "not a dwave store" not in line
    finally:
        server.terminate()
        server.wait(10)


def test_a_sample_rate_out_of_range_is_one_line_before_anything_is_written(tmp_path, song):
    for rate in ("10000000", "10"):
        proc = run_dwave("preprocess", song, "--out", tmp_path / "store", "--sample-rate", rate)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"--sample-rate {rate}: must be between 1000 and 192000 Hz" in proc.stderr
    assert not (tmp_path / "store").exists()
