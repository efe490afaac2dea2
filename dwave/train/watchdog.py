"""A rank's watchdog: the job ends when training steps stop completing.

A rank that is stopped (SIGSTOP, a debugger), swapped out or hung leaves every other rank
waiting in its next collective forever: MPI and Horovod never time out there (Horovod's stall
check runs in the coordinator's negotiation, which waits on the same missing rank). So each
rank of a multi-rank job runs this thread: once the run has made its first step, if no step,
validation or checkpoint completes for `seconds`, it prints one line and ends the process with
exit code 3, and the launcher (mpirun, srun) ends the rest. The run resumes from its last
checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_CODE = 3


class Watchdog:
    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self._last: float | None = None  # armed by the first beat (the first step compiles)
        if seconds > 0:
            threading.Thread(target=self._watch, daemon=True, name="dwave-watchdog").start()

    def beat(self) -> None:
        """Progress: a step, a validation or a checkpoint completed."""
        self._last = time.monotonic()

    def stop(self) -> None:
        """The steps are over (the last checkpoint may take long on rank 0)."""
        self._last = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(5.0, self.seconds / 4))
            last = self._last
            if last is not None and time.monotonic() - last > self.seconds:
                print(f"dwave: error: rank {self.rank}: no training step completed in "
                      f"{self.seconds:g} s (another rank is stopped, hung or swapped out; "
                      "--stall-minutes sets the limit): ending the job; rerun the same command "
                      "to resume from its last checkpoint", file=sys.stderr, flush=True)
                os._exit(EXIT_CODE)
