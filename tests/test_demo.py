"""The README's main command, end to end on a small synthesised corpus, training with 2
Horovod ranks."""

from __future__ import annotations

import json
import re

import pytest
import soundfile as sf

from conftest import run_dwave


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = run_dwave("demo", "--out", out, "--songs", "3", "--seconds", "4", "--steps", "20",
                     "--generate-seconds", "0.25", "--workers", "2", check=0, timeout=600)
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "demo done"):
        assert stage in proc.stderr
    assert "horovodrun -np 2" in proc.stderr and "dwave train: 2 ranks" in proc.stderr
    assert "weights identical on 2 ranks" in proc.stderr and "done: step 20" in proc.stderr
    for i in range(2):
        info = sf.info(str(out / "songs" / f"song-00{i}.wav"))
        assert (info.samplerate, info.frames) == (16000, 4000)
        assert (out / "songs" / f"song-00{i}.png").stat().st_size > 1000
    assert (out / "run" / "config.json").exists()
    # Training with the defaults: no special rate; the summary sets the validation loss against
    # the store's baselines, as recorded in the run dir.
    command = next(line for line in proc.stderr.splitlines() if "horovodrun -np 2" in line)
    assert "--lr" not in command and "--warmup-steps" not in command
    log = json.loads((out / "run" / "validation.json").read_text())
    last, b = log["history"][-1], log["baselines"]
    line = re.search(r"learning +(validation .*)", proc.stderr).group(1)
    bigram = b["bigram_bits"]
    assert line.startswith(f"validation {last['bits']:.3f} bits/sample at step 20 (bigram "
                           f"{bigram:.3f}: {last['bits'] - bigram:+.3f}; code histogram "
                           f"{b['unigram_bits']:.3f}): ")
