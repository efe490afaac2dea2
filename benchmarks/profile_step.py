#!/usr/bin/env python
"""Where a training step's time goes: TensorFlow's profiler over a few full steps, per op type.

    python benchmarks/profile_step.py [--preset base] [--batch-size 1] [--threads 1]
                                      [--precision fp32] [--steps 3] [--logdir DIR]

Runs dwave's Trainer on synthetic windows, traces --steps steps with tf.profiler, and prints
the time per op type (forward and gradient ops apart: "grad X" is the backward pass's X),
summed over the traced steps and divided by their number, with each type's share of the ops'
total. The trace stays in --logdir for TensorBoard's profile plugin (trace viewer) if it is
installed. This is how issue 12 found StridedSliceGrad taking half of the `base` step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import describe  # noqa: E402


def op_times(logdir: str) -> collections.Counter:
    """Microseconds per op type, summed over every TensorFlow executor event of the trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name  # "scope/op:OpType"
                if ":" not in name or "::" in name:
                    continue  # the executor's own spans (ExecutorState::Process, ...)
                kind = name.rsplit(":", 1)[1]
                if "gradient_tape" in name:
                    kind = "grad " + kind
                totals[kind] += event.duration_ps / 1e6
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--window", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="traced steps (3)")
    parser.add_argument("--top", type=int, default=25, help="op types to print (25)")
    parser.add_argument("--logdir", help="keep the trace here (default: a temporary folder)")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from dwave.model.config import ModelConfig
    from dwave.train.trainer import Trainer

    config = ModelConfig.from_preset(args.preset)
    trainer = Trainer(config, 1e-4, 0, 1, args.precision)
    codes = tf.constant(np.random.default_rng(0).integers(
        0, 256, (args.batch_size, config.span(args.window))), tf.uint8)
    condition, no_stop = tf.zeros((args.batch_size,), tf.int32), tf.constant(False)
    for _ in range(3):  # trace the graph, warm the allocator
        trainer.train_step(codes, condition, no_stop)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = trainer.train_step(codes, condition, no_stop)
    float(loss)
    step_ms = 1000 * (time.perf_counter() - started) / args.steps

    logdir = args.logdir or tempfile.mkdtemp(prefix="dwave-profile-")
    tf.profiler.experimental.start(logdir)
    for _ in range(args.steps):
        loss, _ = trainer.train_step(codes, condition, no_stop)
    float(loss)
    tf.profiler.experimental.stop()
    totals = op_times(logdir)
    if not args.logdir:
        shutil.rmtree(logdir)

    ops_ms = sum(totals.values()) / 1000 / args.steps
    print(f"{args.preset}, batch {args.batch_size} x {args.window}, {args.threads} thread(s), "
          f"{args.precision}; {describe()}")
    print(f"step {step_ms:.1f} ms untraced; ops {ops_ms:.1f} ms per traced step "
          f"({config.training_flops_per_sample(args.window) / 1e6:.2f} MFLOP per predicted "
          "sample in the products)\n")
    print(f"{'op type':32}{'ms/step':>9}{'share':>8}")
    for kind, us in totals.most_common(args.top):
        ms = us / 1000 / args.steps
        print(f"{kind:32}{ms:>9.1f}{ms / ops_ms:>8.1%}")


if __name__ == "__main__":
    main()
