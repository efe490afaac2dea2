#!/usr/bin/env python
"""The reference TensorFlow WaveNet trained on the same batches as a dwave run, step for step.

    python benchmarks/bench_reference.py RUN_DIR --reference-dir DIR [--threads N] [--out OUT]

RUN_DIR is a finished `dwave train` run (bench_learning.py leaves one in OUT/learning-PRESET).
DIR is a checkout of ibab/tensorflow-wavenet (github.com/ibab/tensorflow-wavenet; not shipped
with dwave and never downloaded: its code is not ours to copy). Its `wavenet/model.py` and
`wavenet/ops.py` are loaded as they are, under `tf.compat.v1` with `tf.contrib`'s Xavier
initializer mapped to `glorot_uniform_initializer` (the same distribution); the store already
holds mu-law codes, so the reference's `mu_law_encode` is bypassed and the codes go in as they
are.

The reference model gets the run's architecture (dilations, channels, 256-way output, biases
on, as its default `wavenet_params.json`), Adam 1e-3 with epsilon 1e-4 (its `train.py`), and
for every step k the run's own training batch (`WindowSampler.batch(0, k)`: the same windows
in the same order). It is validated at the run's steps on the run's validation windows. Its
first layer is a width-2 causal convolution of the one-hot codes, as dwave's input layer of
kernel 2 (the default) is: both predict every target of a window. (A run with
--input-kernel 1 has a receptive field one sample shorter: the reference then predicts one
target fewer per window, 3,999 of 4,000.)

Writes OUT/reference.json and OUT/reference.png (both curves and the store's baselines) and
prints the two curves side by side, with the reference's time per training step on this
machine (the same number of threads as the run unless --threads says otherwise).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_learning import plot_curves  # noqa: E402
from machine import cpu_model  # noqa: E402


def load_reference(directory: str):
    """ibab's `wavenet.model` module, imported from DIR under a TF1 face of TensorFlow 2."""
    import tensorflow as tf

    v1 = tf.compat.v1
    if not os.path.isfile(os.path.join(directory, "wavenet", "model.py")):
        sys.exit(f"bench_reference: {directory} holds no wavenet/model.py: pass a checkout of "
                 "ibab/tensorflow-wavenet")
    face = types.ModuleType("tensorflow")
    face.__getattr__ = lambda name: getattr(v1, name)  # PEP 562: everything else from v1
    face.contrib = types.SimpleNamespace(layers=types.SimpleNamespace(
        xavier_initializer_conv2d=lambda: v1.glorot_uniform_initializer()))
    package = types.ModuleType("wavenet")  # not its __init__, which needs librosa
    package.__path__ = [os.path.join(directory, "wavenet")]
    real_tf = sys.modules["tensorflow"]
    sys.modules.update({"tensorflow": face, "wavenet": package})
    try:
        model = importlib.import_module("wavenet.model")
    finally:
        sys.modules["tensorflow"] = real_tf
    # The store holds codes already: the reference's encoder becomes the identity.
    model.mu_law_encode = lambda codes, levels: v1.cast(codes, v1.int32)
    return model


def plot(result: dict, path: str) -> None:
    plot_curves({"dwave": result["dwave"], "reference (ibab)": result["reference"]},
                result["baselines"],
                f"step ({result['samples_per_step']:,} predicted samples, the same batches)",
                f"{result['preset_like']} on {result['store_name']} ({result['cpu']})", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished dwave run (e.g. OUT/learning-small)")
    parser.add_argument("--reference-dir", required=True,
                        help="a checkout of ibab/tensorflow-wavenet")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads (default: the run's, else all cores)")
    parser.add_argument("--out", default=None, help="default: the run dir's parent")
    args = parser.parse_args()
    result = train_reference(args.run_dir, args.reference_dir, args.threads)
    report(result, args.out or os.path.dirname(os.path.abspath(args.run_dir)))


def train_reference(run_dir: str, reference_dir: str, threads: int | None = None) -> dict:
    """The reference trained on `run_dir`'s batches, validated at its steps: the comparison's
    figures (see the module's docstring)."""
    import tensorflow as tf

    from dwave.model.config import ModelConfig
    from dwave.train.data import open_training_data
    from dwave.train.schedule import ADAM_EPSILON

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    with open(os.path.join(run_dir, "validation.json")) as f:
        log = json.load(f)
    config, train = ModelConfig.from_dict(saved["model"]), saved["train"]
    if config.conditioned:
        sys.exit("bench_reference: the run is conditioned; compare on an unconditioned store")
    if saved.get("world_size", 1) != 1:
        sys.exit("bench_reference: the run had several ranks; compare with a one-process run")
    data = open_training_data(train["store"], config.span(train["window"]), train["batch_size"],
                              train["seed"], train["validation_fraction"])
    threads = threads or train.get("threads") or os.cpu_count()
    wavenet = load_reference(reference_dir)

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(train["seed"])
        net = wavenet.WaveNetModel(
            batch_size=train["batch_size"], dilations=config.dilations, filter_width=2,
            residual_channels=config.residual_channels,
            dilation_channels=config.dilation_channels, skip_channels=config.skip_channels,
            quantization_channels=config.quantization_channels, use_biases=True)
        codes = v1.placeholder(tf.int32, (train["batch_size"], config.span(train["window"])))
        loss = net.loss(codes)  # mean nats per target
        # Its train.py: Adam at the given rate (1e-3 default), epsilon 1e-4.
        step_op = v1.train.AdamOptimizer(learning_rate=train["lr"],
                                         epsilon=ADAM_EPSILON).minimize(loss)
        session = v1.Session(config=v1.ConfigProto(intra_op_parallelism_threads=threads,
                                                   inter_op_parallelism_threads=1))
        session.run(v1.global_variables_initializer())

    validation = [data.validation.batch(0, i)[0] for i in range(train["val_batches"])]
    targets = train["window"] - (net.receptive_field - config.receptive_field)

    def validate() -> float:
        nats = [session.run(loss, {codes: w.astype(np.int32)}) for w in validation]
        return float(np.mean(nats) / np.log(2))

    checkpoints = [h["step"] for h in log["history"]]
    steps = max(checkpoints)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; reference on {threads} thread(s); "
          f"{steps} steps of {train['batch_size']} x {targets} targets, the run's batches",
          flush=True)
    history, train_seconds = [], 0.0
    for step in range(steps):
        batch = data.train.batch(0, step)[0].astype(np.int32)
        started = time.perf_counter()
        session.run(step_op, {codes: batch})
        if step > 0:  # the first step builds the graph's kernels
            train_seconds += time.perf_counter() - started
        if step + 1 in checkpoints:
            bits = validate()
            history.append({"step": step + 1, "bits": bits, "seconds": train_seconds})
            print(f"step {step + 1}: reference {bits:.3f} bits/sample", flush=True)

    reference_targets_per_step = train["batch_size"] * targets
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
        "run_dir": os.path.abspath(run_dir), "store": train["store"],
        "store_name": os.path.basename(os.path.normpath(train["store"])),
        "preset_like": f"{config.residual_channels}/{config.dilation_channels}/"
                       f"{config.skip_channels} channels, {len(config.dilations)} layers",
        "samples_per_step": train["batch_size"] * train["window"],
        "baselines": log["baselines"],
        "dwave": log["history"], "reference": history,
        "reference_seconds_per_step": train_seconds / max(1, steps - 1),
        "reference_samples_per_second":
            reference_targets_per_step * max(1, steps - 1) / train_seconds,
    }
    return result


def report(result: dict, out: str) -> None:
    """Both curves side by side; OUT/reference.json and reference.png."""
    mine = {h["step"]: h["bits"] for h in result["dwave"]}
    history, threads = result["reference"], result["threads"]
    bigram = result["baselines"]["bigram_bits"]
    print(f"\nvalidation bits/sample on the same batches (store bigram {bigram:.3f}, "
          f"histogram {result['baselines']['unigram_bits']:.3f}):")
    print(f"{'step':>6} {'dwave':>8} {'reference':>10} {'dwave - ref':>12}")
    for h in history:
        print(f"{h['step']:>6} {mine[h['step']]:>8.3f} {h['bits']:>10.3f} "
              f"{mine[h['step']] - h['bits']:>+12.3f}")
    print(f"reference: {result['reference_seconds_per_step']:.3f} s/step = "
          f"{result['reference_samples_per_second']:,.0f} predicted samples/s on {threads} "
          "thread(s)")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out, "reference.png"))
    print(f"wrote {out}/reference.json, reference.png")


if __name__ == "__main__":
    main()
