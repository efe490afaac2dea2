#!/usr/bin/env bash
# One idempotent set-up: system packages -> .venv with the locked dependencies (TensorFlow
# 2.15.1) and the project -> Horovod 0.28.1 built against them -> the fused kernels.
# Every step checks whether it is already done, so a second run takes seconds.
#
#   bash scripts/setup.sh            what a user needs (a compiler, cmake, Open MPI, Python 3.11)
#   bash scripts/setup.sh --tests    and what only the test suite needs (a one-machine SLURM,
#                                    munge, ffmpeg, asc-music's songs)
#
# System packages are installed with apt-get when this is Debian/Ubuntu and we are root (or
# have sudo without a password); otherwise, or with DWAVE_APT=0, the missing ones are listed
# and the rest goes on: on a cluster, `module load` a compiler, Open MPI and Python 3.11 first.
#
# Knobs (environment variables):
#   DWAVE_TF_FLAVOUR=cpu|gpu   TensorFlow build (default cpu; gpu = tensorflow[and-cuda] and a
#                              Horovod built with NCCL: needs the CUDA toolkit on the machine)
#   DWAVE_PYTHON=python3       interpreter that makes .venv: must be Python 3.11
#   DWAVE_VENV=.venv           where the virtual environment lives
#   DWAVE_APT=0                never run apt-get
set -euo pipefail
cd "$(dirname "$0")/.."

TESTS=0; [ "${1:-}" = --tests ] && TESTS=1
FLAVOUR=${DWAVE_TF_FLAVOUR:-cpu}
PY=${DWAVE_PYTHON:-python3}
VENV=${DWAVE_VENV:-.venv}

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# --- 0. Python 3.11, and nothing else ------------------------------------------------------
# TensorFlow 2.15 has wheels up to 3.11 and zarr 3 needs >= 3.11: the window is exactly 3.11.
python_is_311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }
check_python() {
  if [ -x "$VENV/bin/python" ]; then
    python_is_311 "$VENV/bin/python" || die "$VENV holds $("$VENV/bin/python" --version 2>&1); \
dwave needs Python 3.11: move $VENV away and rerun with DWAVE_PYTHON=python3.11"
  elif ! python_is_311 "$PY"; then
    found=$("$PY" --version 2>&1 || echo "no $PY")
    die "$found: dwave needs Python 3.11 (TensorFlow 2.15's newest, zarr 3's oldest): install \
it (Debian 12: python3; Ubuntu: the deadsnakes PPA's python3.11; a cluster: module load \
python/3.11; conda create -n py311 python=3.11) and rerun with DWAVE_PYTHON=python3.11"
  fi
}
# Now, before anything is installed; a machine with no Python at all (a minimal Debian) gets
# Debian's from step 1 and is checked after it.
if [ -x "$VENV/bin/python" ] || command -v "$PY" >/dev/null; then check_python; fi

# --- 1. system packages ------------------------------------------------------------------
# A user's: g++ + cmake + make + Open MPI to build and launch Horovod (and the fused kernels),
# the venv module and headers, libsndfile. The tests': slurm-wlm + munge (the one-machine SLURM
# the tests submit the project's sbatch scripts to), asc-music (three real MP3 songs), ffmpeg
# (the decode floor in benchmarks).
USER_PACKAGES=(python3 g++ make cmake openmpi-bin libopenmpi-dev python3-venv python3-dev
               libsndfile1 procps git ca-certificates)
TEST_PACKAGES=(slurm-wlm munge asc-music ffmpeg)
wanted=("${USER_PACKAGES[@]}")
[ "$TESTS" = 1 ] && wanted+=("${TEST_PACKAGES[@]}")
missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
SUDO=""
can_apt=0
if [ "${DWAVE_APT:-1}" != 0 ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then can_apt=1
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; can_apt=1; fi
fi
if [ ${#missing[@]} -eq 0 ]; then
  say "system packages present"
elif [ "$can_apt" = 1 ]; then
  say "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "not installing system packages (not root, DWAVE_APT=0 or no apt-get); missing: ${missing[*]}"
fi
# Without apt (a cluster, a non-root laptop), what the next steps need, by command.
command -v mpicxx >/dev/null && command -v cmake >/dev/null && command -v g++ >/dev/null \
  || say "no compiler, cmake or MPI on PATH: Horovod cannot be built (module load them, or \
apt-get install g++ cmake libopenmpi-dev); dwave then trains on one process"

check_python

# --- 2. virtual environment with the locked dependencies and the project -------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV" || die "$PY -m venv $VENV failed: install python3.11-venv (or use \
DWAVE_PYTHON=/path/to/python3.11 with its venv module)"
fi
# The lock (requirements/, hashes of every file) is what the tests pass with; reinstall only
# when it or the project's declaration changed.
case "$FLAVOUR-$TESTS" in
  cpu-1) lock=requirements/test.txt ;;
  cpu-0) lock=requirements/cpu.txt ;;
  gpu-*) lock=requirements/gpu.txt ;;
  *) die "DWAVE_TF_FLAVOUR=$FLAVOUR: choose cpu or gpu" ;;
esac
stamp="$VENV/.dwave-installed"
want="$(cat setup.cfg pyproject.toml "$lock" | sha256sum | cut -c1-16)-$FLAVOUR-$TESTS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the locked dependencies ($lock: TensorFlow 2.15.1 $FLAVOUR) into $VENV"
  "$VENV/bin/pip" install -q --require-hashes -r "$lock"
  extras=""; [ "$FLAVOUR-$TESTS" = gpu-1 ] && extras="[test]"  # the test tools, unlocked
  # The locked setuptools builds it (no isolated build env with whatever setuptools is newest).
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  [ -z "$extras" ] || "$VENV/bin/pip" install -q -e ".$extras"
  echo "$want" > "$stamp"
else
  say "python packages up to date"
fi

# --- 3. Horovod, built against this TensorFlow and MPI -------------------------------------
bash scripts/install-horovod.sh "$VENV/bin/python" "$FLAVOUR" \
  || say "Horovod not installed (see above): training runs on one process until it is"

# --- 4. dwave's fused CPU kernels (dwave/model/fused_ops.cc), built now rather than at the first run --
"$VENV/bin/python" -c "from dwave.model import fused_ops; fused_ops.load()" 2>&1 \
  | grep -v -E "^20..-|^To enable the following instructions" || true

say "ready: $("$VENV/bin/dwave" --version)"
