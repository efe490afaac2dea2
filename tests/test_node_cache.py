"""Memory mode from a store on S3: one copy per node, made by one rank while the others wait,
kept apart per store id, and giving the same batches as reading the store itself."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_store

RANK = r"""
import sys, hashlib
from dwave.train.data import open_training_data
data = open_training_data(sys.argv[1], 1000, 8, 0, validation_fraction=0.0, mode="memory",
                          load=False)
data.load(log=lambda line: print("LOG", line, flush=True))
codes = b"".join(data.train.batch(0, s)[0].tobytes() for s in range(20))
print("BATCHES", hashlib.sha256(codes).hexdigest(), flush=True)
"""


@pytest.mark.slow  # two processes, each reading the store
def test_two_ranks_of_a_node_share_one_copy_of_an_s3_store(s3_bucket, tmp_path):
    from dwave.train.data import open_training_data
    from dwave.store.track_store import TrackStore

    url = f"s3://{s3_bucket}/store"
    rng = np.random.default_rng(0)
    make_store(url, {str(i): (rng.integers(0, 256, 20_000 + 1000 * i).astype(np.uint8), "g")
                     for i in range(6)})
    cache = tmp_path / "node-cache"
    env = {**os.environ, "DWAVE_NODE_CACHE": str(cache)}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, url], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), outputs
    logs = [[line for line in out.splitlines() if line.startswith("LOG")] for out, _ in outputs]
    copies = [line for lines in logs for line in lines if "copied" in line]
    assert len(copies) == 1 and "copied 3 shard(s)" in copies[0], logs  # 3 parts, 1 shard each
    digests = {line for out, _ in outputs for line in out.splitlines() if line.startswith("BATCHES")}
    assert len(digests) == 1
    store_id = TrackStore(url).root_attributes()["store_id"]
    assert os.listdir(cache) == [store_id]
    # The same batches as reading the store on S3 window by window.
    import hashlib

    stream = open_training_data(url, 1000, 8, 0, validation_fraction=0.0, mode="stream",
                                windows_per_read=1)
    codes = b"".join(stream.train.batch(0, s)[0].tobytes() for s in range(20))
    assert digests == {f"BATCHES {hashlib.sha256(codes).hexdigest()}"}
    # A rerun finds the copy there: nothing copied again.
    again = subprocess.run([sys.executable, "-c", RANK, url], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "copied" not in again.stdout
