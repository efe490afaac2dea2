#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian machine (run as root, or with sudo rights):
#   system packages -> .venv with TensorFlow 2.15.1 + the project -> Horovod 0.28.1 build.
# Every step checks whether it is already done, so a second run takes seconds.
#
# Knobs (environment variables):
#   DWAVE_TF_FLAVOUR=cpu|gpu   TensorFlow build to install (default cpu; gpu = tensorflow[and-cuda]
#                              and a Horovod built with NCCL: needs the CUDA toolkit on the machine)
#   DWAVE_PYTHON=python3       interpreter used to create .venv (Python 3.11 is what TF 2.15 + Horovod
#                              0.28.1 are checked with)
#   DWAVE_VENV=.venv           where the virtual environment lives
set -euo pipefail
cd "$(dirname "$0")/.."

FLAVOUR=${DWAVE_TF_FLAVOUR:-cpu}
PY=${DWAVE_PYTHON:-python3}
VENV=${DWAVE_VENV:-.venv}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- 1. system packages ------------------------------------------------------------------
# openmpi + cmake + g++: to build and launch Horovod; ffmpeg: the decode floor in benchmarks;
# asc-music: three real MP3 songs the tests use; slurm-wlm + munge: the one-machine SLURM the
# tests submit the project's sbatch scripts to.
APT_PACKAGES=(openmpi-bin libopenmpi-dev cmake g++ make git ffmpeg asc-music slurm-wlm munge
              libsndfile1 python3-venv python3-dev procps)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "system packages present"
fi

# --- 2. virtual environment with TensorFlow and the project --------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
# Re-install only when the project's dependency declaration changed.
stamp="$VENV/.dwave-installed"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-$FLAVOUR"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the project and its dependencies (TensorFlow 2.15.1 $FLAVOUR) into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip wheel "setuptools<70"
  # One resolve for everything, so numpy stays < 2 (TF 2.15 breaks on numpy 2).
  "$VENV/bin/pip" install -q -e ".[$FLAVOUR,test]"
  echo "$want" > "$stamp"
else
  say "python packages up to date"
fi

# --- 3. Horovod, built against this TensorFlow and Open MPI --------------------------------
if ! "$VENV/bin/python" -c "import horovod.tensorflow" 2>/dev/null; then
  say "building Horovod 0.28.1 (about 3 minutes)"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
  if [ "$FLAVOUR" = gpu ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  # --no-build-isolation: Horovod must compile against the TensorFlow already in the venv.
  "$VENV/bin/pip" install -q --no-build-isolation --no-cache-dir horovod==0.28.1
fi
# --- 4. dwave's fused CPU kernels (dwave/fused_ops.cc), built now rather than at the first run --
"$VENV/bin/python" -c "from dwave import fused_ops; fused_ops.load()" 2>&1 | grep -v "^20..-" || true

say "ready: $("$VENV/bin/python" -c 'import tensorflow as tf, horovod, numpy; print(f"tensorflow {tf.__version__}, horovod {horovod.__version__}, numpy {numpy.__version__}")' 2>/dev/null)"
