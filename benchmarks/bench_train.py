#!/usr/bin/env python
"""Training throughput of the `base` WaveNet: ranks, input pipeline, a Keras baseline, and a
projection to large GPU clusters.

    python benchmarks/bench_train.py STORE [--out bench-output] [--steps 6] [--window 4000]

Prints (weak scaling: fixed per-rank batch, one TensorFlow thread per rank):
  * predicted samples/s trained with 1 and 2 Horovod ranks (mpirun), the scaling efficiency;
  * the same with the store input replaced by synthetic in-memory windows, and the ratio
    store/synthetic (does the input pipeline keep up?);
  * a straightforward Keras WaveNet of the same architecture (Conv1D causal dilated layers,
    skips at every position), one rank, same thread budget: the baseline our model is
    measured against in this same run;
  * a projection to 8, 64 and 512 GPUs from the measured step time plus a ring allreduce of
    the gradients (2(N-1)/N x gradient bytes / link bandwidth, 25 and 100 Gb/s);
and writes OUT/train_scaling.png and OUT/train.json. STORE is any store `dwave preprocess`
wrote (`dwave demo` leaves one in demo-output/store).

Internally the script reruns itself under `mpirun -np N` with --worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


# -- the measurement, on every rank -----------------------------------------------------------


def worker(args) -> None:
    from dwave.ranks import start_horovod

    hvd = start_horovod()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import numpy as np

    from dwave.config import ModelConfig
    from dwave.data import open_training_data
    from dwave.train import Trainer

    config = ModelConfig.from_preset(args.preset)
    window = config.receptive_field + args.window
    size, rank = hvd.size(), hvd.rank()
    tf.random.set_seed(0)
    trainer = Trainer(config, 1e-4, 0, size, hvd=hvd if size > 1 else None)
    trainer.broadcast_from_rank0()
    no_stop = tf.constant(False)

    def timed(batches) -> float:
        for _ in range(args.warmup):
            trainer.train_step(*next(batches), no_stop)
        if size > 1:
            hvd.allreduce(tf.constant(0.0))  # start the clock together
        started = time.perf_counter()
        for _ in range(args.steps):
            loss, _ = trainer.train_step(*next(batches), no_stop)
        float(loss)
        return (time.perf_counter() - started) / args.steps

    rng = np.random.default_rng(rank)
    synthetic = (tf.constant(rng.integers(0, 256, (args.batch_size, window), dtype=np.uint8)),
                 tf.zeros((args.batch_size,), tf.int32))

    def repeat():
        while True:
            yield synthetic

    results = {"ranks": size, "synthetic_step_s": timed(repeat())}
    data = open_training_data(args.store, window, args.batch_size, seed=0)
    batches = iter(data.train.dataset(rank, 0, 10**9))
    results["store_step_s"] = timed(batches)
    results["data_mode"] = data.train.mode
    # The input pipeline alone: how many batches per second could it feed one rank?
    started = time.perf_counter()
    for _ in range(20):
        next(batches)
    results["input_batches_per_s"] = 20 / (time.perf_counter() - started)
    if rank == 0:
        results["parameters"] = trainer.model.parameter_count
        results["gradient_bytes"] = 4 * sum(int(np.prod(v.shape))
                                            for v in trainer.model.trainable_variables)
        print("RESULT " + json.dumps(results), flush=True)


def keras_baseline(args) -> None:
    """A straightforward Keras WaveNet: what most tutorials and reimplementations write."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from dwave.config import ModelConfig

    c = ModelConfig.from_preset(args.preset)
    L = tf.keras.layers
    inputs = tf.keras.Input((None,), dtype="int32")
    h = L.Embedding(c.quantization_channels, c.residual_channels)(inputs)
    skips = []
    for d in c.dilations:
        f = L.Conv1D(c.dilation_channels, 2, dilation_rate=d, padding="causal",
                     activation="tanh")(h)
        g = L.Conv1D(c.dilation_channels, 2, dilation_rate=d, padding="causal",
                     activation="sigmoid")(h)
        z = L.Multiply()([f, g])
        skips.append(L.Conv1D(c.skip_channels, 1)(z))
        h = L.Add()([h, L.Conv1D(c.residual_channels, 1)(z)])
    out = L.Activation("relu")(L.Add()(skips))
    out = L.Conv1D(c.skip_channels, 1, activation="relu")(out)
    logits = L.Conv1D(c.quantization_channels, 1)(out)
    model = tf.keras.Model(inputs, logits)
    optimizer = tf.keras.optimizers.Adam(1e-4)
    rf = c.receptive_field

    @tf.function
    def step(codes):
        with tf.GradientTape() as tape:
            logits = model(codes[:, :-1])[:, rf - 1:]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=codes[:, rf:], logits=logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    codes = tf.constant(np.random.default_rng(0).integers(
        0, 256, (args.batch_size, rf + args.window)), tf.int32)
    for _ in range(args.warmup):
        step(codes)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step(codes)
    float(loss)
    print("RESULT " + json.dumps({"keras_step_s": (time.perf_counter() - started) / args.steps}),
          flush=True)


# -- the driver -------------------------------------------------------------------------------


def run_child(command: list[str]) -> dict:
    env = {**os.environ, **MPI_ENV}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"benchmark child failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
             f"\n{proc.stderr[-3000:]}")


def projection(step_s: float, gradient_bytes: int, samples_per_rank_step: int) -> list[dict]:
    """Synchronous data parallelism at scale: each step is the compute plus one ring allreduce
    of the gradients (no overlap of the two assumed: a conservative bound)."""
    rows = []
    for gbps in (25, 100):
        for n in (8, 64, 512):
            allreduce_s = 2 * (n - 1) / n * gradient_bytes * 8 / (gbps * 1e9)
            step = step_s + allreduce_s
            rows.append({"gpus": n, "link_gbps": gbps, "allreduce_ms": 1000 * allreduce_s,
                         "efficiency": step_s / step,
                         "samples_per_s": n * samples_per_rank_step / step})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", nargs="?", help="a dwave store")
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="per rank (1)")
    parser.add_argument("--window", type=int, default=4000,
                        help="predicted samples per window (4000)")
    parser.add_argument("--threads", type=int, default=1, help="TF threads per rank (1)")
    parser.add_argument("--gpu-step-ms", type=float, default=100.0,
                        help="assumed per-GPU step time for the projection's second table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keras-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.keras_baseline:
        return keras_baseline(args)
    if not args.store:
        parser.error("STORE is required")

    here = os.path.abspath(__file__)
    common = [args.store, "--preset", args.preset, "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--batch-size", str(args.batch_size), "--window",
              str(args.window), "--threads", str(args.threads)]
    per_rank_samples = args.batch_size * args.window
    runs = {}
    for ranks in (1, 2):
        print(f"measuring {ranks} rank(s) ...", flush=True)
        runs[ranks] = run_child(["mpirun", "-np", str(ranks), "--bind-to", "none", "-x",
                                 "PATH", sys.executable, here, *common, "--worker"])
    print("measuring the straightforward Keras baseline ...", flush=True)
    keras = run_child([sys.executable, here, *common, "--keras-baseline"])

    def rate(ranks, key):
        return ranks * per_rank_samples / runs[ranks][key]

    figures = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores",
        "preset": args.preset, "batch_size_per_rank": args.batch_size, "window": args.window,
        "threads_per_rank": args.threads, "parameters": runs[1]["parameters"],
        "data_mode": runs[1]["data_mode"],
        "samples_per_s": {f"{r}_ranks_{k}": rate(r, f"{k}_step_s")
                          for r in (1, 2) for k in ("synthetic", "store")},
        "keras_baseline_samples_per_s": per_rank_samples / keras["keras_step_s"],
        "input_batches_per_s_one_rank": runs[1]["input_batches_per_s"],
    }
    s = figures["samples_per_s"]
    figures["scaling_efficiency_store"] = s["2_ranks_store"] / (2 * s["1_ranks_store"])
    figures["scaling_efficiency_synthetic"] = s["2_ranks_synthetic"] / (2 * s["1_ranks_synthetic"])
    figures["store_over_synthetic"] = {r: s[f"{r}_ranks_store"] / s[f"{r}_ranks_synthetic"]
                                       for r in (1, 2)}
    figures["speedup_over_keras"] = s["1_ranks_synthetic"] / figures["keras_baseline_samples_per_s"]
    gradient_bytes = runs[1]["gradient_bytes"]
    figures["projection_measured_step"] = projection(runs[1]["synthetic_step_s"], gradient_bytes,
                                                     per_rank_samples)
    figures["projection_gpu_step"] = projection(args.gpu_step_ms / 1000, gradient_bytes,
                                                per_rank_samples)

    print(f"\n{args.preset} preset, {figures['parameters']:,} parameters, batch {args.batch_size}"
          f" x {args.window} predicted samples per rank, {args.threads} thread(s) per rank, "
          f"{figures['machine']}")
    print(f"{'':28}{'1 rank':>12}{'2 ranks':>12}{'efficiency':>12}")
    for kind in ("synthetic", "store"):
        print(f"{kind + ' input (samples/s)':28}{s[f'1_ranks_{kind}']:>12,.0f}"
              f"{s[f'2_ranks_{kind}']:>12,.0f}{figures[f'scaling_efficiency_{kind}']:>11.1%}")
    print(f"store / synthetic input: {figures['store_over_synthetic'][1]:.1%} (1 rank), "
          f"{figures['store_over_synthetic'][2]:.1%} (2 ranks); the input pipeline alone feeds "
          f"{figures['input_batches_per_s_one_rank']:.0f} batches/s "
          f"({figures['data_mode']} mode)")
    print(f"straightforward Keras WaveNet, 1 rank: {figures['keras_baseline_samples_per_s']:,.0f}"
          f" samples/s; dwave is {figures['speedup_over_keras']:.2f}x that")
    print(f"\nprojection: step = compute + ring allreduce of {gradient_bytes / 1e6:.1f} MB of "
          "gradients, 2(N-1)/N x bytes / bandwidth, no overlap (conservative), perfect input")
    for title, rows, step in [
            ("measured CPU step", figures["projection_measured_step"],
             runs[1]["synthetic_step_s"]),
            ("assumed GPU step", figures["projection_gpu_step"], args.gpu_step_ms / 1000)]:
        print(f"  {title} {1000 * step:.0f} ms:")
        print(f"  {'GPUs':>6}{'link':>10}{'allreduce':>12}{'efficiency':>12}{'samples/s':>14}")
        for row in rows:
            print(f"  {row['gpus']:>6}{row['link_gbps']:>7} Gb{row['allreduce_ms']:>10.1f}ms"
                  f"{row['efficiency']:>11.1%}{row['samples_per_s']:>14,.0f}")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(figures, f, indent=2)
    plot(figures, os.path.join(args.out, "train_scaling.png"))
    print(f"\nwrote {args.out}/train.json and {args.out}/train_scaling.png")


def plot(figures: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = figures["samples_per_s"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [1, 2]
    for kind, marker in (("synthetic", "o"), ("store", "s")):
        ax.plot(ranks, [s[f"{r}_ranks_{kind}"] for r in ranks], marker=marker,
                label=f"{kind} input")
    ax.plot(ranks, [r * s["1_ranks_synthetic"] for r in ranks], "k--", label="ideal")
    ax.axhline(figures["keras_baseline_samples_per_s"], color="grey", linestyle=":",
               label="straightforward Keras, 1 rank")
    ax.set_xlabel("Horovod ranks (1 thread each)")
    ax.set_ylabel("predicted samples / s")
    ax.set_xticks(ranks)
    ax.set_title(f"WaveNet {figures['preset']} training, weak scaling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
