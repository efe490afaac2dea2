#!/usr/bin/env bash
# Builds Horovod 0.28.1 into a Python environment that already holds TensorFlow 2.15.1: the one
# recipe that scripts/setup.sh, the Dockerfile and a user's own venv (README, "pip install")
# share.
#   bash scripts/install-horovod.sh [PYTHON] [cpu|gpu]
# PYTHON: the environment's interpreter (default: python3 on PATH); gpu adds NCCL (needs the
# CUDA toolkit, nvcc on PATH or CUDA_HOME). Needs a C++ compiler, cmake and MPI (mpicxx).
set -euo pipefail
PY=${1:-python3}
FLAVOUR=${2:-cpu}
if "$PY" -c "import horovod.tensorflow" 2>/dev/null; then
  echo "[horovod] already installed: $("$PY" -c 'import horovod; print(horovod.__version__)')"
  exit 0
fi
"$PY" -c "import tensorflow" 2>/dev/null || {
  echo "install-horovod: TensorFlow is not importable by $PY: install dwave first" \
       "(pip install 'wavenet-dwave[cpu]')" >&2; exit 1; }
for tool in cmake mpicxx; do
  command -v "$tool" >/dev/null || {
    echo "install-horovod: no $tool on PATH: install a compiler, cmake and MPI" \
         "(Debian: apt-get install g++ cmake libopenmpi-dev; a cluster: module load ...)" >&2
    exit 1; }
done
nccl=""; [ "$FLAVOUR" != gpu ] || nccl=" and NCCL"
echo "[horovod] building Horovod 0.28.1 with MPI and Gloo$nccl (about 3 minutes)"
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
if [ "$FLAVOUR" = gpu ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
# --no-build-isolation: Horovod must compile against the TensorFlow already installed.
"$PY" -m pip install -q --no-build-isolation --no-cache-dir horovod==0.28.1
"$PY" -c "import horovod.tensorflow as hvd; print('[horovod] built:', 'MPI' if hvd.mpi_built() else '', 'Gloo' if hvd.gloo_built() else '', 'NCCL' if hvd.nccl_built() else '')"
