"""A run's weights are only ever its own: checkpoints carry the model they hold, another run's
or another tool's are refused, and a resume that changes flags says so and keeps scoring the
same validation windows."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_store, run_dwave, synthetic_codes
from dwave.errors import DwaveError
from dwave.train.config import TrainConfig, resume_changes

FAST = ["--batch-size", "2", "--listen-seconds", "0", "--warmup-steps", "0"]


def error_of(*args) -> str:
    proc = run_dwave(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_resume_changes_name_each_flag_and_refuse_what_a_resume_cannot_change():
    saved = {**TrainConfig(store="s").__dict__, "window": 256, "seed": 3}
    changes = resume_changes(saved, TrainConfig(store="s", window=512, seed=3))
    assert changes == ["--window 512 (was 256)"]
    assert resume_changes(saved, TrainConfig(store="s", window=256, seed=3,
                                             steps=9000)) == []  # more steps: nothing to say
    with pytest.raises(DwaveError, match="optimizer state is saved in that form"):
        resume_changes({**saved, "precision": "mixed"}, TrainConfig(store="s", window=256))
    with pytest.raises(DwaveError, match="would train on its validation tracks"):
        resume_changes(saved, TrainConfig(store="s", window=256, seed=3,
                                          validation_fraction=0.3))


@pytest.mark.slow
def test_generate_refuses_another_runs_checkpoint_naming_the_difference(trained_run, tmp_path):
    # The case: an 8 kHz unconditioned run of the same layer sizes.
    store = make_store(str(tmp_path / "store-8k"), {
        str(i): (synthetic_codes(3.0, rate=8000, seed=i), "x") for i in range(4)}, rate=8000)
    other = tmp_path / "other"
    run_dwave("train", store, "--run-dir", other, "--steps", "2", "--window", "256", *FAST,
              check=0)
    out = ["--out", str(tmp_path / "songs"), "--genre", "tone", "--seconds", "0.1"]
    line = error_of("generate", trained_run, *out, "--checkpoint",
                    other / "checkpoints" / "ckpt-2")
    assert "holds another model than" in line
    assert "sample_rate 8000 (the run's: 16000)" in line
    assert "condition_values [] (the run's: ['chirp', 'tone'])" in line
    assert not (tmp_path / "songs").exists() or not any((tmp_path / "songs").iterdir())

    # A checkpoint that records no model (written by TensorFlow directly, as another tool or
    # an older dwave would) is refused outside the run's own checkpoints/ folder.
    import tensorflow as tf

    from dwave.model.network import WaveNet
    from dwave.model.rundir import read_run_config

    config, _ = read_run_config(str(trained_run))
    bare = tf.train.Checkpoint(model=WaveNet(config)).write(str(tmp_path / "bare" / "ckpt"))
    line = error_of("generate", trained_run, *out, "--checkpoint", bare)
    assert "does not record which model it holds" in line

    # The run's own checkpoint generates.
    proc = run_dwave("generate", trained_run, *out, "--checkpoint",
                     trained_run / "checkpoints" / "ckpt-30", check=0)
    assert (tmp_path / "songs" / "song-000.wav").exists(), proc.stderr[-1000:]


@pytest.mark.slow
def test_a_run_dir_holding_another_tools_checkpoints_is_refused_and_left_alone(tone_store,
                                                                               tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    theirs = {"checkpoint": "model_checkpoint_path: \"model.ckpt-7\"\n",
              "model.ckpt-7.index": "their index", "notes.txt": "my notes"}
    for name, text in theirs.items():
        (run / "checkpoints" / name).write_text(text)
    line = error_of("train", tone_store, "--run-dir", run, "--steps", "2", "--window", "256",
                    *FAST)
    assert "holds files dwave did not write (model.ckpt-7.index, notes.txt)" in line
    assert "use a new --run-dir" in line
    assert {p.name: p.read_text() for p in (run / "checkpoints").iterdir()} == theirs
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


@pytest.mark.slow
def test_a_resume_with_other_flags_says_so_and_scores_the_same_validation_windows(tone_store,
                                                                                  tmp_path):
    run = tmp_path / "run"
    common = ["--val-every", "2", *FAST]
    run_dwave("train", tone_store, "--run-dir", run, "--steps", "2", "--window", "256",
              *common, check=0)
    first = json.loads((run / "validation.json").read_text())
    assert first["windows"] == {"window": 256, "batch_size": 2, "seed": 0, "val_batches": 8}

    proc = run_dwave("train", tone_store, "--run-dir", run, "--steps", "4", "--window", "512",
                     "--seed", "5", *common, check=0)
    assert "flags changed since the run's last start: --window 512 (was 256); --seed 5 " \
        "(was 0)" in proc.stderr
    assert "Validation keeps the run's windows (window 256, batch 2, seed 0" in proc.stderr
    resumed = json.loads((run / "validation.json").read_text())
    assert resumed["windows"] == first["windows"]
    # The baselines are computed anew at each start, on the validation windows: equal to the
    # last digit means the same windows were scored.
    assert resumed["baselines"] == first["baselines"]
    assert [h["step"] for h in resumed["history"]] == [2, 4]

    # The same flags on a new run draw other windows: the comparison above can fail.
    fresh = tmp_path / "fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    run_dwave("train", tone_store, "--run-dir", fresh, "--steps", "2", "--window", "512",
              "--seed", "5", *common, check=0)
    assert json.loads((fresh / "validation.json").read_text())["baselines"] != first["baselines"]


@pytest.mark.slow
def test_a_symlink_at_the_run_dirs_lock_is_not_followed(tone_store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "thesis.tex"
    target.write_text("three years of work")
    (run / "lock").symlink_to(target)
    line = error_of("train", tone_store, "--run-dir", run, "--steps", "2", "--window", "256",
                    *FAST)
    assert "lock is a symlink; dwave does not follow it" in line
    assert target.read_text() == "three years of work"


@pytest.mark.slow
def test_an_unwritable_tensorboard_folder_is_one_line_and_the_run_resumes(tone_store,
                                                                          tmp_path):
    import subprocess

    run = tmp_path / "run"
    tensorboard = run / "tensorboard"
    tensorboard.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(tensorboard)], check=True)  # immutable, even for root
    try:
        line = error_of("train", tone_store, "--run-dir", run, "--steps", "2", "--window",
                        "256", *FAST)
    finally:
        subprocess.run(["chattr", "-i", str(tensorboard)], check=True)
    assert f"cannot write TensorBoard logs in {tensorboard}/train" in line
    assert "the run resumes from its checkpoint" in line
    proc = run_dwave("train", tone_store, "--run-dir", run, "--steps", "2", "--window", "256",
                     *FAST, check=0)
    assert "resuming from" in proc.stderr


@pytest.mark.slow
def test_generate_seconds_shorter_than_a_sample_is_one_line(trained_run, tmp_path):
    line = error_of("generate", trained_run, "--out", tmp_path / "o", "--seconds", "1e-5",
                    "--genre", "tone")
    assert "--seconds 1e-05 is less than one sample at 16000 Hz" in line


@pytest.mark.slow
def test_generate_asking_for_more_than_a_wav_or_the_disk_holds_is_one_line_before_any_work(
        trained_run, tmp_path, small_disk):
    # Songs go to disk as they are made, so what bounds --seconds is the file and the disk.
    line = error_of("generate", trained_run, "--out", tmp_path / "o", "--seconds", "1e7",
                    "--genre", "tone")
    assert "a WAV holds at most 37.3 h of 16-bit audio at 16000 Hz" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # 2 songs of 60 s: 3.8 MB of WAVs and 1.9 MB of their codes while they are made, on a
    # 1.2 MB disk.
    line = error_of("generate", trained_run, "--out", small_disk / "o", "--seconds", "60",
                    "--num-songs", "2", "--genre", "tone")
    assert f"--out {small_disk / 'o'}: 2 song(s) of 960,000 samples need ~5.8 MB, more " \
           "than the 1.2 MB free there" in line
    assert "free there: ask for fewer --seconds or --num-songs" in line
    assert not any((small_disk / "o").iterdir())
    # What a batch holds in memory (its songs' caches, a chunk of draws) is bounded up front.
    line = error_of("generate", trained_run, "--out", tmp_path / "o", "--num-songs", str(10**9),
                    "--batch-size", str(10**9), "--genre", "tone")
    assert "1000000000 song(s) per rank x 1 rank(s) on this node need ~" in line
    assert "GiB available: ask for a smaller --batch-size" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
