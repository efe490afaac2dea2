"""`dwave preprocess` and `dwave info` end to end, on real Dask clusters, real files, a real S3."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from dwave.store.audio import decode_to_mono, mu_law_encode
from dwave.store.track_store import TrackStore

from conftest import ASC_MUSIC, ROOT, run_dwave, tone, write_audio
from test_decoders import ffmpeg_decode


def independent_codes(path: str, rate: int = 16000) -> np.ndarray:
    """The codes a track must hold, computed in one process without Dask or Zarr."""
    decoded = decode_to_mono(path, rate)
    return mu_law_encode(decoded.samples / decoded.peak)


def store_contents(url: str) -> dict:
    """Each track's codes and its track table row, but where it lies (part and offset, which
    depend on how a run batched the songs)."""
    store = TrackStore(url)
    return {row["id"]: (store.read_codes(row["id"]),
                        {k: v for k, v in row.items() if k not in ("part", "offset")})
            for row in store.current_index()[0].tracks.rows()}


@pytest.fixture(scope="module")
def long_songs(tmp_path_factory):
    """Eight 40-second 48 kHz stereo FLAC songs: long enough to kill a run in the middle."""
    directory = tmp_path_factory.mktemp("long")
    for i in range(8):
        write_audio(directory / f"{i + 1:06d}.flac", tone(40.0, 48000, 2, freq=200 + 50 * i), 48000)
    return str(directory)


@pytest.mark.slow
def test_end_to_end_with_bad_files_genres_and_resume(tmp_path, corpus):
    songs, genres_csv = corpus
    source = tmp_path / "songs"
    shutil.copytree(songs, source)
    (source / "empty.mp3").write_bytes(b"")
    (source / "notes.mp3").write_text("not audio\n" * 100)
    data = open(source / "000001.mp3", "rb").read()
    (source / "cut.mp3").write_bytes(data[: len(data) // 2])
    sf.write(str(source / "silence.wav"), np.zeros(8000), 16000)
    store = tmp_path / "store"

    proc = run_dwave("preprocess", source, "--out", store, "--workers", "2",
                     "--metadata", genres_csv, "--no-progress", check=0)
    for name, reason in [("empty.mp3", "empty file"), ("notes.mp3", "not a decodable"),
                         ("cut.mp3", "truncated"), ("silence.wav", "all-silent")]:
        assert any(name in line and reason in line for line in proc.stderr.splitlines()), name
    assert "6 written" in proc.stderr and "4 failed" in proc.stderr
    assert "x real time" in proc.stderr and "dashboard http" in proc.stderr

    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert [t["id"] for t in info["tracks"]] == ["1", "2", "3", "4", "5", "6"]
    assert {t["genre"] for t in info["tracks"]} == {"tonal", "chiptune", "percussive"}
    assert all(t["length"] == 8 * 16000 and t["sample_rate"] == 16000 for t in info["tracks"])
    assert sorted(os.path.basename(f["source"]) for f in info["failures"]) == [
        "cut.mp3", "empty.mp3", "notes.mp3", "silence.wav"]
    assert all(f["reason"] for f in info["failures"])
    assert info["hours"] == pytest.approx(6 * 8 / 3600)

    contents = store_contents(str(store))
    for tid in contents:
        expected = independent_codes(str(source / f"{int(tid):06d}.mp3"))
        np.testing.assert_array_equal(contents[tid][0], expected)

    # A rerun skips the finished tracks and the failed files (unchanged: counted, not decoded
    # again), and changes nothing; --retry-failed decodes them again.
    again = run_dwave("preprocess", source, "--out", store, "--workers", "1", "--no-progress",
                      check=0)
    assert "0 to process, 6 already in the store, 4 that failed before" in again.stderr
    again = run_dwave("preprocess", source, "--out", store, "--workers", "1", "--no-progress",
                      "--retry-failed", check=0)
    assert "4 to process, 6 already in the store" in again.stderr
    assert "0 written" in again.stderr and "4 failed" in again.stderr
    after = store_contents(str(store))
    assert after.keys() == contents.keys()
    assert all(np.array_equal(after[t][0], contents[t][0]) for t in after)

    strict = run_dwave("preprocess", source, "--out", store, "--strict", "--no-progress")
    assert strict.returncode == 1 and "4 songs failed (--strict)" in strict.stderr

    table = run_dwave("info", store, check=0).stdout
    assert "6 (0.01 h" in table and "tonal (2)" in table and "failures   4" in table


@pytest.mark.slow
def test_real_mp3_songs_from_asc_music(tmp_path):
    songs = sorted(os.listdir(ASC_MUSIC))
    assert len(songs) == 3, "the asc-music package (installed by scripts/setup.sh) has 3 songs"
    store = tmp_path / "store"
    run_dwave("preprocess", ASC_MUSIC, "--out", store, "--no-progress", check=0)
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert len(info["tracks"]) == 3 and info["failures"] == []
    for track in info["tracks"]:
        source_info = sf.info(track["source"])
        assert source_info.samplerate == 22050 and source_info.channels == 2
        assert track["duration"] > 4 * 60  # full-length songs
        # These MP3s have no Xing header: their length is what decodes, frame by frame, to
        # the end; ffmpeg's decode (a decoder dwave does not drive) is the reference.
        assert track["length_source"] == "decoded"
        frames = len(ffmpeg_decode(track["source"], channels=1))
        assert abs(track["length"] - frames / 22050 * 16000) <= 16


def _complete_tracks_on_disk(store) -> int:
    """Tracks in the store's complete parts, read from the files as another tool would."""
    parts = os.path.join(store, "parts")
    count = 0
    for name in os.listdir(parts) if os.path.isdir(parts) else []:
        try:
            with open(os.path.join(parts, name, "zarr.json")) as f:
                attrs = json.load(f).get("attributes", {})
        except (OSError, ValueError):
            continue
        if attrs.get("complete") is True:
            count += len(attrs["tracks"]["id"])
    return count


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_same_store(tmp_path, long_songs):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    run_dwave("preprocess", long_songs, "--out", reference, "--workers", "1", "--no-progress",
              check=0)

    process = subprocess.Popen(
        [sys.executable, "-m", "dwave.cli", "preprocess", long_songs, "--out", killed,
         "--workers", "1", "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while _complete_tracks_on_disk(killed) < 2:
        assert process.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its Dask workers, mid-run
    process.wait()
    done_before = _complete_tracks_on_disk(killed)
    assert 2 <= done_before < 8

    rerun = run_dwave("preprocess", long_songs, "--out", killed, "--workers", "1",
                      "--no-progress", check=0)
    assert f"{8 - done_before} to process, {done_before} already in the store" in rerun.stderr
    expected, got = store_contents(reference), store_contents(killed)
    assert sorted(got) == sorted(expected) == [str(i) for i in range(1, 9)]
    for tid in expected:
        np.testing.assert_array_equal(got[tid][0], expected[tid][0])
        assert got[tid][1] == expected[tid][1]


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_one_line_and_a_resumable_store(tmp_path, long_songs):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the driver says one
    line, the workers print nothing, and a rerun resumes."""
    store = str(tmp_path / "store")
    process = subprocess.Popen(
        [sys.executable, "-m", "dwave.cli", "preprocess", long_songs, "--out", store,
         "--workers", "1", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while _complete_tracks_on_disk(store) < 1:
        assert process.poll() is None, "the run finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.strip().splitlines()[-1] == ("dwave: interrupted: finished tracks are kept in "
                                               "the store; rerun the same command to resume")
    done = _complete_tracks_on_disk(store)
    rerun = run_dwave("preprocess", long_songs, "--out", store, "--workers", "1",
                      "--no-progress", check=0)
    assert f"{8 - done} to process, {done} already in the store" in rerun.stderr


def test_a_dask_worker_killed_mid_run_does_not_fail_the_run(tmp_path, long_songs):
    from distributed import Client, LocalCluster

    from dwave.store.cluster import ClusterConfig
    from dwave.store.preprocess import run_preprocess

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(summary=run_preprocess(
            [long_songs], str(tmp_path / "store"),
            cluster=ClusterConfig(scheduler=cluster.scheduler_address), progress=False,
            log=lambda *_: None)))
        runner.start()
        deadline = time.time() + 60
        while not any(client.processing().values()):
            assert time.time() < deadline
            time.sleep(0.02)
        time.sleep(0.1)  # let the task get into its decode
        busy = [addr for addr, tasks in client.processing().items() if tasks]
        pids = client.run(os.getpid)
        os.kill(pids[busy[0]], signal.SIGKILL)
        runner.join(180)
        assert not runner.is_alive()
    summary = outcome["summary"]
    assert summary.failures == []
    assert len(summary.written) == 8 and summary.store_tracks == 8
    assert _complete_tracks_on_disk(str(tmp_path / "store")) == 8


@pytest.mark.slow
def test_s3_round_trip_matches_a_local_store(tmp_path, corpus, s3_bucket):
    import boto3

    songs, _ = corpus
    s3 = boto3.client("s3")
    names = sorted(n for n in os.listdir(songs) if n.endswith(".mp3"))[:3]
    for name in names:
        s3.upload_file(os.path.join(songs, name), s3_bucket, f"music/{name}")
    s3.put_object(Bucket=s3_bucket, Key="music/README.txt", Body=b"not a song")

    local = str(tmp_path / "local")
    run_dwave("preprocess", *[os.path.join(songs, n) for n in names], "--out", local,
              "--workers", "1", "--no-progress", check=0)
    remote = f"s3://{s3_bucket}/stores/fma"
    proc = run_dwave("preprocess", f"s3://{s3_bucket}/music", "--out", remote, "--workers", "2",
                     "--no-progress", check=0)
    assert "1 non-audio files ignored" in proc.stderr

    info = json.loads(run_dwave("info", remote, "--json", check=0).stdout)
    assert [t["id"] for t in info["tracks"]] == ["1", "2", "3"]
    assert info["tracks"][0]["source"] == f"s3://{s3_bucket}/music/000001.mp3"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="stores/")["Contents"]}
    assert "stores/fma/zarr.json" in keys and "stores/fma/index/zarr.json" in keys
    assert any(k.startswith("stores/fma/parts/") and k.endswith("/codes/c/0") for k in keys)
    remote_store, local_store = TrackStore(remote), TrackStore(local)
    for tid in ("1", "2", "3"):
        np.testing.assert_array_equal(remote_store.read_codes(tid), local_store.read_codes(tid))

    again = run_dwave("preprocess", f"s3://{s3_bucket}/music", "--out", remote, "--no-progress",
                      check=0)
    assert "0 to process, 3 already in the store" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["preprocess", "{src}", "--out", "{tmp}/s", "--storage-options", "nope"], "not valid JSON"),
    (["preprocess", "{tmp}/missing", "--out", "{tmp}/s"], "no such file or directory"),
    (["preprocess", "{src}", "--out", "{tmp}/s", "--workers", "0"], "positive integer"),
    (["preprocess", "{src}", "--out", "{tmp}/s", "--quantization-channels", "1"], "2..65536"),
    (["preprocess", "{src}", "--out", "{tmp}/s", "--metadata", "{tmp}/none.csv"], "cannot read"),
    (["info", "{tmp}/nothing-here"], "not a dwave store"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    src = write_audio(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    proc = run_dwave(*[a.format(src=src, tmp=tmp_path) for a in args])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_store_settings_must_match_unless_overwritten(tmp_path):
    src = write_audio(tmp_path / "a.wav", tone(0.5, 22050), 22050)
    store = tmp_path / "s"
    run_dwave("preprocess", src, "--out", store, "--sample-rate", "8000", "--workers", "1",
              "--no-progress", check=0)
    clash = run_dwave("preprocess", src, "--out", store, "--sample-rate", "16000")
    assert clash.returncode == 2 and "--sample-rate 8000" in clash.stderr
    run_dwave("preprocess", src, "--out", store, "--sample-rate", "16000", "--overwrite",
              "--workers", "1", "--no-progress", check=0)
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert info["sample_rate"] == 16000 and info["tracks"][0]["length"] == 8000


def test_no_good_file_is_a_failure(tmp_path):
    (tmp_path / "bad.mp3").write_text("nope")
    proc = run_dwave("preprocess", tmp_path / "bad.mp3", "--out", tmp_path / "s", "--workers", "1",
                     "--no-progress")
    assert proc.returncode == 1 and "no track could be written" in proc.stderr


@pytest.mark.slow
def test_a_different_song_with_a_stored_id_is_reported_not_swapped_in(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    write_audio(first / "000002.wav", tone(0.5, 16000, freq=300.0), 16000)
    write_audio(second / "2.wav", tone(0.7, 16000, freq=900.0), 16000)
    store = tmp_path / "store"
    run_dwave("preprocess", first, "--out", store, "--workers", "1", "--no-progress", check=0)
    before = json.loads(run_dwave("info", store, "--json", check=0).stdout)["tracks"]
    proc = run_dwave("preprocess", second, "--out", store, "--workers", "1", "--no-progress",
                     check=0)
    assert f"FAILED {second}/2.wav: track id 2 is already in the store from {first}/000002.wav" \
        in proc.stderr
    after = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert after["tracks"] == before and after["tracks"][0]["length"] == 8000
    # The same song again, even moved elsewhere, is a resume: nothing to do, no failure.
    moved = tmp_path / "moved"
    first.rename(moved)
    again = run_dwave("preprocess", moved, "--out", store, "--workers", "1", "--no-progress",
                      check=0)
    assert "0 to process, 1 already in the store" in again.stderr and "FAILED" not in again.stderr


@pytest.mark.slow
def test_metadata_on_a_rerun_relabels_finished_tracks_and_reports_unknown_ids(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    for n in (1, 2):
        write_audio(songs / f"00000{n}.wav", tone(0.3, 16000, freq=200.0 * n), 16000)
    store = tmp_path / "store"
    csv1 = tmp_path / "a.csv"
    csv1.write_text("track_id,genre\n1,rock\n2,rock\n")
    run_dwave("preprocess", songs, "--out", store, "--metadata", csv1, "--workers", "1",
              "--no-progress", check=0)
    # A spreadsheet export: byte-order mark, a changed genre, an id that matches nothing.
    csv2 = tmp_path / "b.csv"
    csv2.write_bytes("\ufefftrack_id,genre\n1,jazz\n2,rock\n77,folk\n".encode("utf-8"))
    proc = run_dwave("preprocess", songs, "--out", store, "--metadata", csv2, "--workers", "1",
                     "--no-progress", check=0)
    assert "genre set on 1 finished track(s)" in proc.stderr
    assert "1 track id(s) match no song here or in the store (e.g. 77)" in proc.stderr
    info = json.loads(run_dwave("info", store, "--json", check=0).stdout)
    assert {t["id"]: t["genre"] for t in info["tracks"]} == {"1": "jazz", "2": "rock"}


@pytest.mark.slow
def test_a_zip_bomb_song_is_a_bounded_failure(tmp_path):
    """A small zip holding a long song (a quiet tone compresses ~100x): reported as too long
    instead of decoded into a worker's memory; the short song beside it is processed."""
    import zipfile

    long_song = write_audio(tmp_path / "000001.wav", tone(120.0, 8000, amplitude=0.001), 8000)
    short_song = write_audio(tmp_path / "000002.wav", tone(1.0, 8000), 8000)
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(long_song, "000001.wav")
        z.write(short_song, "000002.wav")
    assert archive.stat().st_size < os.path.getsize(long_song) / 3
    proc = run_dwave("preprocess", archive, "--out", tmp_path / "store", "--workers", "1",
                     "--no-progress", "--max-song-minutes", "1", check=0)
    assert f"FAILED {archive}::000001.wav: too long: its header declares 2 min, more than " \
           "the 60 s allowed (--max-song-minutes)" in proc.stderr
    info = json.loads(run_dwave("info", tmp_path / "store", "--json", check=0).stdout)
    assert [t["id"] for t in info["tracks"]] == ["2"]


@pytest.mark.slow
def test_two_runs_creating_one_store_at_once_lose_nothing(tmp_path, long_songs):
    """Both start on a new store at the same moment: no crash, every song stored once. (Both
    may write the same track: the later write replaces the earlier with the same codes. Should
    either stop, it says so in one line and a rerun is a resume.)"""
    store = str(tmp_path / "store")
    runs = [subprocess.Popen([sys.executable, "-m", "dwave.cli", "preprocess", long_songs,
                              "--out", store, "--workers", "1", "--no-progress",
                              "--dashboard-address", "127.0.0.1:0"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode in (0, 2), output
        if run.returncode == 2:
            assert output.strip().splitlines()[-1].startswith("dwave: error: --out"), output
    assert any(run.returncode == 0 for run in runs)
    assert _complete_tracks_on_disk(store) == 8
    again = run_dwave("preprocess", long_songs, "--out", store, "--workers", "1",
                      "--no-progress", check=0)
    assert "0 to process, 8 already in the store" in again.stderr
