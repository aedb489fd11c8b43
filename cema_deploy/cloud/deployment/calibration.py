"""Calibration and statistics: calibration batches set (first of a generation), merge (further ``start`` batches)
or re-initialise (``shift``) the running statistics and publish at once; statistics samples move them (beyond the
paper)."""

from __future__ import annotations

import time

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
