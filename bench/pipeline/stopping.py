"""Stop requests to ``kindbench run``: end the run cleanly instead of leaving its jobs behind.

``kill``, a closed terminal or the end of a login session sends SIGTERM or SIGHUP to the executor alone; its
job processes (pool workers, torchrun children) would go on without it, and one of them may still hold a run
directory when the user resumes. On such a signal the executor passes SIGTERM on to its children (a training
job checkpoints at its next step, ``bench.run.preemption``), starts nothing new and returns once the running
jobs have ended, so no job outlives it and the next ``kindbench run`` resumes from the checkpoints. Ctrl-C is not
handled here: the terminal already sends it to every process of the group, and a second Ctrl-C aborts.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from types import FrameType

#: The signals that ask the executor to stop (SIGINT stays Python's KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class StopRequests:
    """While entered, SIGTERM/SIGHUP set ``signal_name`` and are passed on to this process's children."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._children: list[int] = []

    def __enter__(self) -> StopRequests:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def watch(self, pid: int) -> None:
        """Also pass a stop on to ``pid`` (a job's subprocess, which ``multiprocessing`` does not know of)."""
        self._children.append(pid)

    def unwatch(self, pid: int) -> None:
        self._children.remove(pid)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        pids = [child.pid for child in multiprocessing.active_children()] + self._children
        for pid in pids:  # SIGTERM whatever arrived: it is the one every job's preemption watch knows
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """Pool-worker initializer: between jobs a worker leaves stop signals to the executor (a worker killed while
    idle would break the pool under the jobs still running); a training job installs its own handler while it
    runs, and puts this one back after."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
