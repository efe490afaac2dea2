"""Training end to end through the command line: loss falls, 2 Horovod ranks (horovodrun and
mpirun) stay identical and equal one big-batch step, checkpoints survive SIGKILL and SIGTERM,
an S3 store trains, and bad runs are one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import MPI_ENV, ROOT, dwave_here, make_store, run_dwave, synthetic_codes

VENV_BIN = os.path.dirname(sys.executable)
FAST = ["--window", "256", "--batch-size", "2", "--val-every", "1000", "--listen-seconds", "0"]


def checkpoint_steps(run_dir) -> list[int]:
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for f in os.listdir(directory)
                  if (m := re.fullmatch(r"ckpt-(\d+)\.index", f)))


def latest_step(run_dir) -> int | None:
    state = os.path.join(run_dir, "checkpoints", "checkpoint")
    if not os.path.exists(state):
        return None
    m = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', open(state).read())
    return int(m.group(1)) if m else None


def rank_digests(output: str) -> list[str]:
    return re.findall(r"rank \d+ weights sha256 ([0-9a-f]{64})", output)


@pytest.mark.slow
def test_real_music_with_default_flags_goes_below_the_bigram_and_writes_samples(music_store,
                                                                             tmp_path):
    """The tiny preset at its default rate, on real songs: validation below the store's own
    bigram baseline by step 300 (measured: about 0.3 bit below; 0.5 bit above at a tenth of
    that rate, and above even the code histogram with the rate that never reached Adam)."""
    run = tmp_path / "run"
    proc = run_dwave("train", music_store, "--run-dir", run, "--steps", "300", "--val-every",
                     "150", check=0, timeout=900)
    out = proc.stderr
    val = float(re.findall(r"validation loss ([\d.]+)", out)[-1])
    baselines = json.loads((run / "validation.json").read_text())["baselines"]
    unigram, bigram = baselines["unigram_bits"], baselines["bigram_bits"]
    assert f"code histogram {unigram:.3f} bits/sample, bigram p(x_t | x_t-1) {bigram:.3f}" in out
    assert 7.0 < unigram < 8.0 and 4.5 < bigram < 6.5  # loud game music: both near 16 kHz FMA's
    assert val < bigram - 0.1, (val, bigram, out[-3000:])
    assert ("optimizer: Adam, rate 0.005, validated on a moving average of the weights (0.999); "
            "now 0.005 (read from the optimizer)") in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["stacks"] == 2 and config["train"]["steps"] == 300
    assert config["train"]["lr"] == 5e-3  # the preset's rate, recorded for a resume
    assert latest_step(run) == 300
    events = [f for d, _, fs in os.walk(run / "tensorboard") for f in fs if "tfevents" in f]
    assert len(events) == 4  # train, validation and the two baselines
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_events = EventAccumulator(str(run / "tensorboard" / "train"),
                                    size_guidance={"tensors": 0}).Reload()  # every point
    tags = train_events.Tags()["tensors"]
    assert {"loss_bits_per_sample", "samples_per_second", "learning_rate"} <= set(tags)
    # The rate logged is the optimizer's: one rank, no warm-up, the preset's 5e-3 throughout.
    logged = [float(tf_value(e)) for e in train_events.Tensors("learning_rate")]
    assert logged and all(r == pytest.approx(5e-3) for r in logged)
    # a point every 10 steps, not only when the progress line was due
    assert [e.step for e in train_events.Tensors("loss_bits_per_sample")] == list(
        range(10, 301, 10))
    # the baselines beside the validation loss: flat lines at the store's own figures
    for name, value in (("baseline_bigram", bigram), ("baseline_code_histogram", unigram)):
        line = EventAccumulator(str(run / "tensorboard" / name), size_guidance={}).Reload()
        points = line.Tensors("loss_bits_per_sample")
        assert [e.step for e in points] == [150, 300]
        assert all(float(tf_value(e)) == pytest.approx(value, abs=1e-5) for e in points)

    # Listening: per validation, the prime (the first validation window, real audio) then 1 s
    # made from it, as WAV + PNG and as TensorBoard audio.
    import soundfile as sf

    from dwave.store.audio import mu_law_decode
    from dwave.model.config import ModelConfig
    from dwave.train.data import open_training_data

    t = config["train"]
    span = ModelConfig.from_dict(config["model"]).span(t["window"])
    prime = open_training_data(t["store"], span, t["batch_size"], t["seed"],
                               t["validation_fraction"]).validation.batch(0, 0)[0][0]
    for step in (150, 300):
        wav = run / "samples" / f"step-{step:07d}.wav"
        audio, rate = sf.read(wav)
        assert rate == 16000 and len(audio) == span + 16000 and np.abs(audio).max() > 0
        np.testing.assert_allclose(audio[:span], mu_law_decode(prime, 256), atol=1 / 16384)
        assert (run / "samples" / f"step-{step:07d}.png").stat().st_size > 1000
        assert (f"listen: step {step} -> samples/step-{step:07d}.wav ({span / 16000:.2f} s of "
                "prime, then 1 s generated") in out
    val_events = EventAccumulator(str(run / "tensorboard" / "validation"),
                                  size_guidance={"tensors": 0}).Reload()
    audio_steps = [e.step for e in val_events.Tensors("sample")]
    assert audio_steps == [150, 300], val_events.Tags()
    # the spectrogram beside each sample, in the images tab: the PNG written beside the WAV
    import tensorflow as tf

    pictures = val_events.Tensors("sample_spectrogram")
    assert [e.step for e in pictures] == [150, 300]
    encoded = tf_value(pictures[-1])  # [width, height, PNG bytes]
    png = (run / "samples" / "step-0000300.png").read_bytes()
    assert tf.io.decode_png(encoded[2]).numpy().tolist() == tf.io.decode_png(
        png, channels=3).numpy().tolist()
    history = json.loads((run / "validation.json").read_text())["history"]
    assert [h["step"] for h in history] == [150, 300] and history[-1]["bits"] == pytest.approx(
        val, abs=1e-3)


def tf_value(event):
    import tensorflow as tf

    return tf.make_ndarray(event.tensor_proto)


INITIAL_WEIGHTS = """
import hashlib, sys
from dwave.model.config import ModelConfig
from dwave.train.trainer import Trainer
for seed in map(int, sys.argv[1:]):
    trainer = Trainer(ModelConfig.from_preset("tiny"), 1e-3, 0, 1, seed=seed)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in trainer.model.variables))
    print(seed, digest.hexdigest())
"""


@pytest.mark.slow
def test_a_seed_gives_the_same_initial_weights_in_every_process():
    """--seed fixes the initial weights: two processes, the same seed, the same bits (Keras
    seeds its initializers from Python's `random`, which tf.random.set_seed leaves alone)."""
    def digests(*seeds):
        out = subprocess.run([sys.executable, "-c", INITIAL_WEIGHTS, *map(str, seeds)],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        return dict(line.split() for line in out.splitlines())

    first, second = digests(3, 4), digests(3)
    assert first["3"] == second["3"]
    assert first["3"] != first["4"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_two_ranks_stay_identical_and_equal_one_big_batch_step(launcher, tone_store, tmp_path):
    """After N steps both ranks hold bit-identical weights; and the first step equals, within
    float tolerance, a single-process step on the union of both ranks' batches."""
    run = tmp_path / "run"
    train_args = ["-m", "dwave.cli", "train", tone_store, "--run-dir", str(run), "--steps", "2",
                  "--ckpt-every", "1", "--lr", "1e-3", "--seed", "7", "--threads", "1", *FAST]
    if launcher == "horovodrun":
        cmd = [os.path.join(VENV_BIN, "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
               sys.executable, *train_args]
    else:
        cmd = ["mpirun", "-np", "2", "--bind-to", "none", "-x", "PATH", "-x", "PYTHONPATH",
               sys.executable, *train_args]
    env = {**os.environ, **MPI_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "dwave train: 2 ranks" in output
    digests = rank_digests(output)
    assert len(digests) == 2 and digests[0] == digests[1], output[-2000:]
    assert "weights identical on 2 ranks" in output
    assert checkpoint_steps(run) == [0, 1, 2]

    # Replay step 1 in this process: restore ckpt-0, train on rank 0's and rank 1's step-0
    # batches together (world size 2: the same scaled learning rate), compare with ckpt-1.
    import tensorflow as tf

    from dwave.train.data import open_training_data
    from dwave.model.rundir import read_run_config
    from dwave.train.trainer import Trainer

    model_config, train_config = read_run_config(str(run))
    span = model_config.span(train_config["window"])
    data = open_training_data(tone_store, span, train_config["batch_size"], seed=7)
    union = [np.concatenate(parts) for parts in zip(data.train.batch(0, 0), data.train.batch(1, 0))]

    def restored(step):
        # The run's own schedule (1e-3 climbing to 2e-3 over 100 steps): update 0 at 1e-3.
        trainer = Trainer(model_config, lr=train_config["lr"],
                          warmup_steps=train_config["warmup_steps"], world_size=2)
        tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                            step=trainer.step).restore(
            str(run / "checkpoints" / f"ckpt-{step}")).assert_existing_objects_matched()
        return trainer

    single = restored(0)
    single.train_step(tf.constant(union[0]), tf.constant(union[1]), tf.constant(False))
    after = restored(1)
    assert int(single.step.numpy()) == int(after.step.numpy()) == 1
    for mine, theirs in zip(single.model.variables, after.model.variables):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=mine.name)
    initial = restored(0)
    moved = sum(float(np.abs(a.numpy() - b.numpy()).max()) for a, b in
                zip(initial.model.variables, after.model.variables))
    assert moved > 1e-4  # the step did change the weights
    # The optimizer saved at step 2 holds the rate its second update used: one step into the
    # warm-up from the preset's rate towards twice it.
    lr, warmup = train_config["lr"], train_config["warmup_steps"]
    after_one = lr + (2 * lr - lr) * 1 / warmup  # the warm-up's rate at update 1 (0-based)
    assert restored(2).learning_rate == pytest.approx(after_one, rel=1e-6)


def _start_training(store, run, steps, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "dwave.cli", "train", store, "--run-dir", str(run),
         "--steps", str(steps), *FAST, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for_checkpoint_after(run, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = latest_step(run)
        if latest is not None and latest >= step:
            return latest
        if proc.poll() is not None:
            pytest.fail("training ended early:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_at_the_last_checkpoint(tone_store, tmp_path):
    run = tmp_path / "run"
    proc = _start_training(tone_store, run, 100000, ["--ckpt-every", "20"])
    _wait_for_checkpoint_after(run, 40, proc)
    proc.kill()
    proc.wait()
    step = latest_step(run)
    assert step is not None and step >= 40 and step % 20 == 0
    resumed = run_dwave("train", tone_store, "--run-dir", run, "--steps", step + 5, *FAST,
                        check=0, timeout=300)
    assert f"resuming from {run}/checkpoints/ckpt-{step} at step {step}" in resumed.stderr
    assert f"done: step {step + 5}" in resumed.stderr
    assert latest_step(run) == step + 5


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_zero(tone_store, tmp_path):
    run = tmp_path / "run"
    proc = _start_training(tone_store, run, 100000, ["--ckpt-every", "100000"])
    _wait_for_checkpoint_after(run, 0, proc)  # ckpt-0: training has started
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert time.time() - sent < 15
    m = re.search(r"stopped by SIGTERM at step (\d+)", output)
    assert m, output[-2000:]
    assert int(m.group(1)) > 0 and latest_step(run) == int(m.group(1))
    # `dwave status` (what slurm/train.sbatch asks before requeueing): not finished, exit 3.
    status = run_dwave("status", run, check=3)
    assert f"step {m.group(1)} of 100000, not finished" in status.stdout


@pytest.mark.slow
def test_a_second_job_on_a_run_dir_is_refused_until_the_first_dies(tone_store, tmp_path):
    run = tmp_path / "run"
    first = _start_training(tone_store, run, 100000, ["--ckpt-every", "10"])
    _wait_for_checkpoint_after(run, 10, first)
    second = run_dwave("train", tone_store, "--run-dir", run, "--steps", "100000", *FAST,
                       timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[-1]
    assert f"run dir {run} is in use by another training job (host " in line
    assert f"pid {first.pid}" in line and "Traceback" not in second.stderr
    assert first.poll() is None  # the first job is untouched and still training
    first.kill()  # dies without any clean-up: the lock goes with it
    first.wait()
    step = latest_step(run)
    third = run_dwave("train", tone_store, "--run-dir", run, "--steps", step + 3, *FAST,
                      check=0, timeout=300)
    assert f"resuming from {run}/checkpoints/ckpt-{step}" in third.stderr
    assert f"done: step {step + 3}" in third.stderr


@pytest.mark.slow
def test_a_job_on_a_busy_run_dir_is_refused_before_it_reads_the_store(tone_store, tmp_path):
    """The run dir's lock comes before the tracks are read: a refused second job costs seconds,
    not a whole store's read. Its store here has every track's data damaged, so a job that read
    them would fail on that instead (the second half checks it does)."""
    import shutil

    store, run = tmp_path / "store", tmp_path / "run"
    shutil.copytree(tone_store, store)
    chunks = sorted(store.glob("parts/*/codes/c/0"))
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"\x00")  # no longer a track's codes
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dwave.files import DirectoryLock; "
         "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_dwave("train", store, "--run-dir", run, "--steps", "5", *FAST, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"run dir {run} is in use by another training job (host " in (
        refused.stderr.strip().splitlines()[-1])
    # With the run dir free, the same job reads the tracks and fails on them.
    failed = run_dwave("train", store, "--run-dir", run, "--steps", "5", *FAST, timeout=300)
    assert failed.returncode != 0 and "in use" not in failed.stderr
    assert not checkpoint_steps(run)


@pytest.mark.slow
@pytest.mark.parametrize("quantization_channels", [64, 1024])
def test_the_stores_quantization_channels_define_the_model_and_the_songs(quantization_channels,
                                                                        tmp_path):
    """A store of 64 or 1024 codes trains a model of that many codes on its codes as stored
    (uint16 above 256: never wrapped to uint8), and generation decodes with them."""
    from dwave.train.data import open_training_data

    Q = quantization_channels
    url = make_store(str(tmp_path / "store"), {
        str(i): (synthetic_codes(1.0, seed=i, quantization_channels=Q), "tone")
        for i in range(3)}, quantization_channels=Q)
    data = open_training_data(url, 300, 2, 0)
    codes = data.train.batch(0, 0)[0]
    assert codes.dtype == (np.uint8 if Q <= 256 else np.uint16)
    assert codes.max() < Q and (Q < 256 or codes.max() > 255)
    run = tmp_path / "run"
    run_dwave("train", url, "--run-dir", run, "--steps", "3", *FAST, check=0)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["quantization_channels"] == Q
    baselines = json.loads((run / "validation.json").read_text())["baselines"]
    assert baselines["unigram_bits"] < np.log2(Q) + 0.5
    out = tmp_path / "songs"
    run_dwave("generate", run, "--out", out, "--seconds", "0.05", check=0)
    import tensorflow as tf

    from dwave.model.rundir import load_model

    model = load_model(str(run)).model
    assert model.head2_w.shape[-1] == Q and model.embedding.shape[0] == Q
    assert sf.info(str(out / "song-000.wav")).frames == 800
    assert tf.reduce_all(tf.shape(model(tf.zeros((1, 400), tf.int32))) ==
                         [1, 400 - model.config.receptive_field + 1, Q])


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(tone_store, small_disk,
                                                                      tmp_path):
    import shutil

    run = small_disk / "run"  # room for two tiny checkpoints, not three
    proc = run_dwave("train", tone_store, "--run-dir", run, "--steps", "40", "--ckpt-every", "10",
                     *FAST, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(rf"dwave: error: cannot write the step-\d+ checkpoint in {re.escape(str(run))} \(No space "
                    r"left on device\): the run dir still resumes from ckpt-\d+", line), line
    resumes_from = int(re.search(r"resumes from ckpt-(\d+)", line).group(1))
    # config.json never got ahead of the checkpoints: status agrees with the last complete one.
    status = run_dwave("status", run, check=3)
    assert f"step {resumes_from} of 40, not finished" in status.stdout
    moved = tmp_path / "run"  # somewhere with room
    shutil.copytree(run, moved)
    again = run_dwave("train", tone_store, "--run-dir", moved, "--steps", "40", "--ckpt-every",
                      "10", *FAST, check=0, timeout=300)
    assert f"at step {resumes_from}" in again.stderr and "done: step 40" in again.stderr


def test_status_of_finished_missing_and_foreign_run_dirs(tmp_path):
    from dwave.model.config import ModelConfig
    from dwave.model.rundir import write_run_config
    from dwave.train.config import TrainConfig

    run = tmp_path / "run"  # as training leaves it after its last checkpoint
    run.mkdir()
    write_run_config(str(run), ModelConfig(), TrainConfig(store="s", steps=30).__dict__, 1, 30)
    status = dwave_here("status", run, check=0)
    assert status.stdout.strip() == f"{run}: step 30 of 30, finished"
    write_run_config(str(run), ModelConfig(), TrainConfig(store="s", steps=30).__dict__, 1, 20)
    assert dwave_here("status", run).returncode == 3  # not finished: a job script requeues
    (tmp_path / "config.json").write_text("[1, 2]")
    for run_dir, reason in [(tmp_path / "nowhere", "does not exist"),
                            (tmp_path, "is not a dwave run config")]:
        proc = dwave_here("status", run_dir, check=2)
        assert reason in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for absurd in ('{"step": 1e400, "train": {"steps": 10}}', '{"step": -3, "train": {"steps": 1}}',
                   '{"step": 5, "train": {"steps": "many"}}'):
        (tmp_path / "config.json").write_text(absurd)
        proc = dwave_here("status", tmp_path, check=2)
        assert "is not a dwave run config" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_training_from_an_s3_store(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/store"
    make_store(url, {str(i): (synthetic_codes(1.0, seed=i), "tone") for i in range(3)})
    for mode in ("memory", "stream"):
        run = tmp_path / mode
        proc = run_dwave("train", url, "--run-dir", run, "--steps", "4", "--data-mode", mode,
                         *FAST, check=0, timeout=300)
        assert f"{mode} mode" in proc.stderr
        assert "done: step 4" in proc.stderr


@pytest.mark.slow
def test_bad_runs_are_one_line_errors(tone_store, tmp_path):
    def error_of(*args):
        proc = run_dwave("train", *args, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        return proc.stderr.strip().splitlines()[-1]

    empty = make_store(str(tmp_path / "empty"), {})
    assert "holds no tracks" in error_of(empty, "--run-dir", tmp_path / "r1")
    short = make_store(str(tmp_path / "short"), {"1": (np.zeros(300, np.uint8), "x")})
    assert "no track as long as one training window" in error_of(short, "--run-dir", tmp_path / "r2")
    assert "not a dwave store" in error_of(tmp_path / "nowhere", "--run-dir", tmp_path / "r3")

    run = tmp_path / "run"
    run_dwave("train", tone_store, "--run-dir", run, "--steps", "2", *FAST, check=0)
    line = error_of(tone_store, "--run-dir", run, "--preset", "small", "--steps", "4", *FAST)
    assert "holds a model with" in line and "residual_channels 16" in line
    line = error_of(tone_store, "--run-dir", run, "--genre-conditioning", "--steps", "4", *FAST)
    assert "genre conditioning off" in line

    data_file = next((run / "checkpoints").glob("ckpt-2.data-*"))
    data_file.write_bytes(b"\0garbage" * 10)
    line = error_of(tone_store, "--run-dir", run, "--steps", "4", *FAST)
    assert "cannot restore checkpoint" in line and "its data is damaged" in line
    assert 'write `model_checkpoint_path: "ckpt-0"`' in line  # the one before, by name
    proc = run_dwave("train", tone_store, "--run-dir", run, "--lr", "-1")
    assert proc.returncode == 2 and "expected a positive number" in proc.stderr


@pytest.mark.slow
def test_bf16_trains_and_says_what_the_products_run_in(tone_store, tmp_path):
    """--precision bf16 end to end: the start line reads the products' type from the model, and
    the tone store is learnt as in float32."""
    finals = {}
    for precision in ("fp32", "bf16"):
        proc = run_dwave("train", tone_store, "--run-dir", tmp_path / precision, "--steps", "250",
                         "--precision", precision, *FAST, check=0)
        expected = {"fp32": "float32", "bf16": "bfloat16"}[precision]
        assert (f"precision: matrix products in {expected}, everything else in float32; gates "
                "and conv inputs by dwave's fused CPU kernels") in proc.stderr
        finals[precision] = [float(x) for x in re.search(
            r"validation ([0-9.]+) \(bigram ([0-9.]+).*code histogram ([0-9.]+)\)",
            proc.stderr).groups()]
    for validation, bigram, _ in finals.values():
        # Learnt, a bit past what a bigram model knows (both land 1.4-1.8 bits below it here).
        # Parity at 0.05 bit is for benchmarks/bench_learning.py on real music: two float32 runs
        # already differ by 0.1-0.4 bit at this step (threads sum in varying order).
        assert validation < bigram - 1.0, finals


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_instead_of_hanging_it(tone_store, tmp_path):
    run = tmp_path / "run"
    cmd = ["mpirun", "-np", "2", "--bind-to", "none", "-x", "PATH", sys.executable, "-m",
           "dwave.cli", "train", str(tone_store), "--run-dir", str(run), "--steps", "100000",
           "--ckpt-every", "20", "--stall-minutes", "0.2", *FAST]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, env={**os.environ, **MPI_ENV}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while (latest_step(run) or 0) < 20 and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert (latest_step(run) or 0) >= 20, "training never reached step 20"
        ranks = subprocess.run(["pgrep", "-f", f"dwave.cli train {tone_store} --run-dir {run}"],
                               capture_output=True, text=True).stdout.split()
        ranks = [int(p) for p in ranks if int(p) != job.pid]
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGSTOP)  # one rank stops: the other waits in its allreduce
        stopped_at = time.time()
        _, err = job.communicate(timeout=120)
        assert job.returncode != 0
        assert "no training step completed in 12 s" in err, err[-3000:]
        assert time.time() - stopped_at < 90  # 12 s of stall, then the launcher's teardown
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", f"--run-dir {run}"])


@pytest.mark.slow
def test_a_moving_average_is_checkpointed_and_generation_uses_it(tone_store, tmp_path):
    """--ema turned on at a resume starts the average from the weights; the checkpoint holds
    it beside the weights, and `dwave generate` runs the average (and says so)."""
    import tensorflow as tf

    from dwave.model.rundir import load_model
    from dwave.model.network import WaveNet
    from dwave.model.rundir import AVERAGE, holds_average, latest_checkpoint

    run = tmp_path / "run"
    run_dwave("train", tone_store, "--run-dir", run, "--steps", "3", "--ema", "0", *FAST,
              check=0)
    assert not holds_average(latest_checkpoint(str(run)))
    out = run_dwave("train", tone_store, "--run-dir", run, "--steps", "6", "--ema", "0.9",
                    *FAST, check=0).stderr
    assert "validated on a moving average of the weights (0.9)" in out
    path = latest_checkpoint(str(run))
    assert path.endswith("-6") and holds_average(path)
    loaded = load_model(str(run))
    model, config = loaded.model, loaded.config
    assert loaded.averaged
    own = WaveNet(config)
    tf.train.Checkpoint(model=own).restore(path).expect_partial()
    for i, (averaged, weights) in enumerate(zip(model.trainable_variables,
                                                own.trainable_variables)):
        stored = tf.train.load_variable(path, f"{AVERAGE}/{i}/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(averaged.numpy(), stored)
        if i == 0:  # the embedding: trained, so its average lags behind it
            assert not np.array_equal(stored, weights.numpy())
    songs = run_dwave("generate", run, "--out", tmp_path / "songs", "--seconds", "0.01",
                      check=0).stderr
    assert "(its moving average of the weights)" in songs


@pytest.mark.slow
def test_tracks_without_a_genre_are_a_class_the_start_line_counts_or_left_out(tmp_path):
    # fma_large: about half the tracks have no genre_top
    tracks = {str(i): (synthetic_codes(2.0, kind="tone", seed=i), None if i % 2 else "rock")
              for i in range(1, 9)}
    store = make_store(str(tmp_path / "store"), tracks)
    as_class = run_dwave("train", store, "--run-dir", tmp_path / "a", "--genre-conditioning",
                         "--steps", "1", *FAST, check=0)
    assert re.search(r"genre conditioning: 2 classes \(rock, unknown\); \d+ of the \d+ training "
                     r"tracks have no genre and train as the class 'unknown'", as_class.stderr)
    skipped = run_dwave("train", store, "--run-dir", tmp_path / "b", "--genre-conditioning",
                        "--unlabelled", "skip", "--steps", "1", *FAST, check=0)
    assert "genre conditioning: 1 classes (rock)" in skipped.stderr
    assert re.search(r"left out 4 track\(s\) of genres this run was not started with "
                     r"\(unknown\): 'unknown' is the tracks without a genre", skipped.stderr)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model"]["condition_values"] == ["rock"]


@pytest.mark.slow
def test_ctrl_c_under_horovodrun_checkpoints_base_before_the_launchers_kill(tone_store,
                                                                            tmp_path):
    """Ctrl-C at horovodrun: it sends SIGTERM to every rank and kills them 5 s later. Every
    rank stops after its step, rank 0 writes a whole `base` checkpoint (the largest preset's
    write is the slowest) and they exit before the kill: one dwave line, no traceback, exit 0.
    Twice, at different moments of a step (it failed one time in two or three before)."""
    for attempt, wait in enumerate((4.0, 7.5)):
        run = tmp_path / f"run{attempt}"
        cmd = [os.path.join(VENV_BIN, "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
               sys.executable, "-m", "dwave.cli", "train", tone_store, "--run-dir", str(run),
               "--preset", "base", "--steps", "100000", "--window", "1000", "--batch-size", "1",
               "--val-every", "100000", "--listen-seconds", "0", "--threads", "1"]
        log = open(tmp_path / f"log{attempt}", "w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, **MPI_ENV})
        deadline = time.monotonic() + 240
        while "step 1/100000" not in open(log.name).read():  # training, past the first step
            assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()
            time.sleep(0.5)
        time.sleep(wait)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends it
        code = proc.wait(timeout=60)
        output = open(log.name).read()
        # horovodrun stops and then SIGTERMs the `sh -c` it wraps each rank in right after the
        # rank has exited; under load that shell sometimes dies of it (exit 143) before it
        # passes the rank's 0 on, and horovodrun raises its own RuntimeError. Seen once in a full
        # suite, after dwave had finished; everything dwave controls is checked below.
        race = "Exit code: 143" in output and "done: step" in output
        assert code == 0 or race, output[-3000:]
        assert race or "Traceback" not in output
        assert "exit with status code 137" not in output
        stopped = re.search(r"stopped by SIGTERM at step (\d+): checkpoint written; rerun the "
                            r"same command to resume", output)
        assert stopped, output[-3000:]
        assert checkpoint_steps(run)[-1] == int(stopped.group(1))
        status = run_dwave("status", run)
        assert f"step {stopped.group(1)}" in status.stdout + status.stderr


@pytest.mark.slow
def test_ctrl_c_under_mpirun_checkpoints_base_before_its_kill(tone_store, tmp_path):
    """Ctrl-C at mpirun (Open MPI 4.1): SIGTERM to every rank after a second, SIGKILL
    odls_base_sigkill_timeout seconds later: 1 by default, which a busy machine's step and
    `base` checkpoint overran (this test failed with it while another suite ran), so
    slurm/env.sh and the README set 30. The checkpoint is whole before the kill; mpirun itself
    exits 1 whatever its ranks do, so the run's own lines and files are what is checked."""
    run = tmp_path / "run"
    cmd = ["mpirun", "-np", "2", "--bind-to", "none", "-x", "PATH",
           sys.executable, "-m", "dwave.cli", "train", tone_store, "--run-dir", str(run),
           "--preset", "base", "--steps", "100000", "--window", "1000", "--batch-size", "1",
           "--val-every", "100000", "--listen-seconds", "0", "--threads", "1"]
    log = open(tmp_path / "log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV,
                                 "OMPI_MCA_odls_base_sigkill_timeout": "30"})
    deadline = time.monotonic() + 240
    while "step 1/100000" not in open(log.name).read():
        assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()
        time.sleep(0.5)
    time.sleep(5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    output = open(log.name).read()
    stopped = re.search(r"stopped by SIGTERM at step (\d+): checkpoint written", output)
    assert stopped and "Traceback" not in output, output[-3000:]
    assert checkpoint_steps(run)[-1] == int(stopped.group(1))
    # the checkpoint restores: a resume goes on from it
    resumed = run_dwave("train", tone_store, "--run-dir", run, "--preset", "base", "--steps",
                        str(int(stopped.group(1)) + 1), "--window", "1000", "--batch-size",
                        "1", "--val-every", "100000", "--listen-seconds", "0", check=0)
    step = stopped.group(1)
    assert re.search(rf"resuming from \S*ckpt-{step} at step {step}\b", resumed.stderr), \
        resumed.stderr[-2000:]
