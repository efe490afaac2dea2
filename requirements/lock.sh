#!/usr/bin/env bash
# Writes the lock files (every package pinned, with the hashes of its files) from a virtual
# environment in which the test suite passed: what `pip install --require-hashes -r` then
# reproduces is exactly the tested set.
#   bash requirements/lock.sh [VENV]      (default .venv; needs pip-tools, fetched into a
#                                          temporary venv, and the package index)
#   cpu.txt   tensorflow-cpu and dwave's dependencies (a user's install, the container image)
#   test.txt  cpu.txt + the test tools (scripts/setup.sh --tests)
#   gpu.txt   tensorflow[and-cuda] and dwave's dependencies (CUDA libraries as pip wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT   # only the folder made here
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q pip-tools
# The tested versions as constraints (dwave itself and Horovod, built from source, left out;
# pip freeze omits pip, setuptools and wheel, so they are added).
{ "$VENV/bin/pip" freeze --all | grep -v -E "^-e |^#|^horovod==|^wavenet-dwave=="; } \
  > "$tools/tested.txt"
for lock in cpu test gpu; do
  case $lock in
    cpu) extras=(--extra cpu) ;;
    test) extras=(--extra cpu --extra test) ;;
    gpu) extras=(--extra gpu) ;;
  esac
  echo "[lock] requirements/$lock.txt"
  "$tools/venv/bin/pip-compile" -q --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-find-links "${extras[@]}" -c "$tools/tested.txt" \
    --output-file "requirements/$lock.txt" setup.cfg
  # The temporary constraints file's path means nothing to a reader.
  sed -i "s|$tools/tested.txt|the tested venv (requirements/lock.sh)|g" "requirements/$lock.txt"
done
