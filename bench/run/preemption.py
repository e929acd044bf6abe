"""Preemption: SIGUSR1/SIGTERM/SIGINT (or a wall-clock budget) -> checkpoint at the next step, exit with
``EXIT_REQUEUE``.

SLURM sends ``--signal=B:USR1@N`` before the time limit or on preemption; the batch script forwards it to the
trainer and requeues the job when the trainer exits with ``EXIT_REQUEUE``. The handler only sets a flag: the
checkpoint is written by the training loop at an optimizer-step boundary, after every rank has agreed to stop
(a collective), so no rank is left waiting in a collective that the others abandoned. Ctrl-C (SIGINT) is a stop
request like SIGTERM, so an interactive run keeps its progress; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import time

#: Exit code of a trainer that checkpointed because it was asked to stop; the job should be requeued.
#: (75 = EX_TEMPFAIL in sysexits.h: "temporary failure, the user is invited to retry".)
EXIT_REQUEUE = 75

_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
    """Flags a stop request from a signal or from ``max_wall_minutes`` of running time."""

    def __init__(self, max_wall_minutes: float = 0.0):
        self.requested_by: str | None = None
        self._deadline = time.monotonic() + max_wall_minutes * 60 if max_wall_minutes > 0 else None
        self._previous = {}
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested_by == name:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        self.requested_by = self.requested_by or name

    def request(self, reason: str) -> None:
        """Ask for a stop from inside the program (a step budget); the first reason wins."""
        if self.requested_by is None:
            self.requested_by = reason

    @property
    def requested(self) -> bool:
        if self.requested_by is None and self._deadline is not None and time.monotonic() > self._deadline:
            self.requested_by = "max_wall_minutes"
        return self.requested_by is not None

    def close(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
