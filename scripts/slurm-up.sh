#!/usr/bin/env bash
# Start a real one-machine SLURM (munge + slurmctld + slurmd, all on this host) for the tests
# and for trying the sbatch scripts in slurm/ on a laptop. Idempotent: a second run checks that
# the node answers and returns in a second. Run as root (or with sudo rights); needs the
# Debian packages slurm-wlm and munge (scripts/setup.sh --tests installs them).
#
#   bash scripts/slurm-up.sh          start (or check) the cluster, print `sinfo`
#   bash scripts/slurm-up.sh stop     stop slurmd, slurmctld and munged
#
# The configuration is the smallest real one: one node with this machine's cores, one
# partition "debug", no accounting database (job states come from `scontrol show job`, kept
# for an hour after a job ends), requeue allowed (a requeued job restarts after 10 s). A config
# written by someone else is left alone unless it carries our marker line.
set -euo pipefail

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
HOST=$(hostname -s)
# The machine's CPUs, not `nproc`: that honours OMP_NUM_THREADS, which Dask and TensorFlow
# set in the processes that may call this script. Declared as at least 4 (config_overrides:
# slurmd accepts a node smaller than its line), so that the tests can submit worker jobs of
# the 4-core shape a site's jobqueue.yaml asks for on a 2-core machine.
CPUS=$(getconf _NPROCESSORS_ONLN)
[ "$CPUS" -ge 4 ] || CPUS=4
# Memory in MB, less 1 GiB for the system: jobs that ask for --mem (dask-jobqueue does) fit.
MEMORY_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
CONF=/etc/slurm/slurm.conf
MARKER="# written by dwave scripts/slurm-up.sh"
say() { printf '\033[1m[slurm]\033[0m %s\n' "$*"; }

if [ "${1:-}" = stop ]; then
  $SUDO pkill -x slurmd || true
  $SUDO pkill -x slurmctld || true
  $SUDO pkill -x munged || true
  say "stopped"
  exit 0
fi

command -v slurmctld >/dev/null || { echo "slurm-up: slurmctld not found: install slurm-wlm (bash scripts/setup.sh --tests)" >&2; exit 1; }

# --- configuration -------------------------------------------------------------------------
want=$(cat <<EOF
$MARKER
ClusterName=dwave
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds before it may start again (SLURM's default 120).
AuthInfo=cred_expire=10
MinJobAge=3600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
restart=0
if [ ! -f "$CONF" ] || grep -qF "$MARKER" "$CONF"; then
  if [ "$(cat "$CONF" 2>/dev/null)" != "$want" ]; then
    say "writing $CONF (node $HOST, $CPUS CPUs, partition debug)"
    $SUDO mkdir -p /etc/slurm
    printf '%s\n' "$want" | $SUDO tee "$CONF" >/dev/null
    restart=1
  fi
else
  say "keeping the existing $CONF (not written by dwave)"
fi
$SUDO mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

# --- munge ---------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  $SUDO mungekey -c -f
fi
$SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  $SUDO pkill -x munged || true
  $SUDO -u munge /usr/sbin/munged 2>/dev/null || $SUDO runuser -u munge -- /usr/sbin/munged
fi

# --- daemons -------------------------------------------------------------------------------
if [ "$restart" = 1 ]; then  # a new config: restart the daemons, after the old ones are gone
  $SUDO pkill -x slurmd || true
  $SUDO pkill -x slurmctld || true
  for _ in $(seq 1 100); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.2; done
fi
pgrep -x slurmctld >/dev/null || { say "starting slurmctld"; $SUDO slurmctld; }
pgrep -x slurmd >/dev/null || { say "starting slurmd"; $SUDO slurmd; }

# The node registers within a few seconds; a node left DOWN by an unclean stop is resumed.
for _ in $(seq 1 60); do
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*) $SUDO scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
case "$state" in
  idle|mixed|allocated|completing) say "ready: node $HOST is $state" ;;
  *) echo "slurm-up: node $HOST did not become ready (state '${state:-none}'); see /var/log/slurm/" >&2; exit 1 ;;
esac
