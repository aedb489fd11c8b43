"""Shared terminal output: one rich console (stderr for progress) and a step progress display."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextmanager
def step_progress(*, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """Yield a callback that shows each named step with a spinner and ticks the previous one off."""
    if quiet:
        yield lambda _msg: None
        return
    from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console) as p:
        current: list[TaskID] = []

        def on_step(msg: str) -> None:
            if current:
                p.update(current[-1], completed=1, total=1)
            current.append(p.add_task(msg, total=None))

        yield on_step
        if current:
            p.update(current[-1], completed=1, total=1)
