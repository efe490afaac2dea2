"""`dwave` command line: a thin layer that parses flags and calls the modules.

Every user error (bad flag, bad config, missing input) ends as one line on stderr and exit
status 2; a traceback means a bug in dwave.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .demo import DemoConfig
from .errors import DwaveError, missing_package, printable
from .generate.command import GenerateConfig
from .generate.engines import ENGINES
from .model.config import MODEL_FLAGS, PRECISIONS, PRESETS
from .store.audio import (DEFAULT_MAX_SONG_MINUTES, DEFAULT_QUANTIZATION_CHANNELS,
                          DEFAULT_SAMPLE_RATE)
from .store.cluster import CLUSTER_KINDS, ClusterConfig
from .train.config import (DATA_MODES, DEFAULT_CACHE_BYTES, PRESET_LEARNING_RATES,
                           STREAM_WINDOWS_PER_READ, UNLABELLED_CHOICES, TrainConfig)
from .versions import version_line


def _int_at_least(minimum: int, kind: str):
    """An argparse type: an integer >= minimum, else a one-line error naming `kind`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _default(config_class, field: str):
    """A field's default, read from its config dataclass: the one place defaults are written
    (a flag's help shows it with %(default)s)."""
    (found,) = [f for f in dataclasses.fields(config_class) if f.name == field]
    return found.default_factory() if found.default_factory is not dataclasses.MISSING \
        else found.default


def _config_from(config_class, args, **values):
    """`config_class` from the parsed flags whose names are its fields, plus `values`."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{name: value for name, value in vars(args).items() if name in names},
                        **values)


def _add_preprocess(sub) -> None:
    p = sub.add_parser(
        "preprocess",
        help="decode songs into a store of mu-law tracks (Dask)",
        description=(
            "Decode songs, mix to mono, resample, peak-normalise and mu-law encode them into a "
            "Zarr store, in parallel with Dask. Rerunning on the same store skips finished "
            "tracks; bad files are reported and skipped."
        ),
        epilog=(
            "SOURCE is a file, a directory (recursive), a glob ('songs/**/*.mp3', quoted), a .zip "
            "archive (read in place), s3://bucket/prefix, or an http(s):// URL (append "
            "#sha256=HEX to check it). STORE is a directory or s3://bucket/prefix; S3 "
            "credentials and endpoint come from the AWS_* environment variables."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="songs to process")
    p.add_argument("--out", "-o", required=True, metavar="STORE", help="the store to write")
    p.add_argument("--sample-rate", type=_positive_int, metavar="HZ",
                   help=f"output sample rate (default: the store's, else {DEFAULT_SAMPLE_RATE})")
    p.add_argument("--quantization-channels", type=_positive_int, metavar="N",
                   help="mu-law codes, 2..65536 (default: the store's, else "
                        f"{DEFAULT_QUANTIZATION_CHANNELS})")
    _add_cluster_flags(p)
    p.add_argument("--metadata", metavar="CSV",
                   help="genres: FMA's tracks.csv, or a CSV with track_id,genre columns")
    p.add_argument("--overwrite", action="store_true", help="delete the store's contents first")
    p.add_argument("--storage-options", type=_json_object, metavar="JSON", default={},
                   help="fsspec options for an s3:// STORE (e.g. '{\"profile\": \"music\"}')")
    p.add_argument("--source-storage-options", type=_json_object, metavar="JSON", default={},
                   help="fsspec options for s3:// SOURCEs, separate from the store's (e.g. "
                        "'{\"anon\": true}' for a public bucket)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where http(s) downloads go (default: $DWAVE_CACHE_DIR or "
                        "~/.cache/dwave/downloads)")
    p.add_argument("--max-song-minutes", type=_positive_float, metavar="MIN",
                   default=DEFAULT_MAX_SONG_MINUTES,
                   help="a longer song is a failure, so a worker's memory stays bounded (4 bytes "
                        "per output sample) whatever the input (%(default)g)")
    p.add_argument("--retry-failed", action="store_true",
                   help="decode again the songs that failed in an earlier run and have not "
                        "changed since (by default they are counted, not tried again)")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any song failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_preprocess)


def _add_cluster_flags(p) -> None:
    g = p.add_argument_group(
        "where the Dask workers run",
        "Unset SLURM/EC2 values fall back to Dask's configuration (~/.config/dask/*.yaml or "
        "DASK_JOBQUEUE__SLURM__QUEUE, DASK_CLOUDPROVIDER__EC2__REGION, ... variables).")
    C = ClusterConfig
    g.add_argument("--cluster", dest="kind", choices=CLUSTER_KINDS, default=_default(C, "kind"),
                   help="local: worker processes on this machine (default); slurm: worker "
                        "jobs submitted with sbatch (dask-jobqueue; run from a login node); "
                        "ec2: EC2 instances (dask-cloudprovider; needs AWS credentials)")
    g.add_argument("--workers", "--jobs", type=_positive_int, metavar="N",
                   help="local worker processes (default: one per core), SLURM worker jobs or "
                        "EC2 instances (default 2)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="use a running Dask cluster (tcp://host:8786 or a scheduler JSON file)")
    g.add_argument("--wait-workers", type=_non_negative_int, metavar="N",
                   default=_default(C, "wait_workers"),
                   help="start once N workers have joined (default: 1 on a cluster, 0 locally)")
    g.add_argument("--dashboard-address", metavar="HOST:PORT",
                   default=_default(C, "dashboard_address"),
                   help="where the Dask dashboard of a cluster dwave starts (local, slurm) "
                        "listens (default "
                        "%(default)s, this machine only; 0.0.0.0:8787 opens it to others)")
    g.add_argument("--partition", metavar="NAME", help="SLURM partition of the worker jobs")
    g.add_argument("--walltime", metavar="HH:MM:SS", help="SLURM time limit of each worker job")
    g.add_argument("--account", metavar="NAME", help="SLURM account to charge")
    g.add_argument("--worker-memory", metavar="SIZE",
                   help="memory per SLURM worker job (default: jobqueue.yaml's, else 4GiB)")
    g.add_argument("--worker-cores", type=_positive_int, metavar="N",
                   help="cores per SLURM worker job (default: jobqueue.yaml's, else 1)")
    g.add_argument("--worker-processes", type=_positive_int, metavar="N",
                   help="Dask worker processes per SLURM job, sharing its cores (default: "
                        "jobqueue.yaml's, else 1)")
    g.add_argument("--worker-logs", dest="log_directory", metavar="DIR",
                   help="SLURM worker job logs (default: jobqueue.yaml's log-directory, else "
                        "./dask-worker-logs)")
    g.add_argument("--region", metavar="NAME", help="EC2 region")
    g.add_argument("--instance-type", metavar="TYPE", help="EC2 instance type (e.g. c6i.4xlarge)")
    g.add_argument("--ami", metavar="ID", help="EC2 machine image")
    g.add_argument("--docker-image", metavar="IMAGE",
                   help="image the EC2 workers run: dwave's own (the Dockerfile builds it; "
                        "README: Install elsewhere) pushed to a registry the instances reach")


def _cmd_preprocess(args) -> int:
    from .store.preprocess import run_preprocess

    summary = run_preprocess(
        args.sources,
        args.out,
        sample_rate=args.sample_rate,
        quantization_channels=args.quantization_channels,
        cluster=_config_from(ClusterConfig, args),
        metadata=args.metadata,
        overwrite=args.overwrite,
        storage_options=args.storage_options,
        source_storage_options=args.source_storage_options,
        cache_dir=args.cache_dir,
        max_song_minutes=args.max_song_minutes,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        log=_log,
    )
    for line in summary.lines():
        _log(line)
    if summary.store_tracks == 0:
        _log("dwave: error: no track could be written")
        return 1
    failed = len(summary.failures) + summary.known_failures
    if args.strict and failed:
        _log(f"dwave: error: {failed} songs failed (--strict)")
        return 1
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a store", description="Tracks, hours, sample "
                       "rate, genres and failures of a store.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--storage-options", type=_json_object, metavar="JSON", default={})
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    from .store.info import describe_store, format_description

    description = describe_store(args.store, args.storage_options)
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        print(format_description(description))
    return 0


def _add_store(sub) -> None:
    p = sub.add_parser("store", help="manage a store (upgrade, verify)",
                       description="Operations on a whole store.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser(
        "upgrade", help="convert a version-1 store to version 2 in place",
        description="Convert a store written by an earlier dwave (version 1: one Zarr array per "
                    "track) to version 2 (tracks packed into sharded parts, one track table), in "
                    "place, without decoding any song again. Safe to interrupt: run it again to "
                    "finish.")
    up.add_argument("store", metavar="STORE")
    up.add_argument("--storage-options", type=_json_object, metavar="JSON", default={})
    up.set_defaults(func=_cmd_store_upgrade)
    check = actions.add_parser(
        "verify", help="check that every track's shards are there and whole (and, with "
                       "--against-source, as long as its song)",
        description="Check every part of a store: its shard objects there at the size its "
                    "track table says (one listing of parts/; no codes read). Exit 1 if a part "
                    "is damaged. --repair moves damaged parts aside (to STORE/damaged/, kept) "
                    "and drops their tracks from the index, so that `dwave preprocess` writes "
                    "them again.")
    check.add_argument("store", metavar="STORE")
    check.add_argument("--repair", action="store_true",
                       help="move damaged parts aside so a preprocess rerun redoes their tracks")
    check.add_argument("--against-source", action="store_true",
                       help="also decode every track's source again (on Dask workers, as "
                            "preprocess does) and name the tracks whose stored length differs "
                            "from it by more than 50 ms: songs an older dwave cut short; with "
                            "--repair their parts are set aside to be written again in full")
    check.add_argument("--storage-options", type=_json_object, metavar="JSON", default={})
    check.add_argument("--source-storage-options", type=_json_object, metavar="JSON",
                       default={}, help="fsspec options for s3:// sources (--against-source)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster_flags(check)
    check.set_defaults(func=_cmd_store_verify)


def _cmd_store_verify(args) -> int:
    from .store.verify import verify_store

    whole = verify_store(args.store, args.storage_options, args.repair, log=_log,
                         against_source=args.against_source,
                         cluster=_config_from(ClusterConfig, args),
                         source_storage_options=args.source_storage_options,
                         progress=not args.no_progress)
    return 0 if whole else 1


def _cmd_store_upgrade(args) -> int:
    from .store.upgrade import upgrade_store

    upgrade_store(args.store, args.storage_options, log=_log)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the whole job end to end on a synthesised corpus",
        description="Synthesise a small corpus of songs (or take --source DIR), preprocess it "
                    "with Dask, train the tiny WaveNet with 2 Horovod ranks and generate two "
                    "songs. Needs no data and no network.")
    D = DemoConfig
    p.add_argument("--out", default=_default(D, "out"), metavar="DIR",
                   help="where the corpus, store and results go (%(default)s)")
    p.add_argument("--source", metavar="DIR", help="use these songs instead of synthesising")
    p.add_argument("--songs", type=_positive_int, default=_default(D, "songs"),
                   help="songs to synthesise (%(default)s)")
    p.add_argument("--seconds", type=_positive_int, default=_default(D, "seconds"),
                   help="length of each (%(default)s)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="Dask worker processes (default: one per core)")
    p.add_argument("--steps", type=_positive_int, default=_default(D, "steps"),
                   help="training steps of the tiny model (%(default)s)")
    p.add_argument("--ranks", type=_positive_int, default=_default(D, "ranks"),
                   help="Horovod ranks to train with, started by horovodrun (%(default)s)")
    p.add_argument("--generate-seconds", type=float, default=_default(D, "generate_seconds"),
                   help="length of each generated song (%(default)g)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(_config_from(DemoConfig, args), log=_log)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a WaveNet on a store (Horovod data-parallel)",
        description=(
            "Train a WaveNet on the tracks of STORE. Runs as one process, or as N ranks under "
            "`horovodrun -np N`, `mpirun -np N` or `srun`: gradients are averaged over the ranks "
            "every step. Rerun with the same --run-dir to resume; SIGTERM checkpoints and exits."
        ),
        epilog="Model flags (--preset, channel sizes) are fixed when a run dir is created; "
               "rerunning with different ones is an error. TensorBoard: "
               "`tensorboard --logdir RUN_DIR/tensorboard`.",
    )
    p.add_argument("store", metavar="STORE", help="a store made by `dwave preprocess`")
    p.add_argument("--run-dir", required=True, metavar="DIR",
                   help="checkpoints, config.json and TensorBoard logs (resumed if present)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="model size (default: the run dir's, else tiny)")
    for field, meaning in MODEL_FLAGS.items():
        p.add_argument(f"--{field.replace('_', '-')}", type=_positive_int, metavar="N",
                       help=f"{meaning} (overrides the preset)")
    T = TrainConfig
    p.add_argument("--steps", type=_positive_int, default=_default(T, "steps"),
                   help="total steps (%(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=_default(T, "batch_size"),
                   help="windows per rank per step (%(default)s)")
    p.add_argument("--lr", type=_positive_float,
                   help="Adam learning rate for one rank; N ranks use N x this (default: the "
                        "run dir's, else the preset's: "
                        + ", ".join(f"{k} {v:g}" for k, v in PRESET_LEARNING_RATES.items()) + ")")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=_default(T, "warmup_steps"),
                   help="with N ranks, the rate climbs linearly from --lr to N x --lr over "
                        "this many steps; one rank has no warm-up (%(default)s)")
    p.add_argument("--decay-to", type=_positive_float, default=_default(T, "decay_to"),
                   metavar="F",
                   help="after the warm-up, lower the rate along a half cosine to F x its peak "
                        "at the last step; 1 keeps it constant (%(default)g)")
    p.add_argument("--clip-norm", type=float, default=_default(T, "clip_norm"), metavar="X",
                   help="clip the gradients' global norm to X; 0: no clipping (%(default)g)")
    p.add_argument("--ema", type=float, default=_default(T, "ema"), metavar="M",
                   help="validate, listen and generate with an exponential moving average "
                        "of the weights, decay M; 0: the weights themselves (%(default)g)")
    p.add_argument("--window", type=_positive_int, default=_default(T, "window"),
                   help="predicted samples per window; the span read from the store is the "
                        "receptive field - 1 longer (%(default)s)")
    p.add_argument("--genre-conditioning", action="store_true",
                   default=_default(T, "genre_conditioning"),
                   help="condition on the store's genres (global conditioning)")
    p.add_argument("--unlabelled", choices=UNLABELLED_CHOICES, default=_default(T, "unlabelled"),
                   help="with --genre-conditioning, tracks the store has no genre for (about "
                        "half of fma_large): one more class named 'unknown' (class, the "
                        "default; the start line counts them) or left out (skip)")
    p.add_argument("--val-every", type=_positive_int, default=_default(T, "val_every"),
                   help="steps between validation passes (%(default)s)")
    p.add_argument("--ckpt-every", type=_positive_int, default=_default(T, "ckpt_every"),
                   help="steps between checkpoints (%(default)s)")
    p.add_argument("--keep-checkpoints", type=_positive_int,
                   default=_default(T, "keep_checkpoints"),
                   help="how many recent checkpoints to keep (%(default)s)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=_default(T, "precision"),
                   help="the matrix products' type: " + "; ".join(
                       f"{name}: {what}" for name, what in PRECISIONS.items())
                   + " (%(default)s)")
    p.add_argument("--seed", type=_non_negative_int, default=_default(T, "seed"),
                   help="initial weights, windows (%(default)s)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="TensorFlow threads per rank (default: cores / ranks on the node)")
    p.add_argument("--listen-seconds", type=float, default=_default(T, "listen_seconds"),
                   metavar="S",
                   help="at each validation, write a sample of S seconds generated from the "
                        "current weights to RUN_DIR/samples and TensorBoard; 0 turns it off "
                        "(%(default)g)")
    p.add_argument("--data-mode", choices=DATA_MODES,
                   help="hold the training tracks in memory, or read windows from the store "
                        f"(default: memory when they fit in {DEFAULT_CACHE_BYTES / 2**30:g} GiB)")
    p.add_argument("--windows-per-read", type=_positive_int, metavar="K",
                   help="training windows drawn together from one read of the store, shuffled "
                        "across a round of steps: K times fewer requests (default: "
                        f"{STREAM_WINDOWS_PER_READ} in stream mode, 1 in memory mode)")
    p.add_argument("--stall-minutes", type=float, default=_default(T, "stall_minutes"),
                   help="with several ranks: end the job when no step completes for this long "
                        "(a rank stopped or hung would otherwise hold the others forever; "
                        "0: never) (%(default)g)")
    p.add_argument("--on-bad-track", choices=("stop", "skip"), default=_default(T, "on_bad_track"),
                   help="a track whose shards are missing or cut short (checked at the start: "
                        "one listing of the parts): stop the run (default), or leave it out and "
                        "say how many")
    p.add_argument("--storage-options", type=_json_object, metavar="JSON", default={})
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train.loop import run_training

    overrides = {field: getattr(args, field) for field in MODEL_FLAGS
                 if getattr(args, field) is not None}  # the flags given, nothing else
    summary = run_training(_config_from(TrainConfig, args), args.run_dir, args.preset,
                           overrides, args.storage_options, log=_log)
    if summary.get("stopped"):
        # Stopped by a signal, everything written (checkpoint, logs, TensorBoard flushed): a
        # launcher's kill follows its SIGTERM within seconds (horovodrun 5 s, mpirun 1 s), and
        # the interpreter's teardown of TensorFlow's and Horovod's threads can take longer.
        # Leave now, with the status a finished stop deserves.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# `dwave status`'s exit status for a run that has not reached its last step: distinct from 1
# and 2 (errors), so a job script can tell "resume it" from "something is wrong".
EXIT_NOT_FINISHED = 3


def _add_status(sub) -> None:
    p = sub.add_parser(
        "status", help="how far a training run, or a generation into a directory, is",
        description="For a `dwave train` run dir: the step of the last checkpoint and the steps "
                    "asked for (config.json). For a `dwave generate` --out: the songs finished "
                    "and asked for (.dwave-generate/job.json). Exit status 0 when all is done, "
                    f"{EXIT_NOT_FINISHED} when not (rerun the same command to resume), 2 on an "
                    "error. slurm/train.sbatch and generate.sbatch use it to decide whether to "
                    "requeue.")
    p.add_argument("run_dir", metavar="DIR", help="a `dwave train` run dir or a `dwave "
                                                  "generate` --out")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args) -> int:
    from .generate.job import GenerationJob
    from .model.rundir import read_progress

    job = GenerationJob(args.run_dir)
    if job.recorded() is not None:
        done, songs = job.progress()
        finished = done >= songs
        print(f"{args.run_dir}: {done} of {songs} song(s) finished" + (
            "" if finished else f", {len(job.in_progress())} in progress: rerun the same "
            "`dwave generate` to resume"))
    else:
        step, steps = read_progress(args.run_dir)
        finished = step >= steps
        print(f"{args.run_dir}: step {step} of {steps}, " + (
            "finished" if finished else "not finished: rerun the same `dwave train` to resume"))
    return 0 if finished else EXIT_NOT_FINISHED


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="write new songs with a trained model (fast cached sampling)",
        description=(
            "Generate songs with the model of a `dwave train` run dir: cached (fast WaveNet) "
            "sampling, all songs of a rank in one batch. Under `mpirun -np N` (or horovodrun, "
            "srun) song i goes to rank i mod N; file names and audio do not depend on N."
        ),
        epilog="Writes OUT/song-000.wav (16-bit PCM at the model's sample rate) and "
               "OUT/song-000.png (its spectrogram) per song, each when it is whole. A job "
               "stopped by a signal (SLURM's time-limit warning, scancel --signal=TERM) or "
               "killed is resumed by the same command: finished songs are skipped, the others "
               "continue from their last save (OUT/.dwave-generate/) and come out byte for "
               "byte as an uninterrupted run's. `dwave status OUT` says how far it is.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `dwave train` run directory")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="where the songs go")
    G = GenerateConfig
    p.add_argument("--seconds", type=float, default=_default(G, "seconds"),
                   help="length of each song (%(default)g)")
    p.add_argument("--num-songs", type=_positive_int, default=_default(G, "num_songs"),
                   help="how many songs (%(default)s)")
    p.add_argument("--temperature", type=float, default=_default(G, "temperature"),
                   help="sampling temperature; 0 = always the most likely code (%(default)g)")
    p.add_argument("--seed", type=_non_negative_int, default=_default(G, "seed"),
                   help="random seed (%(default)s)")
    p.add_argument("--prime", metavar="FILE",
                   help="start from the opening of this song (any format preprocess reads)")
    p.add_argument("--prime-seconds", type=float, default=_default(G, "prime_seconds"),
                   help="how much of --prime to use (%(default)g)")
    p.add_argument("--genre", help="genre to generate (models trained with --genre-conditioning)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a checkpoint prefix, e.g. RUN_DIR/checkpoints/ckpt-500 (default: latest)")
    p.add_argument("--batch-size", type=_positive_int, default=_default(G, "batch_size"),
                   help="songs generated together per rank (%(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace songs dwave wrote earlier in --out and drop "
                        "another request's songs in progress (files dwave did not write are "
                        "never replaced)")
    p.add_argument("--threads", type=_positive_int,
                   help="threads per rank, each stepping its share of the batch (default: the "
                        "rank's cores: those it is bound to, or its share of the node's)")
    p.add_argument("--engine", choices=ENGINES,
                   help="what advances the songs: cpu (the rank's cores) or cuda (its GPU, "
                        "through Numba; thousands of songs per batch). Default: cuda where "
                        "Numba finds a GPU, else cpu. The two differ by float rounding, so a "
                        "job is continued with the engine it was started with")
    p.add_argument("--save-every", type=float, default=_default(G, "save_every"),
                   metavar="SECONDS",
                   help="save every song in progress this often, so that a killed job loses at "
                        "most this much work (%(default)g; 0: only on SIGTERM/SIGUSR1/Ctrl-C, "
                        "which always save and stop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from .generate.command import run_generate

    run_generate(_config_from(GenerateConfig, args, progress=not args.no_progress), log=_log)
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_slurm_scripts(sub) -> None:
    p = sub.add_parser(
        "slurm-scripts", help="copy the SLURM batch scripts into a directory",
        description="Copy dwave's sbatch scripts (preprocess, train, generate) and env.sh, "
                    "which they source, into DIR: a pip-installed dwave has no checkout to "
                    "submit them from. A file already in DIR with other contents is kept.")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=_cmd_slurm_scripts)


def _cmd_slurm_scripts(args) -> int:
    from .slurm_scripts import copy_scripts

    copied = copy_scripts(args.directory)
    print(f"{args.directory}: {', '.join(copied) if copied else 'the scripts were already there'}"
          f"; submit with e.g. sbatch {os.path.join(args.directory, 'train.sbatch')} STORE RUN_DIR "
          "(env.sh says how a job finds dwave)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwave",
        description="A music archive in, a WaveNet that writes new songs out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version's line unwrapped
    )
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print dwave's version and those of its engines, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_preprocess(sub)
    _add_info(sub)
    _add_store(sub)
    _add_train(sub)
    _add_status(sub)
    _add_generate(sub)
    _add_demo(sub)
    _add_slurm_scripts(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's start-up INFO lines (CPU features, oneDNN) on every command say nothing a
    # user can act on; its warnings and errors still print.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DwaveError as exc:
        print(f"dwave: error: {printable(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        what = missing_package(exc)
        if what is None:
            raise
        print(f"dwave: error: `dwave {args.command}` needs {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dwave: interrupted" + (": finished tracks are kept in the store; rerun the same "
                                      "command to resume" if args.command == "preprocess"
                                      else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `dwave info STORE | head -1`: the reader left. Point stdout at /dev/null so the
        # interpreter's own flush at exit does not fail again, and exit as SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
