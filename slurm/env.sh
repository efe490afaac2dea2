# Sourced by every script in slurm/: the one place that makes `dwave` runnable inside a job.
# Edit this file (or set the variables before `sbatch`; sbatch passes your environment on) to
# match your cluster:
#
#   DWAVE_HOME     the dwave checkout (default: the directory you ran `sbatch` from)
#   DWAVE_VENV     the virtual environment holding dwave (default: $DWAVE_HOME/.venv, made by
#                  scripts/setup.sh, else the one whose `dwave` is on the PATH sbatch passed on:
#                  a pip-installed dwave in an activated venv)
#   DWAVE_MODULES  environment modules to load first, space-separated, e.g.
#                  "cuda/12.2 cudnn/8.9 openmpi/4.1" (default: none)
#
# Also sets the Open MPI run-as-root switches when the job runs as root (containers, the
# one-machine test SLURM), and prints one line saying what the job is and where it runs.

DWAVE_HOME=${DWAVE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ -n "${DWAVE_MODULES:-}" ]; then
  # shellcheck disable=SC2086
  module load $DWAVE_MODULES
fi
if [ -z "${DWAVE_VENV:-}" ]; then
  DWAVE_VENV=$DWAVE_HOME/.venv
  if [ ! -x "$DWAVE_VENV/bin/dwave" ] && command -v dwave >/dev/null; then
    DWAVE_VENV=$(dirname "$(dirname "$(command -v dwave)")")
  fi
fi

if [ ! -x "$DWAVE_VENV/bin/dwave" ]; then
  echo "dwave job: no dwave in $DWAVE_VENV (set DWAVE_VENV to the venv you pip-installed" \
       "dwave into, or run scripts/setup.sh in $DWAVE_HOME)" >&2
  exit 2
fi
# shellcheck disable=SC1091
source "$DWAVE_VENV/bin/activate"
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export PYTHONUNBUFFERED=1  # log lines reach the job's output file as they happen
# mpirun kills its ranks 1 s after the SIGTERM it sends them (Open MPI's default): too little for
# rank 0 to finish its step and write a large checkpoint on a busy node. 30 s, unless set.
export OMPI_MCA_odls_base_sigkill_timeout=${OMPI_MCA_odls_base_sigkill_timeout:-30}

dwave_job_banner() {
  echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-dwave} job ${SLURM_JOB_ID:-?}" \
       "(restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-1} tasks on" \
       "${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-$(hostname)}; dwave from $DWAVE_VENV"
}
