"""Progress bars for long loops (feature extraction, sampling), on stderr, in terminals and in log files alike.

    with progress_bar(len(source), "features: samples.npz") as advance:
        for batch in batches:
            ...
            advance(len(batch))

On a terminal it is a live ``rich`` bar (refreshed once a second). Where stderr is a file (SLURM logs), rich
draws nothing while running, so a plain status line is printed every ``LOG_INTERVAL_S`` seconds, and the final
bar once the loop ends. ``total <= 0`` costs nothing (no console, no thread): pass 0 on ranks that should stay
quiet.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: Seconds between the status lines printed where stderr is not a terminal.
LOG_INTERVAL_S = 30.0
REFRESH_PER_SECOND = 1.0

_CONSOLE: Console | None = None


def default_console() -> Console:
    """The shared stderr console (created on first use, so importing this module costs nothing)."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def _noop(n: int = 1) -> None:
    pass


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps; yields ``advance(n=1)``. ``console`` defaults to the shared stderr console."""
    if total <= 0:
        yield _noop
        return
    out = console or default_console()
    live = out.is_terminal and not out.is_dumb_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=out, transient=False, auto_refresh=live,
                        refresh_per_second=REFRESH_PER_SECOND)
    with progress:
        task = progress.add_task(description, total=total)
        last_line = time.monotonic()

        def advance(n: int = 1) -> None:
            nonlocal last_line
            progress.advance(task, n)
            if not live and time.monotonic() - last_line >= LOG_INTERVAL_S:
                last_line = time.monotonic()
                out.print(progress.make_tasks_table(progress.tasks))

        yield advance
