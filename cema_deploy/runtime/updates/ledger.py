"""The edge's one record of versions: which cloud epoch it follows, what it will never apply again, what it rolled
back, and which version a calibration batch exempts from the rollback judgement.

Versions are ordered as ``(epoch, version)`` (:attr:`~cema_deploy.contract.blob.RefitBlob.stamp`): a cloud mints
an epoch per cloud state, so a cloud restarted on a new or restored state publishes ``(newer epoch, 1)``. The
ledger follows one epoch at a time; its *floor* is the highest version of that epoch that this edge serves, has
submitted for a refit, rolled back or refused, and the poller asks the cloud for versions above it.

The rules, in one place (the intake, the uplink's listener and the rollback guard report here and never write
these fields themselves):

* The floor moves only on **verified metadata**: a blob whose signature verified (or, without a verifier, a blob
  from a cloud trusted unsigned) gave its own ``(epoch, version)``. An answer that cannot be verified (bad or
  missing signature, unreadable bytes) is counted (:attr:`unverified`) and never remembered: no header, status or
  acknowledgement (all unsigned) can raise or lower the floor.
* A verified blob of a **newer epoch** re-baselines the ledger: the floor, the refusals and the rollbacks belong to
  the old cloud state and are dropped; one log line says so. A blob of an **older epoch** is refused
  (:class:`~cema_deploy.exceptions.StaleEpochError`, reason ``stale epoch``) and not remembered.
* Unsigned messages may only *hint*: a cloud whose status or acknowledgements say its newest version fell below
  the floor (a new cloud state starts again at v1) earns one probe (a poll from version 0) per distinct hinted
  version, whose answer goes through the same checks as any other.
* **One verdict per episode** (issue 22): an *episode* runs from one calibration batch queued (or a new epoch or
  generation) to the next. After a rollback the guard *holds* the episode's line (:meth:`hold`): later blobs of the
  episode continue the trajectory just rejected and reported once, so they are declined unjudged (counted as
  ``held``, covered by the floor, never reported) instead of being applied and rolled back one by one (before
  this, one bad trajectory became a chain of ~15 rollbacks, each judged against the same calibration blob). The
  hold ends at the next episode or when the runtime releases it (``RollbackConfig.hold_frames`` frames later);
  the next blob is then judged against the serving parameters again (re-based). A blob that answers the
  episode's calibration batch (:meth:`exempt`) is never declined: it is the episode's new start.

Thread-safe (one lock; callbacks never run under it). Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cema_deploy.contract.blob import RefitBlob
from cema_deploy.exceptions import StaleBlobError, StaleEpochError

__all__ = ["LedgerSnapshot", "Stamp", "VersionLedger", "previous_stamp", "serving_stamp"]

log = logging.getLogger("cema_deploy.edge")

#: ``(epoch, version)``: how the edge orders parameters (lexicographically).
Stamp = tuple[int, int]
#: The refusal reason of answers no signature vouches for; a state file of an older release may hold such
#: entries, keyed by the version an unauthenticated header announced (dropped on restore).
UNVERIFIED_REASON = "signature"


@dataclass(frozen=True)
class LedgerSnapshot:
    """A consistent copy of the ledger (for metrics and the state file)."""

    epoch: int
    floor: int
    refused_upto: int
    refused: dict[int, str] = field(default_factory=dict)  # version (of ``epoch``) -> reason
    rolled_back: dict[int, str] = field(default_factory=dict)  # version (of ``epoch``) -> judgement
    refusals: dict[str, int] = field(default_factory=dict)  # every refusal since start, by reason
    rollbacks: dict[str, int] = field(default_factory=dict)  # every rollback since start, by reason
    unverified: int = 0
    rebaselines: int = 0
    episode: int = 0
    held: int = 0  # blobs declined unjudged while the guard held an episode's line (since start)
    holding: int | None = None  # the rolled-back version the guard holds on, None: not holding


class VersionLedger:
    """Owner of the epoch, the refusal floor, refusals, rollbacks and the calibration exemption.

    ``serving()`` returns the stamp serving now (the backend's; read, never stored, so it cannot drift).

    Example:
        >>> ledger = VersionLedger(lambda: backend.stamp)  # doctest: +SKIP
        >>> ledger.admit(blob)  # StaleBlobError / StaleEpochError, or the blob may be submitted  # doctest: +SKIP
        >>> ledger.floor  # ask the cloud for versions above this  # doctest: +SKIP
    """

    def __init__(self, serving: Callable[[], Stamp]) -> None:
        self._serving = serving
        self._lock = threading.Lock()
        self._epoch = 0
        self._refused_upto = 0  # versions of the epoch up to this one are never applied (refused or rolled back)
        self._submitted_upto = 0  # versions of the epoch handed to the refit scheduler
        self._refused: dict[int, str] = {}
        self._rolled_back: dict[int, str] = {}
        self._refusals: collections.Counter[str] = collections.Counter()
        self._rollbacks: collections.Counter[str] = collections.Counter()
        self._unverified = self._fruitless = 0
        self._rebaselines = 0
        self._hint: int | None = None  # the newest version the cloud says it has (unsigned: a hint only)
        self._hint_max: int | None = None  # the highest hint heard in the followed epoch
        self._behind = False  # the hints say the cloud is on a new state, behind the floor
        self._probed: int | None = None  # the hint the last probe answered
        self._calib_window = False  # a calibration batch is queued: blobs answering it are not judged
        self._calib_target: int | None = None
        self._episode = 0  # rises at every calibration batch queued and every new cloud epoch or generation
        self._holding: int | None = None  # the version rolled back in this episode; later blobs are declined
        self._held: set[int] = set()  # versions of the epoch declined while holding (the newest few)
        self._held_total = 0

    # ---- reads ------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    @property
    def floor(self) -> int:
        """Every version of :attr:`epoch` up to this one is served, submitted, rolled back or refused."""
        with self._lock:
            return self._floor()

    @property
    def refused_upto(self) -> int:
        with self._lock:
            return self._refused_upto

    @property
    def unverified(self) -> int:
        """Answers refused before any metadata could be trusted (counted, never remembered)."""
        with self._lock:
            return self._unverified

    @property
    def fruitless(self) -> int:
        """Refusals that did not raise the floor (unverifiable, another epoch, a replay of a version the floor
        covers): answers the poller backs off from before asking again."""
        with self._lock:
            return self._fruitless

    def done(self, version: int) -> bool:
        """True when ``version`` of the followed epoch serves (or a newer one does) or will never be applied."""
        with self._lock:
            epoch, serving = self._serving()
            return (epoch, serving) >= (self._epoch, version) or self._refused_upto >= version

    def settled(self, stamp: Stamp) -> bool:
        """True when ``stamp`` (or newer) serves, or ``stamp`` was refused or rolled back."""
        with self._lock:
            if self._serving() >= stamp:
                return True
            return stamp[0] == self._epoch and any(
                stamp[1] in d for d in (self._refused, self._rolled_back, self._held)
            )

    def snapshot(self) -> LedgerSnapshot:
        with self._lock:
            return LedgerSnapshot(
                epoch=self._epoch,
                floor=self._floor(),
                refused_upto=self._refused_upto,
                refused=dict(self._refused),
                rolled_back=dict(self._rolled_back),
                refusals=dict(self._refusals),
                rollbacks=dict(self._rollbacks),
                unverified=self._unverified,
                rebaselines=self._rebaselines,
                episode=self._episode,
                held=self._held_total,
                holding=self._holding,
            )

    # ---- the intake -------------------------------------------------------------------------------------
    def check_epoch(self, blob: RefitBlob) -> None:
        """Raise :class:`StaleEpochError` for a blob of an epoch older than the one followed."""
        with self._lock:
            if blob.epoch < self._epoch:
                raise StaleEpochError(
                    f"Blob v{blob.version} belongs to cloud epoch {blob.epoch}, older than epoch {self._epoch} that "
                    "this edge follows (a cloud state replaced since, or a replay); not applying it. A cloud "
                    "restored from an old backup must mint a new epoch for its state."
                )

    def admit(self, blob: RefitBlob, *, source: str = "a blob") -> None:
        """``blob`` verified and validated: adopt its epoch when newer (re-baseline), then claim its version.

        Raises :class:`StaleEpochError` (older epoch) or :class:`StaleBlobError` (not above the floor); otherwise
        the caller hands the blob to the refit scheduler and the floor covers it.
        """
        self.check_epoch(blob)
        with self._lock:
            if blob.epoch > self._epoch:
                old, first = self._epoch, self._epoch == 0 and self._floor() == 0  # a fresh edge: nothing to drop
                self._epoch, self._refused_upto, self._submitted_upto = blob.epoch, 0, 0
                self._refused.clear()
                self._rolled_back.clear()
                self._held.clear()
                self._new_episode()
                self._hint = self._hint_max = self._probed = None
                self._behind = False
                if first:
                    log.info("following cloud epoch %d (seen in %s, verified)", blob.epoch, source)
                else:
                    self._rebaselines += 1
                    log.warning("cloud epoch %d -> %d (seen in %s, verified): a new cloud state; re-baselined, "
                                "versions of epoch %d are followed from v%d on", old, blob.epoch, source, blob.epoch,
                                blob.version)  # fmt: skip
            floor = self._floor()
            if blob.version <= floor:
                raise StaleBlobError(
                    f"Blob version {blob.version} is not above version {floor}, which this edge serves, built, "
                    "rolled back or refused; not applying it. The cloud must publish a newer version."
                )
            self._submitted_upto = blob.version

    def refused(self, stamp: Stamp | None, reason: str) -> bool:
        """Count a refusal; True when it was remembered (a verified version of the followed epoch)."""
        with self._lock:
            self._refusals[reason] += 1
            floor = self._floor()
            remembered = stamp is not None and stamp[0] == self._epoch and stamp[1] > 0
            if stamp is None:
                self._unverified += 1
            elif remembered:
                self._refused_upto = max(self._refused_upto, stamp[1])
                self._refused[stamp[1]] = reason
            if self._floor() <= floor:
                self._fruitless += 1
            return remembered

    # ---- the rollback guard -------------------------------------------------------------------------------
    def rolled_back(self, stamp: Stamp, reason: str, *, detail: str = "", swapped: bool) -> bool:
        """``stamp`` was judged bad for ``reason`` (``swapped``: and rolled back; ``detail`` says how); never
        applied again. True when it belongs to the followed epoch (then the cloud may be told)."""
        with self._lock:
            if swapped:
                self._rollbacks[reason] += 1
            if stamp[0] != self._epoch:
                return False
            self._refused_upto = max(self._refused_upto, stamp[1])
            if swapped:
                self._rolled_back[stamp[1]] = detail or reason
            return True

    # ---- hints from unsigned messages ---------------------------------------------------------------------
    def cloud_says(self, version: int) -> None:
        """A status read or an acknowledgement says the cloud's newest version is ``version`` (a hint only).

        Within one cloud state that number never falls; acknowledgements may lag the blobs already fetched, so a
        hint below the floor means a new cloud state only when it is the first one heard (the floor then comes
        from the state folder) or lower than an earlier hint."""
        with self._lock:
            floor = self._floor()
            if version >= floor:
                self._behind = False
            elif self._hint_max is None or version < self._hint_max:
                self._behind = True
            self._hint = version
            self._hint_max = version if self._hint_max is None else max(self._hint_max, version)

    def take_probe(self) -> bool:
        """True (once per hinted version) when the cloud seems to be on a new state that is behind the floor: the
        next poll then asks from version 0 (its answer is checked like any other)."""
        with self._lock:
            hint = self._hint
            if not self._behind or hint is None or hint <= 0 or hint >= self._floor() or hint == self._probed:
                return False
            self._probed = hint
            return True

    # ---- calibration exemption ----------------------------------------------------------------------------
    def calibration_queued(self) -> None:
        """A calibration batch was queued: blobs answering it re-initialise the statistics by design and are
        accepted unjudged until one of at least its acknowledged target version was applied."""
        with self._lock:
            self._calib_window, self._calib_target = True, None
            self._new_episode()

    def calibration_done(self, target: int | None) -> None:
        """The calibration batch was acknowledged with ``target`` (None: it was lost)."""
        with self._lock:
            epoch, serving = self._serving()
            if target is None or (epoch, serving) >= (self._epoch, target):  # lost, or its blob already serves
                self._calib_window, self._calib_target = False, None
            else:
                self._calib_target = target

    def exempt(self, version: int) -> bool:
        """True when applied ``version`` answers a calibration batch: the first version at or above the batch's
        acknowledged target (which closes the exemption); before the acknowledgement, any version (the target is
        not known yet). A version below a known target was published before the calibration and is judged."""
        with self._lock:
            if not self._calib_window:
                return False
            if self._calib_target is None:
                return True
            if version < self._calib_target:
                return False
            self._calib_window = False
            return True

    # ---- episodes and the hold (one verdict per episode) -----------------------------------------------------
    @property
    def episode(self) -> int:
        """The episode: frames since the last calibration batch queued (or the last new epoch or generation)."""
        with self._lock:
            return self._episode

    @property
    def holding(self) -> int | None:
        """The version rolled back in this episode whose line the guard holds (later blobs are declined), or None."""
        with self._lock:
            return self._holding

    def new_episode(self) -> None:
        """A new episode begins (a new generation; calibration batches and new epochs call it themselves)."""
        with self._lock:
            self._new_episode()

    def hold(self, version: int) -> None:
        """``version`` was rolled back: decline the later blobs of this episode unjudged (they continue the line
        that was just rejected, which the cloud was told about once) until :meth:`release` or a new episode."""
        with self._lock:
            self._holding = version

    def release(self, why: str) -> None:
        """Stop holding: the next blob is applied and judged against the serving parameters (re-based)."""
        with self._lock:
            if self._holding is None:
                return
            held, self._holding = self._holding, None
        log.info("no longer holding the line of rolled-back v%d (%s): the next blob is judged again", held, why)

    def declines(self, blob: RefitBlob) -> bool:
        """True when ``blob`` (verified and valid) is declined unjudged because the guard holds this episode's
        line: counted and remembered like a refusal (the floor covers it) but never reported; False otherwise
        (a blob at or below the floor is left to :meth:`admit`, which refuses it as stale)."""
        with self._lock:
            if self._holding is None or blob.epoch != self._epoch or blob.version <= self._floor():
                return False
            if self._calib_window and (self._calib_target is None or blob.version >= self._calib_target):
                # A blob answering this episode's calibration batch is a new start (it re-initialises the
                # statistics), not the held line: a rollback between the batch and its blob (typically of a
                # reset's blob judged against the old parameters) must not make the edge decline it.
                return False
            self._refused_upto = max(self._refused_upto, blob.version)
            self._held = {v for v in self._held if v > blob.version - 64} | {blob.version}
            self._held_total += 1
            holding = self._holding
        log.info("v%d declined unjudged: it continues the line of rolled-back v%d in this episode", blob.version,
                 holding)  # fmt: skip
        return True

    def _new_episode(self) -> None:
        self._episode += 1
        self._holding = None

    # ---- durable state ------------------------------------------------------------------------------------
    def restore(
        self, *, epoch: int, refused: Mapping[int, str], rolled_back: Mapping[int, str], saved_upto: int
    ) -> None:
        """Load what a state file kept. Entries no signature vouched for (older releases remembered the version
        an unauthenticated header announced) are dropped, and the floor is recomputed from the rest."""
        kept = {v: r for v, r in refused.items() if r != UNVERIFIED_REASON}
        upto = max([0, *kept, *rolled_back])
        if saved_upto > upto:
            log.warning("the saved refusal floor v%d is not backed by any verified refusal or rollback (the highest "
                        "is v%d): ignoring it", saved_upto, upto)  # fmt: skip
        with self._lock:
            self._epoch = max(self._epoch, epoch)
            self._refused, self._rolled_back = dict(kept), dict(rolled_back)
            self._refused_upto = min(saved_upto, upto)

    def _floor(self) -> int:
        epoch, serving = self._serving()
        return max(serving if epoch == self._epoch else 0, self._refused_upto, self._submitted_upto)


def serving_stamp(backend: Any) -> Stamp:
    """``(epoch, version)`` serving on ``backend`` (a backend without epochs: epoch 0)."""
    stamp = getattr(backend, "stamp", None)
    return (int(stamp[0]), int(stamp[1])) if stamp is not None else (0, int(backend.version))


def previous_stamp(backend: Any) -> Stamp | None:
    """``(epoch, version)`` of the parameters a rollback would restore, None when there are none."""
    state = getattr(backend, "_previous", None)
    return None if state is None else (int(getattr(state, "epoch", 0)), int(state.version))
