"""Fused CPU kernels for the training step (dwave/model/fused_ops.cc), built on first use.

The C++ source is compiled with the host's compiler (`g++`, or $CXX) against the installed
TensorFlow's headers, for this machine's CPU (-march=native), into a cache keyed by everything
that makes a build differ: the source, TensorFlow's version and flags, the compiler, the CPU.
Ranks of one job that start together build it once (a file lock); a cluster whose nodes differ
gets one build per kind of CPU. Where no build is possible (no compiler, a failed build, a
GPU: the kernels are CPU-only), `load()` says why once and the model uses TensorFlow's own ops
for the same arithmetic; DWAVE_FUSED_OPS=0 asks for that explicitly.

The cache is $DWAVE_CACHE/ops (default ~/.cache/dwave/ops). DWAVE_MARCH names a portable
x86-64 level instead of -march=native (x86-64-v3: AVX2 and FMA, any x86 CPU since 2015): one
build then serves every node that has the level, as the container image prebuilds it; a CPU
without it is told so and uses TensorFlow's ops.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_ops.cc")
DISABLE_VARIABLE = "DWAVE_FUSED_OPS"

_loaded: dict[str, object] = {}  # "module" or "reason", once per process


def cache_dir() -> str:
    root = os.environ.get("DWAVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "dwave")
    return os.path.join(root, "ops")


MARCH_VARIABLE = "DWAVE_MARCH"
# What each portable level needs of the CPU (/proc/cpuinfo's flag names), beyond x86-64-v2's.
_LEVEL_FLAGS = {"x86-64-v3": {"avx2", "fma", "bmi2", "movbe"},
                "x86-64-v4": {"avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512vl"}}


def _march() -> str:
    return os.environ.get(MARCH_VARIABLE) or "native"


def _check_cpu_has(march: str) -> None:
    """A build for a level this CPU lacks would die of SIGILL: refuse it in words."""
    if march not in _LEVEL_FLAGS:
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f
                          if line.startswith("flags")), set())
    except OSError:
        return
    missing = _LEVEL_FLAGS[march] - flags
    if missing:
        raise RuntimeError(f"{MARCH_VARIABLE}={march} needs {', '.join(sorted(missing))}, which "
                           f"this CPU lacks (set {MARCH_VARIABLE}=native to build for it)")


def _cpu_identity() -> str:
    """The CPU model and feature flags: what -march=native compiles for."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _command(output: str) -> list[str]:
    return [_compiler(), "-shared", "-fPIC", "-O3", f"-march={_march()}", SOURCE, "-o", output,
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _build_key() -> str:
    compiler = shutil.which(_compiler())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout if compiler else ""
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        digest.update(f.read())
    # A portable level is the same build on every CPU that has it: the CPU is not in the key.
    cpu = _cpu_identity() if _march() == "native" else ""
    for part in (tf.__version__, " ".join(_command("out")), version, cpu):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def build() -> str:
    """Path of the shared library for this machine, compiling it unless cached. Raises
    RuntimeError (with the compiler's last lines) when it cannot be built."""
    _check_cpu_has(_march())
    folder = os.path.join(cache_dir(), _build_key())
    library = os.path.join(folder, "fused_ops.so")
    if os.path.exists(library):  # prebuilt (the container image's): no compiler needed
        return library
    if shutil.which(_compiler()) is None:
        raise RuntimeError(f"no C++ compiler ({_compiler()}) on PATH")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank building it: wait, then use its build
        if os.path.exists(library):
            return library
        handle, partial = tempfile.mkstemp(dir=folder, prefix="fused_ops.", suffix=".partial")
        os.close(handle)
        try:
            done = subprocess.run(_command(partial), capture_output=True, text=True,
                                  timeout=600)
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                raise RuntimeError(f"{_compiler()} failed building {SOURCE}:\n{tail}")
            os.replace(partial, library)  # whole or absent: a killed build leaves no library
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return library


def load():
    """The loaded op module, or None (the reason printed once to stderr, or kept quiet when
    DWAVE_FUSED_OPS=0 asked for TensorFlow's ops)."""
    if "module" in _loaded:
        return _loaded["module"]
    module, reason = None, None
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        reason = f"{DISABLE_VARIABLE}=0"  # asked for: nothing to say
    else:
        try:
            if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
                raise RuntimeError(f"untested CPU architecture {platform.machine()}")
            module = tf.load_op_library(build())
            _register_gradients(module)
        except OSError as error:  # the cache folder cannot be written (or read)
            reason = (f"{error} (the cache of built kernels: set DWAVE_CACHE to a writable "
                      "folder)")
        except (RuntimeError, subprocess.SubprocessError, tf.errors.OpError) as error:
            reason = str(error)
        if module is None:
            print(f"dwave: fused CPU kernels unavailable, training uses TensorFlow's own ops "
                  f"(slower): {reason}", file=sys.stderr)
    _loaded["module"], _loaded["reason"] = module, reason
    return module


def for_training(precision: str):
    """The kernels for a training step whose products run in `precision` (dwave.model.config's
    PRECISIONS), or None for TensorFlow's own ops: they are CPU-only (none while a GPU is
    visible) and read float32 and bfloat16 only (none for mixed precision's float16)."""
    if precision not in ("fp32", "bf16") or tf.config.list_physical_devices("GPU"):
        return None
    return load()


def _register_gradients(module) -> None:
    @tf.RegisterGradient("DwaveGate")
    def _gate_grad(op, dz):
        return module.dwave_gate_grad(op.inputs[0], op.inputs[1], dz)

    @tf.RegisterGradient("DwavePairs")
    def _pairs_grad(op, dx):
        return module.dwave_pairs_grad(dx, Tin=op.get_attr("Tin"),
                                       dilation=op.get_attr("dilation"))

    @tf.RegisterGradient("DwavePairsGrad")
    def _pairs_grad_grad(op, ddh):
        return module.dwave_pairs(ddh, Tout=op.get_attr("Tout"),
                                  dilation=op.get_attr("dilation"))

    @tf.RegisterGradient("DwaveResidual")
    def _residual_grad(op, dout):
        dr, dbias = module.dwave_residual_grad(dout, Tr=op.get_attr("Tr"))
        return dout, dr, dbias
