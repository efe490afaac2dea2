"""What runs without the heavy engines: preprocessing and the store tools without TensorFlow,
one training process without Horovod; and the one line a command that needs one says instead.

The packages are hidden from a real `dwave` process (and its Dask workers) by a sitecustomize
that makes their import fail exactly as it does where they are not installed."""

import sys

import pytest

from conftest import run_dwave, write_tone


@pytest.fixture
def hide(tmp_path):
    """env for run_dwave in which the named top-level packages cannot be imported."""
    site = tmp_path / "hide-packages"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "for name in os.environ.get('DWAVE_TEST_HIDE', '').split(','):\n"
        "    if name:\n"
        "        sys.modules[name] = None  # import raises ModuleNotFoundError, as if absent\n")

    def env(*packages):
        return {"PYTHONPATH": str(site), "DWAVE_TEST_HIDE": ",".join(packages)}
    return env


@pytest.mark.slow
def test_preprocess_and_the_store_tools_need_no_tensorflow(tmp_path, hide):
    env = hide("tensorflow", "horovod")
    probe = run_dwave("--version", env=env, check=0)
    assert "tensorflow" in probe.stdout
    songs = tmp_path / "songs"
    songs.mkdir()
    write_tone(songs / "000003.wav", 2.0)
    store = tmp_path / "store"
    run_dwave("preprocess", songs, "--out", store, "--workers", "1", "--no-progress", env=env,
              check=0)
    assert "tracks     1 (" in run_dwave("info", store, env=env, check=0).stdout
    run_dwave("store", "verify", store, env=env, check=0)
    # ... and the commands that do need it say so in one line
    train = run_dwave("train", store, "--run-dir", tmp_path / "run", "--steps", "1", env=env)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert train.stderr.strip().splitlines()[-1].startswith(
        "dwave: error: `dwave train` needs TensorFlow, which is not installed: pip install "
        "'wavenet-dwave[cpu]'"), train.stderr


def test_the_hiding_works(hide):
    # the check above proves nothing if the hidden package still imports
    import subprocess

    env = {**__import__("os").environ, **hide("tensorflow")}
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr


@pytest.mark.slow
def test_one_process_trains_without_horovod(tone_store, tmp_path, hide):
    env = hide("horovod")
    run = tmp_path / "run"
    done = run_dwave("train", tone_store, "--run-dir", run, "--preset", "tiny", "--steps", "3",
                     "--val-every", "3", "--batch-size", "2", "--window", "256", "--listen-seconds", "0",
                     env=env,
                     check=0)
    assert "done: step 3" in done.stdout + done.stderr
    # dwave status needs neither engine
    status = run_dwave("status", run, env=hide("tensorflow", "horovod"), check=0)
    assert "step 3 of 3" in status.stdout
    # several ranks do need it: one line, no traceback, from each rank
    ranks = run_dwave("train", tone_store, "--run-dir", tmp_path / "run2", "--steps", "1",
                      env={**env, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    assert ranks.returncode == 2 and "Traceback" not in ranks.stderr
    assert "`dwave train` needs Horovod, which is not installed" in ranks.stderr
