"""The edge's serving loop over a source: batches in, per-frame outputs streamed out, counters kept.

:func:`serve_stream` is what ``edge run`` runs between opening its source and writing its summary. It keeps no
per-frame array: each batch's predictions go to the :class:`~cema_deploy.runtime.predictions.PredictionWriter`
(when given) as it is served, and :class:`StreamTally` holds counters only, so memory stays flat on an endless
camera. ``should_stop()`` is asked before each batch (a signal handler sets it), so a requested stop ends after
the batch being served and every served frame is in the outputs. Never imports torch.

Example:
    >>> with EdgeRuntime(backend, SampleSelector(cfg)) as rt, PredictionWriter(Path("p.csv")) as out:  # doctest: +SKIP
    ...     tally = serve_stream(rt, batches_from_source("frames/", 64), writer=out)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cema_deploy.runtime.predictions import PredictionWriter

__all__ = ["StreamTally", "serve_stream", "uploaded_mask"]


@dataclass
class StreamTally:
    """Counters of one run (this process, whatever a restored state says): frames served, selected and queued to
    go up, correct ones with labels, and the seconds spent (``wall_s``: since the loop started, waits for the
    source and ``--fps`` pacing included)."""

    frames: int = 0
    selected: int = 0
    queued_up: int = 0
    correct: int = 0
    labelled: int = 0
    batches: int = 0
    started: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("started")
        d["served_fps"] = self.frames / self.wall_s if self.wall_s > 0 else 0.0
        d["selected_pct"] = 100.0 * self.selected / self.frames if self.frames else 0.0
        return d


def uploaded_mask(step: Any, with_cloud: bool) -> np.ndarray:
    """Frames of this step that go up, of any kind (selected, statistics, the whole of a calibration batch)."""
    n = len(step.predictions)
    if not with_cloud:
        return np.zeros(n, bool)
    if step.calibration:
        return np.ones(n, bool)
    stats = step.selection.stats_mask
    return np.asarray(step.selection.mask | (stats if stats is not None else False), bool)


def serve_stream(
    rt: Any,
    frames: Iterable[np.ndarray],
    *,
    writer: PredictionWriter | None = None,
    labels: np.ndarray | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    next_batch: Callable[[Iterator[np.ndarray]], np.ndarray | None] | None = None,
    on_batch: Callable[[Any, StreamTally], None] | None = None,
    tally: StreamTally | None = None,
) -> StreamTally:
    """Serve every batch of ``frames`` through ``rt`` (an :class:`~cema_deploy.runtime.edge.EdgeRuntime`) until
    the source ends or ``should_stop()``; returns the counters (``tally`` when given, updated in place, so a
    caller interrupted by an exception still has them). ``next_batch(iterator)`` takes the next batch (None: the
    source ended); the CLI wraps it so a stop signal can interrupt a wait for the source."""
    t = tally if tally is not None else StreamTally()
    it = iter(frames)
    take = next_batch or (lambda i: next(i, None))
    with_cloud = getattr(rt, "uplink", None) is not None
    try:
        while not should_stop():
            images = take(it)
            if images is None:
                break
            step = rt.process(images)
            n = len(images)
            if labels is not None:
                t.correct += int((step.predictions == labels[t.frames : t.frames + n]).sum())
                t.labelled += n
            up = uploaded_mask(step, with_cloud)
            t.frames += n
            t.batches += 1
            t.selected += int(step.selection.mask.sum())
            t.queued_up += int(up.sum())
            if writer is not None:
                writer.write(step.predictions, step.selection.entropy, step.selection.mask, step.version, up)
            if on_batch is not None:
                on_batch(step, t)
    finally:
        t.wall_s = time.perf_counter() - t.started
    return t
