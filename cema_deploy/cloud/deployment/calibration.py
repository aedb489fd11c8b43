"""Calibration and statistics: calibration batches set (first of a generation), merge (further ``start`` batches)
or re-initialise (``shift``) the running statistics and publish at once; statistics samples move them (beyond the
paper); the statistics each edge reports (protocol 3) normalise that edge's samples in the student step (beyond the
paper, :mod:`cema_deploy.cloud.edge_statistics`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from cema_deploy.cloud.deployment.publishing import PublishingMixin
from cema_deploy.cloud.deployment.state import log


class CalibrationMixin(PublishingMixin):
    """The calibration and statistics jobs of a :class:`~cema_deploy.cloud.deployment.Deployment`."""

    def _do_calibration(self) -> None:
        c = self.config
        with self._cond:
            up = self.samples.pending_calibrations()[0]
            self._inflight_seq = up.seq
            images = up.images  # read from its file
            n = len(images)
            both = up.calibration == "shift" or c.statistics == "samples"
            if up.calibration == "shift" and not (self.shift_step >= 0 and self.cema.steps - self.shift_step < 2):
                keep, self.shift_step = 0.0, self.cema.steps  # a new shift episode: replace
            elif up.calibration == "start" and not self.calibrated:
                keep = 0.0  # the generation's first calibration: set
            else:  # other devices' batches of the same start or shift episode: merge by sample count
                keep = self.episode_n / (self.episode_n + n)
            self.episode_n = n if keep == 0.0 else self.episode_n + n
            if keep == 0.0:  # a new episode (replay_scope = "episode" replays from here on)
                self.episode_start = up.adapt_start
            self.calibrated = True
        t0 = time.perf_counter()
        self.cema.calibrate(images, student=True, teacher=both, keep=keep)
        log.info("%s: %s calibration on %d samples (%s)", self.name, up.calibration, n, "merged" if keep else "set")
        if c.calibration_distils:  # beyond the paper: the same frames also distil, B at a time, before publishing
            for a in range(0, n, c.batch_size):
                self.cema.adapt(images[a : a + c.batch_size])
            self.count("calibration_steps")
        self._commit(
            "calibrations",
            publish=not self.frozen,
            seconds=time.perf_counter() - t0,
            calib_done=up.seq,
            calibration=up,
            floor=True,
        )

    def _do_stats(self) -> None:
        b = self.config.batch_size
        with self._cond:
            start = self.stats_cursor
            images = self.samples.read_stats(start, start + b)
        t0 = time.perf_counter()
        self.cema.update_statistics(images)
        self._commit(
            "statistics_updates", publish=not self.frozen, seconds=time.perf_counter() - t0, stats_cursor=start + b
        )

    def _student_groups(self, indices: Iterable[int]) -> Any:
        """Which device's statistics normalise each sample of a student step over adapt ``indices`` (the new
        samples, then the replayed, in the order the step reads them); None when no device reported statistics
        (the step runs as the paper's). Held under the lock."""
        if not len(self.edge_stats):
            return None
        from cema_deploy.cloud.edge_statistics import groups_for

        groups = groups_for(self.samples.devices_at(indices), self.edge_stats)
        if groups is not None:  # samples normalised with each device's statistics, counted for status and tests
            groups.used = self.edge_stats_used
            self.last_student_groups = groups
        return groups
