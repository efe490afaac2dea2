"""Stopping a long job cleanly: SLURM's warning before a time limit (SIGTERM, `--signal`),
`scancel --signal=TERM`, Ctrl-C, and SIGUSR1, which Open MPI's mpirun forwards to its ranks
where it kills them on SIGTERM. The handler only sets a flag: the job checkpoints and exits at
its next safe point (a training step, a generation chunk)."""

from __future__ import annotations

import signal


class StopSignal:
    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)
            # Restart the system calls the signal interrupts rather than fail them with EINTR
            # (Python's default for a handler of its own): the signal lands on whatever thread
            # the kernel picks, Horovod's and TensorFlow's blocked in socket reads among them.
            signal.siginterrupt(sig, False)

    def _handle(self, signum, _frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
